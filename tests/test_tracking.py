"""Face tracking: the canonical template, head pose, the expression basis, gaze, crops and
the mediapipe backend (on scikit-image's public-domain astronaut portrait)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from neuralhead.geometry.rotation import euler_to_matrix
from neuralhead.tracking import topology as T
from neuralhead.tracking.crop import (
    crop_frame,
    face_centres_and_sizes,
    fixed_box,
    landmarks_to_crop,
    tracked_boxes,
)
from neuralhead.tracking.expression import ExpressionBasis
from neuralhead.tracking.gaze import EYEBALL_RADIUS, gaze_angles
from neuralhead.tracking.mediapipe_backend import FaceMeshTracker, ForegroundSegmenter
from neuralhead.tracking.pose import (
    fit_head_pose,
    pose_from_vector,
    pose_vector,
    rotation_matrices,
)
from neuralhead.tracking.template import load_template

TEMPLATE = load_template().vertices.astype(np.float64)
FRAME = 256
# Rows: pitch, yaw, roll in degrees, scale in pixels per template unit, translation in pixels.
POSES = [
    (0.0, 0.0, 0.0, 60.0, (128.0, 128.0, 0.0)),
    (10.0, -25.0, 5.0, 80.0, (100.0, 140.0, 30.0)),
    (-20.0, 40.0, -15.0, 45.0, (160.0, 90.0, -12.0)),
    (30.0, 60.0, 25.0, 120.0, (128.0, 150.0, 500.0)),
    (-5.0, -70.0, 170.0, 30.0, (20.0, 230.0, 3.0)),
]


def posed(
    points: np.ndarray, pitch: float, yaw: float, roll: float, scale: float, trans
) -> np.ndarray:
    """``points`` (P, 3) in template space, seen in pixels under the given pose."""
    angles = torch.tensor(np.radians([pitch, yaw, roll]), dtype=torch.float64)
    rot = euler_to_matrix(angles).numpy()
    return scale * points @ rot.T + np.asarray(trans)


def all_posed(points: np.ndarray | None = None) -> np.ndarray:
    points = TEMPLATE if points is None else points
    return np.stack([posed(points, *pose) for pose in POSES]).astype(np.float32)


# ---------------------------------------------------------------------------------- template
def test_template_shape_and_mirror_symmetry():
    template = load_template()
    vertices, mirror = template.vertices, template.mirror
    assert vertices.shape == (T.NUM_LANDMARKS, 3) and vertices.dtype == np.float32
    assert mirror.shape == (T.NUM_LANDMARKS,)
    assert np.array_equal(mirror[mirror], np.arange(T.NUM_LANDMARKS))  # an involution
    mirrored = vertices[mirror] * np.array([-1.0, 1.0, 1.0], np.float32)
    assert np.abs(mirrored - vertices).max() < 1e-6
    on_midline = mirror == np.arange(T.NUM_LANDMARKS)
    assert np.abs(vertices[on_midline, 0]).max() < 1e-6
    # The mirror map pairs the named left and right index sets of the topology.
    for right, left in [
        (T.RIGHT_EYE_CORNERS, T.LEFT_EYE_CORNERS),
        (T.RIGHT_EYE_UPPER, T.LEFT_EYE_UPPER),
        (T.RIGHT_EYE_LOWER, T.LEFT_EYE_LOWER),
        (T.RIGHT_EYEBROW, T.LEFT_EYEBROW),
        ((T.RIGHT_IRIS_CENTER,), (T.LEFT_IRIS_CENTER,)),
        ((T.MOUTH_CORNERS[0],), (T.MOUTH_CORNERS[1],)),
    ]:
        assert sorted(mirror[list(right)]) == sorted(left)
    for symmetric in (T.RIGID, T.FACE_OVAL, T.JAW):
        assert set(mirror[list(symmetric)]) == set(symmetric)


def test_template_scale_orientation_and_origin():
    v = TEMPLATE
    assert np.linalg.norm(v[T.RIGHT_EYE_CORNERS[0]] - v[T.LEFT_EYE_CORNERS[0]]) == pytest.approx(
        1.0, abs=1e-6
    )
    assert np.abs(v[list(T.RIGID)].mean(0)).max() < 1e-6  # centred on the rigid points
    # Facing -z: the nose is the point nearest the camera, well in front of the eyes.
    frontmost = int(v[:, 2].argmin())
    assert v[frontmost, 0] == 0.0 and frontmost in (T.NOSE_TIP, 4)
    assert v[T.NOSE_TIP, 2] == pytest.approx(v[:, 2].min(), abs=0.03)
    assert v[T.NOSE_TIP, 2] < v[list(T.RIGHT_EYE_CORNERS + T.LEFT_EYE_CORNERS), 2].min() - 0.3
    # Upright (y down) with the subject's right eye on the image's left.
    assert v[T.FOREHEAD, 1] < v[T.NOSE_TIP, 1] < v[T.CHIN, 1]
    assert v[T.RIGHT_IRIS_CENTER, 0] < 0 < v[T.LEFT_IRIS_CENTER, 0]


# ---------------------------------------------------------------------------------- pose
def test_pose_recovers_a_known_similarity():
    landmarks = all_posed()
    fit = fit_head_pose(landmarks)
    pose = pose_vector(fit, FRAME)
    assert pose.shape == (len(POSES), 6) and pose.dtype == np.float32
    for row, (pitch, yaw, roll, scale, trans) in zip(pose, POSES):
        assert np.abs(np.degrees(row[:3]) - [pitch, yaw, roll]).max() < 0.1
        assert row[3:5] == pytest.approx(np.array(trans[:2]) / FRAME * 2 - 1, abs=1e-5)
        assert row[5] == pytest.approx(math.log(scale / FRAME), abs=1e-5)
    assert np.allclose(fit.scale, [p[3] for p in POSES], rtol=1e-5)
    assert np.allclose(fit.translation, [p[4] for p in POSES], atol=1e-3)
    assert np.allclose(rotation_matrices(pose), fit.rotation, atol=1e-5)


def test_pose_from_vector_inverts_pose_vector():
    fit = fit_head_pose(all_posed())
    pose = pose_vector(fit, FRAME)
    back = pose_from_vector(pose, FRAME)
    assert np.allclose(back.rotation, fit.rotation, atol=1e-5)
    assert np.allclose(back.scale, fit.scale, rtol=1e-5)
    assert np.allclose(back.translation[:, :2], fit.translation[:, :2], atol=1e-3)
    assert np.all(back.translation[:, 2] == 0)  # depth is not part of the pose vector
    assert np.allclose(pose_vector(back, FRAME), pose, atol=1e-5)
    # A single pose vector works too.
    assert pose_from_vector(pose[1], FRAME).rotation.shape == (1, 3, 3)


def test_canonicalize_maps_back_onto_the_template():
    landmarks = all_posed()
    canonical = fit_head_pose(landmarks).canonicalize(landmarks)
    assert canonical.shape == landmarks.shape
    assert np.abs(canonical - TEMPLATE).max() < 1e-4


def test_pose_ignores_non_rigid_points():
    moving = sorted(set(T.JAW + T.LIPS_OUTER_UPPER + T.LIPS_OUTER_LOWER + T.LIPS_INNER_LOWER))
    assert not set(moving) & set(T.RIGID)
    deformed = TEMPLATE.copy()
    rng = np.random.default_rng(0)
    deformed[moving] += [0.0, 0.6, 0.2]  # the jaw drops by more than half an eye distance
    deformed[moving] += rng.normal(0, 0.1, (len(moving), 3))
    fit = fit_head_pose(all_posed(deformed))
    expected = fit_head_pose(all_posed())
    assert np.abs(pose_vector(fit, FRAME) - pose_vector(expected, FRAME)).max() < math.radians(0.01)
    # The deformation survives in template space, where expression is measured.
    canonical = fit.canonicalize(all_posed(deformed))
    assert np.abs(canonical - deformed).max() < 1e-4


# ---------------------------------------------------------------------------------- expression
def synthetic_shapes(num_frames: int, num_modes: int = 3, seed: int = 0):
    """mean + known orthonormal modes x coefficients of decreasing spread."""
    rng = np.random.default_rng(seed)
    mean = TEMPLATE[: T.NUM_MESH] + rng.normal(0, 0.02, (T.NUM_MESH, 3))
    modes = np.linalg.qr(rng.standard_normal((T.NUM_MESH * 3, num_modes)))[0].T
    spread = 0.05 * np.arange(num_modes, 0, -1)
    coefficients = rng.standard_normal((num_frames, num_modes)) * spread
    shapes = mean + (coefficients @ modes).reshape(num_frames, T.NUM_MESH, 3)
    return shapes, mean, modes


@pytest.fixture(scope="module")
def fitted():
    shapes, mean, modes = synthetic_shapes(300)
    # Extra points (the irises) are ignored by the fit.
    with_iris = np.concatenate([shapes, np.zeros((len(shapes), 10, 3))], axis=1)
    return ExpressionBasis.fit(with_iris, num_components=3), shapes, mean, modes


def test_expression_basis_recovers_the_span(fitted):
    basis, shapes, _, modes = fitted
    assert basis.mean.shape == (T.NUM_MESH, 3) and basis.components.shape == (3, T.NUM_MESH * 3)
    assert basis.num_components == 3 and basis.num_frames == len(shapes)
    assert np.allclose(basis.components @ basis.components.T, np.eye(3), atol=1e-5)
    # Same principal subspace: the projectors onto the two spans agree.
    assert np.abs(basis.components.T @ basis.components - modes.T @ modes).max() < 1e-4
    assert np.allclose(basis.mean, shapes.mean(0), atol=1e-6)
    assert basis.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-4)
    assert np.all(np.diff(basis.explained_variance_ratio) <= 0)
    # Each component's sign is fixed: its largest entry is positive.
    rows = np.arange(3)
    assert np.all(basis.components[rows, np.abs(basis.components).argmax(1)] > 0)


def test_expression_coefficients_are_in_units_of_the_first_mode(fitted):
    basis, shapes, _, _ = fitted
    coefficients = basis.project(shapes)
    assert coefficients.shape == (len(shapes), 3)
    assert np.allclose(coefficients.mean(0), 0.0, atol=1e-3)
    # The strongest mode has unit variance; the weaker ones keep their smaller spread.
    expected = (basis.stddev / basis.stddev[0]) ** 2
    assert np.allclose(coefficients.var(0), expected, atol=1e-3)
    assert expected[0] == pytest.approx(1.0) and expected[2] < expected[1] < 1.0
    assert np.allclose(np.corrcoef(coefficients.T), np.eye(3), atol=1e-3)


def test_expression_reconstruct_inverts_project_in_the_span(fitted):
    basis, _, _, _ = fitted
    new_shapes, _, _ = synthetic_shapes(20, seed=0)  # same mean and modes, new coefficients
    new_shapes = new_shapes[::-1].copy()
    back = basis.reconstruct(basis.project(new_shapes))
    assert back.shape == (20, T.NUM_MESH, 3)
    assert np.abs(back - new_shapes).max() < 1e-4
    # Outside the span, reconstruction is the orthogonal projection onto it.
    noise = np.random.default_rng(1).normal(0, 0.01, new_shapes.shape)
    flat = noise.reshape(20, -1)
    in_span = (flat @ basis.components.T @ basis.components).reshape(noise.shape)
    back = basis.reconstruct(basis.project(new_shapes + noise))
    assert np.abs(back - (new_shapes + in_span)).max() < 1e-4


def test_project_deformation_is_linear_and_ignores_the_mean(fitted):
    basis, shapes, _, _ = fitted
    d1, d2 = shapes[3] - shapes[7], shapes[11] - shapes[2]
    c = basis.project_deformation(np.stack([d1, d2, 2.0 * d1 - 3.0 * d2, np.zeros_like(d1)]))
    assert np.allclose(c[2], 2.0 * c[0] - 3.0 * c[1], atol=1e-4)
    assert np.allclose(c[3], 0.0)
    # Coefficients of a shape are those of its deformation from the mean...
    assert np.allclose(
        basis.project(shapes[:5]), basis.project_deformation(shapes[:5] - basis.mean), atol=1e-5
    )
    # ...and the difference of two frames' coefficients does not depend on the mean at all.
    other = ExpressionBasis(basis.mean + 0.3, basis.components, basis.stddev,
                            basis.explained_variance_ratio, basis.num_frames)  # fmt: skip
    assert np.allclose(other.project_deformation(d1[None]), c[:1])
    assert np.allclose(basis.project(shapes[3:4]) - basis.project(shapes[7:8]), c[:1], atol=1e-4)


def test_expression_basis_save_load_round_trip(fitted, tmp_path):
    basis = fitted[0]
    path = tmp_path / "expression_basis.npz"
    basis.save(path)
    loaded = ExpressionBasis.load(path)
    for name in ("mean", "components", "stddev", "explained_variance_ratio"):
        assert np.array_equal(getattr(loaded, name), getattr(basis, name))
        assert getattr(loaded, name).dtype == np.float32
    assert loaded.num_frames == basis.num_frames


def test_expression_basis_with_fewer_frames_than_components():
    shapes, _, _ = synthetic_shapes(4, num_modes=3, seed=2)
    basis = ExpressionBasis.fit(shapes, num_components=10)
    assert basis.components.shape == (10, T.NUM_MESH * 3)
    assert np.all(np.isfinite(basis.stddev)) and np.all(basis.stddev >= 0)
    # Components beyond the data's rank have no spread, and their coefficients stay ~0.
    assert basis.stddev[3:].max() < 1e-3 * basis.stddev[0]
    coefficients = basis.project(shapes)
    assert np.all(np.isfinite(coefficients))
    assert np.abs(coefficients[:, 3:]).max() < 1e-2  # 4 frames span 3 directions
    assert np.all(np.isfinite(basis.explained_variance_ratio))
    assert np.abs(basis.reconstruct(coefficients) - shapes).max() < 1e-4


def test_expression_basis_needs_two_frames():
    shapes, _, _ = synthetic_shapes(1)
    with pytest.raises(ValueError, match="at least 2 frames"):
        ExpressionBasis.fit(shapes, num_components=3)


# ---------------------------------------------------------------------------------- gaze
def eye_width(outer: int, inner: int) -> float:
    return float(np.linalg.norm(TEMPLATE[outer, :2] - TEMPLATE[inner, :2]))


def with_irises_moved(dx: float, dy: float) -> np.ndarray:
    shape = TEMPLATE.copy()
    shape[list(T.RIGHT_IRIS + T.LEFT_IRIS)] += [dx, dy, 0.0]
    return shape


def test_gaze_of_the_template_is_zero():
    gaze = gaze_angles(TEMPLATE[None])
    assert gaze.shape == (1, 2) and gaze.dtype == np.float32
    assert np.abs(gaze).max() < 1e-6


@pytest.mark.parametrize(
    "dx, dy", [(-0.02, 0.0), (0.03, 0.0), (0.0, 0.015), (0.0, -0.02), (0.025, -0.01)]
)
def test_gaze_of_moved_irises(dx, dy):
    ((yaw, pitch),) = gaze_angles(with_irises_moved(dx, dy)[None])
    widths = [eye_width(*T.RIGHT_EYE_CORNERS), eye_width(*T.LEFT_EYE_CORNERS)]
    sin_yaw = np.mean([-dx / w for w in widths]) / EYEBALL_RADIUS
    sin_pitch = np.mean([dy / w for w in widths]) / EYEBALL_RADIUS
    assert yaw == pytest.approx(math.asin(sin_yaw), abs=1e-5)
    assert pitch == pytest.approx(math.asin(sin_pitch), abs=1e-5)
    # Irises towards the image's left (-x) look left: positive yaw; down (+y): positive pitch.
    if dx:
        assert np.sign(yaw) == -np.sign(dx)
    if dy:
        assert np.sign(pitch) == np.sign(dy)


def test_closing_the_eyelids_does_not_change_gaze():
    shape = with_irises_moved(0.02, -0.01)
    closed = shape.copy()
    for upper, lower in [
        (T.RIGHT_EYE_UPPER, T.RIGHT_EYE_LOWER),
        (T.LEFT_EYE_UPPER, T.LEFT_EYE_LOWER),
    ]:
        lids = list(upper[1:-1] + lower[1:-1])  # not the corners, which do not move
        closed[lids, 1] = shape[list(lower[1:-1]), 1].mean()
    assert np.abs(closed - shape).max() > 0.02
    assert np.allclose(gaze_angles(closed[None]), gaze_angles(shape[None]), atol=1e-6)


def test_gaze_does_not_depend_on_head_pose():
    shape = with_irises_moved(-0.02, 0.01)
    landmarks = all_posed(shape)
    canonical = fit_head_pose(landmarks).canonicalize(landmarks)
    gaze = gaze_angles(canonical)
    assert np.abs(gaze - gaze_angles(shape[None])).max() < 1e-4


# ---------------------------------------------------------------------------------- crop
def moving_face(
    num_frames: int, start, velocity, scale: float = 50.0, jitter: float = 0.0, seed: int = 0
):
    """Pixel landmarks of the template translated along a line, with optional jitter."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_frames)[:, None]
    offsets = np.asarray(start) + t * np.asarray(velocity) + rng.normal(0, jitter, (num_frames, 2))
    landmarks = np.repeat((scale * TEMPLATE)[None], num_frames, 0)
    landmarks[..., :2] += offsets[:, None, :]
    return landmarks.astype(np.float32), offsets


