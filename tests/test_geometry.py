"""Rotations and similarity transforms: Euler round trips, the documented sign conventions,
geodesic angles near 0 and 180 degrees, Umeyama's fit recovering a known transform, and the 6D
representation (Gram–Schmidt) of EMOPortraits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuralhead.errors import InputError
from neuralhead.geometry.rotation import (
    euler_to_matrix,
    euler_to_rotation_6d,
    matrix_to_euler,
    matrix_to_rotation_6d,
    rotation_6d_to_euler,
    rotation_6d_to_matrix,
    rotation_angle,
    similarity_transform,
)

FACE_NORMAL = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)


def random_angles(n: int, seed: int = 0, max_yaw_deg: float = 80.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    angles = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    angles[:, 1] *= max_yaw_deg / 180.0
    return angles


def axis_angle(axis: list[float], angle: float) -> torch.Tensor:
    """Rodrigues' formula, independent of the Euler code under test."""
    k = torch.tensor(axis, dtype=torch.float64)
    k = k / k.norm()
    kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
    return (
        torch.eye(3, dtype=torch.float64) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx
    )


def test_euler_round_trip():
    angles = random_angles(1000)
    back = matrix_to_euler(euler_to_matrix(angles))
    assert torch.allclose(back, angles, atol=1e-9)


def test_euler_round_trip_float32():
    angles = random_angles(1000, seed=1).float()
    back = matrix_to_euler(euler_to_matrix(angles))
    assert (back - angles).abs().max() < 1e-3


def test_matrices_are_proper_rotations():
    rot = euler_to_matrix(random_angles(200, seed=2, max_yaw_deg=180.0))
    eye = torch.eye(3, dtype=torch.float64).expand_as(rot)
    assert torch.allclose(rot @ rot.transpose(-1, -2), eye, atol=1e-12)
    assert torch.allclose(torch.det(rot), torch.ones(200, dtype=torch.float64), atol=1e-12)


def test_batch_shapes_are_kept():
    angles = random_angles(24).reshape(2, 3, 4, 3)
    rot = euler_to_matrix(angles)
    assert rot.shape == (2, 3, 4, 3, 3)
    assert matrix_to_euler(rot).shape == (2, 3, 4, 3)


@pytest.mark.parametrize("degrees", [5.0, 30.0, 60.0])
def test_sign_conventions(degrees):
    a = math.radians(degrees)
    pitch, yaw, roll = (euler_to_matrix(torch.tensor(v, dtype=torch.float64)) for v in
                        ([a, 0, 0], [0, a, 0], [0, 0, a]))  # fmt: skip
    # Positive yaw turns the face towards the image's left (-x), and only about y.
    normal = yaw @ FACE_NORMAL
    assert normal[0] < 0 and abs(normal[1]) < 1e-12
    assert normal[0] == pytest.approx(-math.sin(a))
    # Positive pitch turns the face downwards (+y in the image).
    normal = pitch @ FACE_NORMAL
    assert normal[1] > 0 and abs(normal[0]) < 1e-12
    assert normal[1] == pytest.approx(math.sin(a))
    # Positive roll turns +x towards +y: clockwise on screen, in the image plane.
    x_axis = roll @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert x_axis[1] == pytest.approx(math.sin(a)) and x_axis[0] == pytest.approx(math.cos(a))
    assert abs(x_axis[2]) < 1e-12
    assert torch.allclose(roll @ FACE_NORMAL, FACE_NORMAL)


def test_composition_order_is_roll_yaw_pitch():
    angles = torch.tensor([0.3, -0.5, 0.7], dtype=torch.float64)
    parts = [euler_to_matrix(torch.tensor(v, dtype=torch.float64)) for v in
             ([0, 0, 0.7], [0, -0.5, 0], [0.3, 0, 0])]  # fmt: skip
    assert torch.allclose(euler_to_matrix(angles), parts[0] @ parts[1] @ parts[2], atol=1e-12)


def test_rotation_then_transpose_returns_the_input():
    rot = euler_to_matrix(random_angles(50, seed=3))
    points = torch.randn(50, 20, 3, dtype=torch.float64)
    rotated = points @ rot.transpose(-1, -2)
    back = rotated @ rot
    assert torch.allclose(back, points, atol=1e-12)
    # Lengths are kept.
    assert torch.allclose(rotated.norm(dim=-1), points.norm(dim=-1), atol=1e-12)


def test_gimbal_lock_gives_the_same_matrix():
    for sign in (1.0, -1.0):
        angles = torch.tensor([0.4, sign * math.pi / 2, 0.1], dtype=torch.float64)
        rot = euler_to_matrix(angles)
        back = matrix_to_euler(rot)
        assert torch.isfinite(back).all()
        assert back[2] == 0.0
        assert torch.allclose(euler_to_matrix(back), rot, atol=1e-6)


