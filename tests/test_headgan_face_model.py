from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import make_dataset
from scipy.optimize import lsq_linear

from neuralhead.errors import InputError
from neuralhead.geometry.rotation import euler_to_matrix
from neuralhead.headgan.face_model import (
    Correspondence,
    MorphableModel,
    build_face_model,
    face_mesh_triangles,
    ict_correspondence,
    load_ict_facekit,
    read_obj_vertices,
    template_face_model,
)
from neuralhead.headgan.fitting import (
    adapt_camera,
    bounded_least_squares,
    driving_shape,
    fit_frames,
    project,
)
from neuralhead.headgan.renderer import render_ncc
from neuralhead.tracking.template import load_template

V = 468


def random_model(
    k_id: int = 6, k_exp: int = 10, seed: int = 0, orthonormal: bool = True
) -> MorphableModel:
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(3 * V, k_id + k_exp, generator=generator, dtype=torch.float64)
    basis = torch.linalg.qr(raw)[0].T if orthonormal else raw.T / raw.norm(dim=0)[:, None] * 0.7
    std = 0.05 + 0.1 * torch.rand(k_id + k_exp, generator=generator)
    return MorphableModel(
        mean=load_template().vertices[:V],
        identity_basis=basis[:k_id].reshape(k_id, V, 3),
        expression_basis=basis[k_id:].reshape(k_exp, V, 3),
        triangles=face_mesh_triangles(),
        identity_std=std[:k_id],
        expression_std=std[k_id:],
    )