@pytest.mark.parametrize(
    "width, height, start, velocity",
    [
        (640, 480, (300, 220), (1.5, -0.5)),
        (640, 480, (40, 40), (0.2, 0.1)),  # near the top-left corner
        (255, 201, (200, 110), (0.3, 0.0)),  # odd frame sizes, near the right edge
        (301, 413, (150, 350), (0.0, 0.4)),
    ],
)
def test_fixed_box_contains_every_face_and_stays_in_the_frame(width, height, start, velocity):
    landmarks, _ = moving_face(40, start, velocity, jitter=2.0)
    centre, size = face_centres_and_sizes(landmarks)
    box = fixed_box(centre, size, width, height)
    assert box.shape == (3,) and box.dtype == np.int64
    x0, y0, side = box
    assert 0 <= x0 and 0 <= y0 and x0 + side <= width and y0 + side <= height
    assert side >= 2.0 * np.median(size) - 1 or side == min(width, height)
    xy = landmarks[..., :2].reshape(-1, 2)
    inside = xy.clip([0, 0], [width, height])  # parts of a face outside the frame cannot be kept
    assert np.all(inside >= [x0, y0]) and np.all(inside <= [x0 + side, y0 + side])


@pytest.mark.parametrize("seed", range(20))
def test_fixed_box_stays_in_the_frame_for_random_faces(seed):
    rng = np.random.default_rng(seed)
    width, height = rng.integers(64, 700, 2)
    centre = rng.uniform([0, 0], [width, height], (10, 2))
    size = rng.uniform(5, 0.6 * min(width, height), 10)
    x0, y0, side = fixed_box(centre, size, int(width), int(height), scale=float(rng.uniform(1, 3)))
    assert 0 <= x0 and 0 <= y0 and x0 + side <= width and y0 + side <= height