@pytest.mark.parametrize("axis", [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 2, -3]])
@pytest.mark.parametrize("degrees", [30.0, 90.0, 150.0])
def test_rotation_angle_of_a_known_rotation(axis, degrees):
    r1 = euler_to_matrix(torch.tensor([0.2, -0.4, 0.9], dtype=torch.float64))
    r2 = r1 @ axis_angle(axis, math.radians(degrees))
    assert math.degrees(rotation_angle(r1, r2)) == pytest.approx(degrees, abs=1e-9)
    assert math.degrees(rotation_angle(r2, r1)) == pytest.approx(degrees, abs=1e-9)


@pytest.mark.parametrize("angle", [0.0, 1e-7, 1e-5, 1e-3])
def test_rotation_angle_near_zero_and_near_180(angle):
    r1 = euler_to_matrix(torch.tensor([-0.3, 0.6, 2.0], dtype=torch.float64))
    near_zero = rotation_angle(r1, r1 @ axis_angle([2, -1, 1], angle))
    assert float(near_zero) == pytest.approx(angle, abs=1e-12)
    near_pi = rotation_angle(r1, r1 @ axis_angle([2, -1, 1], math.pi - angle))
    assert float(near_pi) == pytest.approx(math.pi - angle, abs=1e-7)


def test_rotation_angle_near_zero_in_float32():
    # acos(1 - x) loses everything below ~0.03 degrees in float32; atan2 does not.
    r1 = euler_to_matrix(torch.tensor([0.1, 0.2, 0.3]))
    r2 = r1 @ axis_angle([0, 1, 0], 1e-4).float()
    assert float(rotation_angle(r1, r2)) == pytest.approx(1e-4, rel=0.05)