def random_cameras(n: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rand = torch.rand(n, 7, generator=generator)
    return torch.cat(
        [0.4 + 0.2 * rand[:, :1], (rand[:, 1:4] - 0.5) * 0.8, (rand[:, 4:] - 0.5) * 0.4], 1
    )


# --- mesh and model --------------------------------------------------------------------------


def test_triangles_cover_the_tracker_mesh_consistently():
    full = face_mesh_triangles(fill_eyes=True, fill_mouth=True)
    assert full.shape == (898, 3) and full.dtype == torch.long
    assert face_mesh_triangles().shape == (880, 3)
    assert face_mesh_triangles(fill_eyes=False).shape == (852, 3)
    assert int(full.min()) == 0 and int(full.max()) == V - 1
    assert len({tuple(sorted(t)) for t in full.tolist()}) == 898
    directed = Counter((t[k], t[(k + 1) % 3]) for t in full.tolist() for k in range(3))
    # Consistent winding: no edge is run twice in the same direction.
    assert max(directed.values()) == 1
    points = torch.from_numpy(load_template().vertices[:V]).double()[full]
    normal_z = torch.linalg.cross(points[:, 1] - points[:, 0], points[:, 2] - points[:, 0])[:, 2]
    assert (normal_z < 0).float().mean() > 0.95  # most face the camera (-z) on the frontal template


def test_template_model_colours_and_shape():
    model = template_face_model()
    assert model.num_vertices == V and model.num_identity == 0 and model.num_expression == 0
    colours = model.vertex_colors
    assert torch.allclose(colours.min(0).values, torch.zeros(3))
    assert torch.allclose(colours.max(0).values, torch.ones(3))
    nose_tip, forehead = 1, 10  # the nose is nearest the camera, the forehead at the top
    assert colours[nose_tip, 2] < 0.05 and colours[forehead, 1] < 0.05
    assert torch.equal(model.shape(None, None)[0], model.mean)


def test_shape_is_equation_one_and_validates():
    model = random_model()
    p_id, p_exp = torch.randn(4, 6), torch.randn(4, 10)
    expected = model.mean + torch.einsum("bk,kvc->bvc", p_id, model.identity_basis)
    expected = expected + torch.einsum("bk,kvc->bvc", p_exp, model.expression_basis)
    assert torch.allclose(model.shape(p_id, p_exp), expected, atol=1e-6)
    assert torch.allclose(
        driving_shape(model, p_id[0], p_exp), model.shape(p_id[:1].expand(4, -1), p_exp), atol=1e-6
    )
    with pytest.raises(InputError, match="expression coefficients"):
        model.shape(p_id, torch.randn(4, 3))
    with pytest.raises(InputError, match="batch size"):
        model.shape(torch.randn(3, 6), p_exp)
    with pytest.raises(InputError, match="identity_basis"):
        MorphableModel(
            torch.zeros(5, 3),
            torch.zeros(2, 4, 3),
            torch.zeros(0, 5, 3),
            torch.zeros(0, 3, dtype=torch.long),
        )
    with pytest.raises(InputError, match="triangles"):
        MorphableModel(
            torch.zeros(5, 3), torch.zeros(0, 5, 3), torch.zeros(0, 5, 3), torch.tensor([[0, 1, 5]])
        )


def test_save_load_round_trip(tmp_path):
    model = random_model(k_id=2, k_exp=3)
    model.expression_limits = torch.tensor([[0.0, 1.0]] * 3)
    model.expression_names = ("jawOpen", "smile", "blink")
    model.description = "test model"
    model.save(tmp_path / "model.npz")
    loaded = MorphableModel.load(tmp_path / "model.npz")
    for name in (
        "mean",
        "identity_basis",
        "expression_basis",
        "triangles",
        "identity_std",
        "expression_std",
        "expression_limits",
        "vertex_colors",
    ):
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    assert loaded.expression_names == model.expression_names and loaded.description == "test model"
    with pytest.raises(InputError, match="does not exist"):
        MorphableModel.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(InputError, match="not a face model"):
        MorphableModel.load(tmp_path / "other.npz")


# --- learned from prepared datasets ------------------------------------------------------------


def test_build_face_model_from_two_datasets(tmp_path):
    dirs = [
        make_dataset(tmp_path / f"d{k}", num_frames=24, size=16, audio=False, seed=k)
        for k in range(2)
    ]
    model = build_face_model(dirs, num_identity=5, num_expression=28)
    # Two videos give one identity direction. Each video deforms along 4 modes of its own (8 in
    # all); the fake videos' mean shapes differ by a mix of those modes, so one of the 8
    # directions is identity and 7 are left for expression.
    assert model.num_identity == 1 and model.num_expression == 7
    assert model.triangles.shape == (880, 3)
    flat = torch.cat([model.identity_basis, model.expression_basis]).reshape(8, -1).double()
    assert torch.allclose(flat @ flat.T, torch.eye(8, dtype=torch.float64), atol=1e-5)
    means = []
    for d in dirs:
        canonical = np.load(d / "canonical.npy")[:22, :V].astype(np.float64)  # 22 training frames
        means.append(canonical.mean(0))
    assert np.allclose(model.mean.numpy(), (means[0] + means[1]) / 2, atol=1e-5)
    direction = (means[0] - means[1]).reshape(-1)
    cosine = abs(flat[0].numpy() @ direction) / np.linalg.norm(direction)
    assert cosine > 0.9999
    assert np.isclose(float(model.identity_std[0]), np.linalg.norm(direction) / 2, rtol=1e-4)
    assert torch.all(model.expression_std[:-1] >= model.expression_std[1:])
    # Each video's variation is explained by the two bases together.
    canonical = np.load(dirs[0] / "canonical.npy")[:22, :V].astype(np.float64).reshape(22, -1)
    deviation = canonical - canonical.mean(0)
    residual = deviation - deviation @ flat.numpy().T @ flat.numpy()
    assert np.abs(residual).max() < 1e-4 * np.abs(deviation).max() + 1e-6


def test_build_face_model_from_one_dataset_has_no_identity(tmp_path, caplog):
    data = make_dataset(tmp_path / "d", num_frames=24, size=16, audio=False)
    with caplog.at_level(logging.WARNING):
        model = build_face_model([data], num_expression=2, max_frames_per_video=10)
    assert model.num_identity == 0 and model.num_expression == 2
    assert "K_id = 0" in caplog.text
    with pytest.raises(InputError, match="not a prepared dataset"):
        build_face_model([tmp_path])


# --- fitting ---------------------------------------------------------------------------------


def test_fit_recovers_coefficients_and_camera():
    model = random_model()
    generator = torch.Generator().manual_seed(2)
    n = 12
    p_id = (torch.rand(n, 6, generator=generator) * 4 - 2) * model.identity_std
    p_exp = (torch.rand(n, 10, generator=generator) * 4 - 2) * model.expression_std
    cameras = random_cameras(n)
    landmarks = project(model.shape(p_id, p_exp), cameras, 256)
    iris = torch.zeros(n, 10, 3)  # the tracker's extra points are ignored
    fit = fit_frames(model, torch.cat([landmarks, iris], 1), 256)
    assert (
        fit.identity.shape == (n, 6)
        and fit.expression.shape == (n, 10)
        and fit.camera.shape == (n, 7)
    )
    assert torch.allclose(fit.identity, p_id, atol=1e-4)
    assert torch.allclose(fit.expression, p_exp, atol=1e-4)
    assert torch.allclose(fit.camera, cameras, atol=1e-4)
    assert fit.residual.max() < 1e-3
    # Rendering the fitted parameters reproduces the landmarks and the render.
    refit = project(model.shape(fit.identity, fit.expression), fit.camera, 256)
    assert torch.allclose(refit, landmarks, atol=1e-2)
    truth = render_ncc(landmarks[:2], model.triangles, model.vertex_colors, 64)
    again = render_ncc(refit[:2], model.triangles, model.vertex_colors, 64)
    assert (truth - again).abs().gt(1e-3).float().mean() < 1e-3


def test_fit_with_shared_identity():
    model = random_model(seed=3)
    n = 8
    p_id = (0.5 * model.identity_std).expand(n, -1)
    p_exp = (
        torch.rand(n, 10, generator=torch.Generator().manual_seed(4)) * 4 - 2
    ) * model.expression_std
    landmarks = project(model.shape(p_id, p_exp), random_cameras(n, seed=5), 512)
    fit = fit_frames(model, landmarks.numpy(), 512, share_identity=True)
    assert torch.allclose(fit.identity, fit.identity[:1].expand(n, -1))
    assert torch.allclose(fit.identity, p_id, atol=1e-4)
    assert torch.allclose(fit.expression, p_exp, atol=1e-4)


def test_fit_respects_bounds():
    model = random_model()
    p_exp = torch.zeros(2, 10)
    p_exp[0, 0] = 5.0 * model.expression_std[0]  # beyond +3 std
    p_exp[1, 3] = -4.0 * model.expression_std[3]
    landmarks = project(model.shape(None, p_exp), random_cameras(2), 256)
    fit = fit_frames(model, landmarks, 256, bound=3.0)
    lower, upper = model.coefficient_bounds(3.0)
    coefficients = torch.cat([fit.identity, fit.expression], 1)
    assert torch.all(coefficients >= lower - 1e-6) and torch.all(coefficients <= upper + 1e-6)
    assert torch.isclose(fit.expression[0, 0], 3.0 * model.expression_std[0], rtol=1e-3)
    assert torch.isclose(fit.expression[1, 3], -3.0 * model.expression_std[3], rtol=1e-3)
    assert fit.residual.min() > 0.1  # what the bounds cut off stays unexplained


def test_bounded_least_squares_matches_scipy_for_correlated_bases():
    generator = torch.Generator().manual_seed(6)
    basis = torch.randn(30, 5, generator=generator, dtype=torch.float64)
    basis[:, 1] += 0.8 * basis[:, 0]  # correlated columns: not a clipped projection
    target = torch.randn(3, 30, generator=generator, dtype=torch.float64) * 2
    lower, upper = (
        torch.full((5,), -0.3, dtype=torch.float64),
        torch.full((5,), 0.5, dtype=torch.float64),
    )
    ours = bounded_least_squares(basis.T @ basis, target @ basis, lower, upper)
    for k in range(3):
        reference = lsq_linear(basis.numpy(), target[k].numpy(), bounds=(-0.3, 0.5)).x
        assert np.allclose(ours[k].numpy(), reference, atol=1e-6)


def test_fit_input_errors():
    model = random_model()
    with pytest.raises(InputError, match="landmarks"):
        fit_frames(model, torch.zeros(2, 100, 3), 256)
    with pytest.raises(InputError, match="image_size"):
        fit_frames(model, torch.zeros(2, V, 3), (256, 256))
    with pytest.raises(InputError, match="bound"):
        fit_frames(model, torch.rand(2, V, 3), 256, bound=0.0)
    with pytest.raises(InputError, match="camera"):
        project(model.mean, torch.zeros(2, 6), 256)


# --- camera adaptation -----------------------------------------------------------------------


def test_adapt_camera_moving_average():
    driver = torch.tensor(
        [
            [0.5, 0.1, 0.2, 0.0, 0.1, 0.0, 0.0],
            [1.0, 0.2, 0.3, 0.1, 0.3, -0.2, 0.0],
            [0.5, 0.0, 0.1, 0.0, 0.1, 0.0, 0.1],
        ]
    )
    reference = torch.tensor([0.25, 0.0, 0.0, 0.0, -0.5, 0.5, 0.0])
    out = adapt_camera(driver, reference, momentum=0.5)
    # Running averages: log-scale log(.5), (log(.5) + log(1)) / 2, ...; translation likewise.
    log_avg = [np.log(0.5), 0.5 * np.log(0.5), 0.5 * 0.5 * np.log(0.5) + 0.5 * np.log(0.5)]
    t_avg = [np.array([0.1, 0.0, 0.0]), np.array([0.2, -0.1, 0.0]), np.array([0.15, -0.05, 0.05])]
    for t in range(3):
        ratio = 0.25 / np.exp(log_avg[t])
        assert np.isclose(
            float(out[t, 0]), 0.25 * float(driver[t, 0]) / np.exp(log_avg[t]), rtol=1e-5
        )
        expected_t = reference[4:].numpy() + (driver[t, 4:].numpy() - t_avg[t]) * ratio
        assert np.allclose(out[t, 4:].numpy(), expected_t, atol=1e-6)
    assert torch.allclose(out[:, 1:4], driver[:, 1:4])  # absolute rotation by default
    assert torch.allclose(out[0, [0, 4, 5, 6]], reference[[0, 4, 5, 6]])
    pinned = adapt_camera(driver, reference, momentum=0.0)
    assert torch.allclose(pinned[:, [0, 4, 5, 6]], reference[[0, 4, 5, 6]].expand(3, -1), atol=1e-6)
    anchored = adapt_camera(driver, reference, momentum=1.0)  # relative to the driver's first frame
    assert torch.allclose(anchored[1, 0], torch.tensor(0.5))
    assert torch.allclose(anchored[1, 4], torch.tensor(-0.4))


def test_adapt_camera_relative_rotation():
    driver = torch.zeros(2, 7)
    driver[:, 0] = 0.5
    driver[0, 1:4] = torch.tensor([0.1, 0.3, -0.1])
    driver[1, 1:4] = torch.tensor([0.2, 0.1, 0.05])
    reference = torch.tensor([0.5, -0.2, 0.4, 0.1, 0.0, 0.0, 0.0])
    out = adapt_camera(driver, reference, relative=True)
    rot = euler_to_matrix(out[:, 1:4].double())
    ref_rot = euler_to_matrix(reference[1:4].double())
    assert torch.allclose(rot[0], ref_rot, atol=1e-6)  # first frame: the reference's pose
    drot = euler_to_matrix(driver[:, 1:4].double())
    assert torch.allclose(rot[1], drot[1] @ drot[0].T @ ref_rot, atol=1e-6)
    with pytest.raises(InputError, match="momentum"):
        adapt_camera(driver, reference, momentum=1.5)


# --- ICT-FaceKit -----------------------------------------------------------------------------

ICT_TO_TEMPLATE_SCALE = 7.0  # the fake ICT mesh is in "centimetres", y up and z towards the viewer


def to_fake_ict(points: np.ndarray) -> np.ndarray:
    return points * ICT_TO_TEMPLATE_SCALE * np.array([1.0, -1.0, -1.0]) + np.array([0.5, 16.0, 3.0])


def write_obj(path: Path, vertices: np.ndarray) -> None:
    lines = ["# fake ICT mesh", "mtllib x.mtl"] + [
        f"v {x:.9f} {y:.9f} {z:.9f} 0.5 0.5 0.5" for x, y, z in vertices
    ]
    lines += ["vt 0.1 0.2", "vn 0 0 1", "f 1/1/1 2/1/1 3/1/1 4/1/1"]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def fake_ict(tmp_path):
    """A FaceXModel folder: the template (shuffled, plus 30 extra vertices) in ICT's frame."""
    rng = np.random.default_rng(0)
    template = load_template().vertices[:V].astype(np.float64)
    extra = rng.normal(size=(30, 3)) * 3 + np.array([0.0, 0.0, 5.0])  # behind the face
    order = rng.permutation(V + 30)
    neutral = to_fake_ict(np.concatenate([template, extra]))[order]
    where = np.argsort(order)[:V]  # ICT index of each template point
    root = tmp_path / "FaceXModel"
    root.mkdir()
    write_obj(root / "generic_neutral_mesh.obj", neutral)
    deltas = {}
    names = ["identity000", "identity001", "jawOpen", "eyeBlink_L"]
    for name in names:
        delta = rng.normal(size=neutral.shape) * 0.1
        write_obj(root / f"{name}.obj", neutral + delta)
        deltas[name] = delta
    (root / "vertex_indices.json").write_text(
        json.dumps({"expressions": ["jawOpen", "eyeBlink_L"]})
    )
    return root, where, deltas


def test_read_obj_vertices(tmp_path):
    write_obj(tmp_path / "m.obj", np.arange(12.0).reshape(4, 3))
    assert np.allclose(read_obj_vertices(tmp_path / "m.obj"), np.arange(12.0).reshape(4, 3))
    (tmp_path / "empty.obj").write_text("f 1 2 3\n")
    with pytest.raises(InputError, match="no vertices"):
        read_obj_vertices(tmp_path / "empty.obj")


def test_load_ict_facekit_with_a_given_correspondence(fake_ict):
    root, where, deltas = fake_ict
    model = load_ict_facekit(root, where, num_identity=2)
    assert model.num_identity == 2 and model.num_expression == 2
    assert model.expression_names == ("jawOpen", "eyeBlink_L")
    template = load_template().vertices[:V]
    assert np.allclose(model.mean.numpy(), template, atol=1e-5)  # back in template space
    # Modes are the ICT displacements at the corresponding vertices, rotated and scaled back.
    back = np.array([1.0, -1.0, -1.0]) / ICT_TO_TEMPLATE_SCALE
    assert np.allclose(
        model.identity_basis[1].numpy(), deltas["identity001"][where] * back, atol=1e-5
    )
    assert np.allclose(
        model.expression_basis[0].numpy(), deltas["jawOpen"][where] * back, atol=1e-5
    )
    assert torch.equal(model.expression_limits, torch.tensor([[0.0, 1.0]] * 2))
    # A blendshape model is fitted by the bounded solver: weights stay in [0, 1].
    p_exp = torch.tensor([[0.7, 0.2], [1.5, 0.0]])
    landmarks = project(model.shape(torch.tensor([0.5, -1.0]), p_exp), random_cameras(2), 256)
    fit = fit_frames(model, landmarks, 256)
    assert torch.allclose(fit.expression[0], p_exp[0], atol=1e-3)
    assert fit.expression.min() >= 0 and fit.expression.max() <= 1 + 1e-6
    barycentric = Correspondence(np.stack([where] * 3, 1), np.full((V, 3), 1 / 3))
    assert np.allclose(
        load_ict_facekit(root, barycentric, num_identity=0).mean.numpy(), template, atol=1e-5
    )


def test_ict_correspondence_from_anchors(fake_ict):
    root, where, _ = fake_ict
    neutral = read_obj_vertices(root / "generic_neutral_mesh.obj")
    anchors = {k: int(where[k]) for k in (1, 33, 263, 61, 291, 152)}
    assert np.array_equal(ict_correspondence(neutral, anchors=anchors), where)
    with pytest.raises(InputError, match="anchors"):  # the default anchors index ICT's real mesh
        load_ict_facekit(root, None, num_identity=1)


def test_load_ict_facekit_errors(fake_ict, tmp_path):
    root, where, _ = fake_ict
    with pytest.raises(InputError, match="generic_neutral_mesh"):
        load_ict_facekit(tmp_path, where)
    with pytest.raises(InputError, match="identity meshes"):
        load_ict_facekit(root, where, num_identity=3)
    with pytest.raises(InputError, match="correspondence"):
        load_ict_facekit(root, where[:100], num_identity=1)
    np.save(tmp_path / "corr.npy", where)
    assert load_ict_facekit(root, tmp_path / "corr.npy", num_identity=1).num_identity == 1