def test_fixed_box_rounding_never_leaves_the_frame():
    # Faces at the bottom-right corner of odd-sized frames, with every quarter-pixel side.
    for size in np.arange(40.0, 60.0, 0.125):
        x0, y0, side = fixed_box(np.array([[250.0, 195.0]]), np.array([size]), 255, 201)
        assert x0 + side <= 255 and y0 + side <= 201, size
        assert x0 + side >= 254 and y0 + side >= 200  # and the box still reaches the face


def test_tracked_boxes_are_smooth_and_follow_the_face():
    fps = 25.0
    landmarks, _ = moving_face(120, (100, 200), (2.0, 0.5), jitter=3.0)
    centre, size = face_centres_and_sizes(landmarks)
    boxes = tracked_boxes(centre, size, fps)
    assert boxes.shape == (120, 3) and boxes.dtype == np.int64
    box_centre = boxes[:, :2] + boxes[:, 2:] / 2
    # Jitter of the raw centres is gone; only integer rounding remains.
    assert np.abs(np.diff(centre, 2, axis=0)).max() > 5
    assert np.abs(np.diff(box_centre, 2, axis=0)).max() <= 2
    # No lag: away from the ends, the box stays on the true (jitter-free) path.
    clean_centre, _ = face_centres_and_sizes(moving_face(120, (100, 200), (2.0, 0.5))[0])
    middle = slice(20, 100)
    assert np.abs(box_centre[middle] - clean_centre[middle]).max() < 2.5
    assert np.allclose(boxes[:, 2], 2.0 * size.mean(), rtol=0.02)