def known_similarity(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(batch, 40, 3, generator=g, dtype=torch.float64)
    scale = 0.5 + 2 * torch.rand(batch, generator=g, dtype=torch.float64)
    rot = euler_to_matrix(random_angles(batch, seed=seed + 10))
    trans = 10 * torch.randn(batch, 3, generator=g, dtype=torch.float64)
    target = scale[:, None, None] * source @ rot.transpose(-1, -2) + trans[:, None, :]
    return source, target, scale, rot, trans


def test_similarity_recovers_a_known_transform():
    source, target, scale, rot, trans = known_similarity(8)
    s, r, t = similarity_transform(source, target)
    assert s.shape == (8,) and r.shape == (8, 3, 3) and t.shape == (8, 3)
    assert torch.allclose(s, scale, atol=1e-10)
    assert torch.allclose(r, rot, atol=1e-10)
    assert torch.allclose(t, trans, atol=1e-9)


def test_similarity_unbatched_and_with_weights():
    source, target, scale, rot, trans = known_similarity(1, seed=4)
    weights = torch.rand(1, 40, dtype=torch.float64) + 0.1
    s, r, t = similarity_transform(source[0], target[0], weights[0])
    assert s.shape == () and r.shape == (3, 3) and t.shape == (3,)
    assert torch.allclose(s, scale[0], atol=1e-10)
    assert torch.allclose(r, rot[0], atol=1e-10)
    assert torch.allclose(t, trans[0], atol=1e-9)


def test_similarity_weights_ignore_outliers():
    source, target, scale, rot, trans = known_similarity(3, seed=5)
    corrupted = target.clone()
    corrupted[:, :10] += 50 * torch.randn(3, 10, 3, dtype=torch.float64)
    weights = torch.ones(3, 40, dtype=torch.float64)
    weights[:, :10] = 0.0
    s, r, t = similarity_transform(source, corrupted, weights)
    assert torch.allclose(s, scale, atol=1e-10)
    assert torch.allclose(r, rot, atol=1e-10)
    assert torch.allclose(t, trans, atol=1e-9)
    # Without the weights, the outliers do move the fit: the weights are what helped.
    s_plain, _, _ = similarity_transform(source, corrupted)
    assert not torch.allclose(s_plain, scale, atol=1e-3)


def test_similarity_never_returns_a_reflection():
    source, target, _, _, _ = known_similarity(16, seed=6)
    mirrored = target * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    s, r, _ = similarity_transform(source, mirrored)
    assert torch.allclose(torch.det(r), torch.ones(16, dtype=torch.float64), atol=1e-10)
    eye = torch.eye(3, dtype=torch.float64).expand_as(r)
    assert torch.allclose(r @ r.transpose(-1, -2), eye, atol=1e-10)
    assert (s > 0).all()


def test_similarity_of_planar_points_is_a_rotation():
    # Points in a plane leave one direction undetermined; the result must still be proper.
    rng = np.random.default_rng(7)
    source = torch.from_numpy(np.c_[rng.standard_normal((30, 2)), np.zeros(30)])
    rot = euler_to_matrix(torch.tensor([0.3, 0.2, -1.0], dtype=torch.float64))
    s, r, _ = similarity_transform(source, 2.0 * source @ rot.T + 1.0)
    assert float(torch.det(r)) == pytest.approx(1.0)
    assert float(s) == pytest.approx(2.0)
    assert torch.allclose(r, rot, atol=1e-10)


def test_rotation_6d_of_a_hand_computed_input():
    # a1 = (0, 3, 0), a2 = (5, 0, 2): b1 = e_y, b2 = a2 / |a2| (already orthogonal to b1),
    # b3 = b1 x b2 = (2, 0, -5) / sqrt(29).
    x = torch.tensor([0.0, 3.0, 0.0, 5.0, 0.0, 2.0], dtype=torch.float64)
    root = math.sqrt(29.0)
    expected = torch.tensor(
        [[0.0, 5 / root, 2 / root], [1.0, 0.0, 0.0], [0.0, 2 / root, -5 / root]],
        dtype=torch.float64,
    )
    assert torch.allclose(rotation_6d_to_matrix(x), expected, atol=1e-12)


def test_rotation_6d_uses_columns_and_projects_the_second():
    # The columns are (2, 0, 0) and (1, 1, 0): normalised and with e_x removed they are e_x, e_y.
    x = torch.tensor([2.0, 0.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(rotation_6d_to_matrix(x), torch.eye(3, dtype=torch.float64))
    rot = euler_to_matrix(random_angles(5, seed=8))
    six = matrix_to_rotation_6d(rot)
    assert torch.equal(six[:, :3], rot[:, :, 0]) and torch.equal(six[:, 3:], rot[:, :, 1])


def test_rotation_6d_round_trips():
    rot = euler_to_matrix(random_angles(500, seed=9, max_yaw_deg=180.0))
    assert torch.allclose(rotation_6d_to_matrix(matrix_to_rotation_6d(rot)), rot, atol=1e-12)
    g = torch.Generator().manual_seed(10)
    six = matrix_to_rotation_6d(
        rotation_6d_to_matrix(torch.randn(500, 6, generator=g, dtype=torch.float64))
    )
    assert torch.allclose(matrix_to_rotation_6d(rotation_6d_to_matrix(six)), six, atol=1e-12)
    angles = random_angles(500, seed=11)
    assert torch.allclose(rotation_6d_to_euler(euler_to_rotation_6d(angles)), angles, atol=1e-9)


def test_rotation_6d_of_random_input_is_a_proper_rotation():
    torch.manual_seed(0)
    six = 3 * torch.randn(2, 100, 6)
    rot = rotation_6d_to_matrix(six)
    assert rot.shape == (2, 100, 3, 3)
    eye = torch.eye(3).expand_as(rot)
    assert torch.allclose(rot @ rot.transpose(-1, -2), eye, atol=1e-5)
    assert torch.allclose(torch.det(rot), torch.ones(2, 100), atol=1e-5)
    # The first column keeps the direction of a1 and the second stays in the plane of a1, a2.
    a1 = six[..., :3] / six[..., :3].norm(dim=-1, keepdim=True)
    assert torch.allclose(rot[..., :, 0], a1, atol=1e-6)
    assert torch.allclose((rot[..., :, 2] * six[..., 3:]).sum(-1), torch.zeros(2, 100), atol=1e-4)


def test_rotation_6d_gradients_reach_every_input():
    torch.manual_seed(1)
    six = torch.randn(4, 6, requires_grad=True)
    target = euler_to_matrix(torch.randn(4, 3))
    (rotation_6d_to_matrix(six) - target).square().sum().backward()
    assert torch.isfinite(six.grad).all()
    assert (six.grad.abs().sum(0) > 0).all()


@pytest.mark.parametrize(
    ("function", "shape", "message"),
    [
        (rotation_6d_to_matrix, (4, 9), r"rotation_6d must have shape \(\.\.\., 6\), got \(4, 9\)"),
        (matrix_to_rotation_6d, (4, 3, 2), r"matrix must have shape \(\.\.\., 3, 3\)"),
        (matrix_to_rotation_6d, (3,), r"matrix must have shape"),
        (euler_to_rotation_6d, (4, 6), r"angles must have shape \(\.\.\., 3\)"),
        (rotation_6d_to_euler, (3, 3), r"rotation_6d must have shape"),
    ],
)
def test_rotation_6d_rejects_bad_shapes(function, shape, message):
    with pytest.raises(InputError, match=message):
        function(torch.zeros(shape))