def test_tracked_boxes_follow_a_growing_face():
    scales = np.linspace(40, 80, 50)
    landmarks = np.stack([s * TEMPLATE + [200, 150, 0] for s in scales]).astype(np.float32)
    centre, size = face_centres_and_sizes(landmarks)
    boxes = tracked_boxes(centre, size, fps=25.0, scale=1.5)
    assert np.all(np.diff(boxes[:, 2]) >= 0)
    middle = slice(15, 35)  # two filter widths from either end
    assert np.abs(boxes[middle, 2] - 1.5 * size[middle]).max() < 1.5


def test_crop_frame_inside_is_a_plain_slice():
    frame = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    crop = crop_frame(frame, np.array([10, 5, 40]), 40)
    assert np.array_equal(crop, frame[5:45, 10:50])


def test_crop_frame_pads_outside_the_frame_by_repeating_the_border():
    frame = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    crop = crop_frame(frame, np.array([-20, -10, 100]), 100)
    assert crop.shape == (100, 100, 3)
    assert np.array_equal(crop[10:70, 20:100], frame)
    assert np.array_equal(crop[:10, 20:100], np.repeat(frame[:1], 10, 0))
    assert np.array_equal(crop[70:, 20:100], np.repeat(frame[-1:], 30, 0))
    assert np.array_equal(crop[10:70, :20], np.repeat(frame[:, :1], 20, 1))
    assert np.all(crop[:10, :20] == frame[0, 0])
    # A box entirely outside the frame still gives a crop of the right size.
    assert crop_frame(frame, np.array([200, 300, 50]), 32).shape == (32, 32, 3)


def blob(height: int, width: int, centre, sigma: float = 3.0) -> np.ndarray:
    """A Gaussian dot centred on ``centre`` in continuous pixel coordinates (pixel i spans
    [i, i + 1)), the convention of the tracker's landmarks."""
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    dot = np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma**2))
    return np.repeat((255 * dot).round().astype(np.uint8)[..., None], 3, -1)


def centroid(image: np.ndarray) -> np.ndarray:
    weight = image[..., 0].astype(np.float64)
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]] + 0.5
    return np.array([(xx * weight).sum(), (yy * weight).sum()]) / weight.sum()


@pytest.mark.parametrize(
    "box, size, point",
    [
        ((40, 30, 200), 128, (120.3, 95.8)),  # downscaled
        ((40, 30, 200), 128, (180.9, 140.2)),
        ((-30, 10, 130), 200, (70.5, 60.5)),  # upscaled, padded on the left
        ((150, -40, 200), 64, (180.9, 140.2)),  # padded above and on the right
        ((0, 0, 240), 240, (120.3, 95.8)),  # same size
        ((100, 50, 64), 256, (130.7, 80.1)),  # upscaled four times
    ],
)
def test_landmarks_to_crop_agrees_with_crop_frame(box, size, point):
    frame = blob(240, 320, point)
    crop = crop_frame(frame, np.array(box), size)
    landmark = np.array([[[point[0], point[1], 7.0]]], np.float32)
    in_crop = landmarks_to_crop(landmark, np.array(box), size)[0, 0]
    side = box[2]
    assert np.abs(centroid(crop) - in_crop[:2]).max() < 0.1 * max(1.0, size / side)
    assert in_crop[2] == pytest.approx(7.0 * size / side)


def test_landmarks_to_crop_with_one_box_per_frame():
    landmarks = np.random.default_rng(2).uniform(0, 200, (4, 478, 3)).astype(np.float32)
    boxes = np.array([[0, 0, 100], [10, 20, 200], [-5, 7, 50], [30, 30, 128]])
    out = landmarks_to_crop(landmarks, boxes, 128)
    for i in range(4):
        assert np.allclose(out[i], landmarks_to_crop(landmarks[i], boxes[i], 128), atol=1e-4)
    assert np.allclose(out[3], landmarks[3] - [30, 30, 0], atol=1e-4)


# ---------------------------------------------------------------------------------- mediapipe
ASTRONAUT_FACE = (165, 60, 285, 195)  # x0, y0, x1, y1 in the 512x512 portrait


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


def test_mediapipe_is_silent_on_stderr(astronaut, capfd):
    # Its native code logs at start-up and when a model first runs; none of that may reach
    # the user (a failing `neuralhead prepare` must print its error line and nothing else).
    with FaceMeshTracker(static=False) as tracker:
        tracker.process(np.zeros((128, 128, 3), np.uint8))
        assert tracker.process(astronaut) is not None
    with ForegroundSegmenter() as segmenter:
        segmenter.process(astronaut)
    assert capfd.readouterr().err == ""


def test_face_mesh_on_the_astronaut(astronaut):
    with FaceMeshTracker(static=True) as tracker:
        points = tracker.process(astronaut)
        assert tracker.process(np.full((256, 256, 3), 127, np.uint8)) is None
        with pytest.raises(ValueError, match="RGB uint8"):
            tracker.process(astronaut.astype(np.float32))
    assert points.shape == (478, 3) and points.dtype == np.float32
    x0, y0, x1, y1 = ASTRONAUT_FACE
    assert np.all(
        (points[:, 0] > x0) & (points[:, 0] < x1) & (points[:, 1] > y0) & (points[:, 1] < y1)
    )
    # The subject's right eye is on the image's left, the nose below the eyes, above the mouth.
    assert points[T.RIGHT_IRIS_CENTER, 0] < points[T.NOSE_TIP, 0] < points[T.LEFT_IRIS_CENTER, 0]
    assert points[T.RIGHT_IRIS_CENTER, 1] < points[T.NOSE_TIP, 1] < points[T.LIPS_INNER_LOWER[5], 1]
    # z has the scale of x: the face's depth is a fraction of its width, not of 1.
    depth = np.ptp(points[: T.NUM_MESH, 2])
    assert 0.2 < depth / np.ptp(points[: T.NUM_MESH, 0]) < 1.0
    pose = pose_vector(fit_head_pose(points[None]), astronaut.shape[1])[0]
    assert abs(math.degrees(pose[1])) < 10.0  # a frontal portrait
    assert abs(math.degrees(pose[2])) < 10.0


@pytest.mark.parametrize("degrees", [-15.0, 12.0])
def test_face_mesh_roll_follows_an_in_plane_rotation(astronaut, degrees):
    centre = (
        (ASTRONAUT_FACE[0] + ASTRONAUT_FACE[2]) / 2,
        (ASTRONAUT_FACE[1] + ASTRONAUT_FACE[3]) / 2,
    )
    # cv2 turns counter-clockwise on screen for a positive angle; positive roll is clockwise.
    matrix = cv2.getRotationMatrix2D(centre, degrees, 1.0)
    rotated = cv2.warpAffine(astronaut, matrix, (512, 512), borderMode=cv2.BORDER_REPLICATE)
    with FaceMeshTracker(static=True) as tracker:
        poses = pose_vector(
            fit_head_pose(np.stack([tracker.process(astronaut), tracker.process(rotated)])), 512
        )
    roll_change = math.degrees(poses[1, 2] - poses[0, 2])
    assert roll_change == pytest.approx(-degrees, abs=2.0)
    assert np.abs(np.degrees(poses[1, :2] - poses[0, :2])).max() < 3.0


def test_face_mesh_yaw_and_roll_change_sign_in_a_mirror(astronaut):
    with FaceMeshTracker(static=True) as tracker:
        points = np.stack(
            [tracker.process(astronaut), tracker.process(np.ascontiguousarray(astronaut[:, ::-1]))]
        )
    pose = np.degrees(pose_vector(fit_head_pose(points), 512))
    assert pose[1, 2] == pytest.approx(-pose[0, 2], abs=1.5)
    assert pose[1, 1] == pytest.approx(-pose[0, 1], abs=2.0)
    assert pose[1, 0] == pytest.approx(pose[0, 0], abs=2.0)


def test_foreground_mask_of_the_astronaut(astronaut):
    with ForegroundSegmenter() as segmenter:
        mask = segmenter.process(astronaut)
        blank = segmenter.process(np.full((256, 256, 3), 127, np.uint8))
    assert mask.shape == astronaut.shape[:2] and mask.dtype == np.float32
    assert 0.0 <= mask.min() and mask.max() <= 1.0
    assert mask[90:170, 190:260].mean() > 0.95  # eyes, nose and mouth
    assert mask[:60, :60].mean() < 0.1
    assert blank.max() < 0.1
