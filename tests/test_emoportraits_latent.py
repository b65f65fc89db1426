"""EMOPortraits latent expression space: PCA and AUC_z (Eq. 1), the mouth PCA loss (Eq. 6),
the still upper face and mouth basis (Sec. 5.2) and the Fig. 3 analysis."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fake_data import make_dataset

from neuralhead.emoportraits import preset
from neuralhead.emoportraits.latent_space import (
    ExpressionPCA,
    add_analyse_arguments,
    add_components_arguments,
    add_mouth_basis_arguments,
    analyse,
    auc_z,
    component_effects,
    explained_variance,
    expression_codes,
    freeze_upper_face,
    mouth_basis,
    pca_loss,
    run_analyse,
    run_components,
    run_mouth_basis,
    upper_face_mask,
    write_component_figure,
)
from neuralhead.emoportraits.losses import landmark_region_masks
from neuralhead.errors import InputError, NoFaceError
from neuralhead.megaportraits import MegaPortraitsBase
from neuralhead.megaportraits.base_model import DriverMotion
from neuralhead.tracking.template import load_template


def hadamard_columns(d: int) -> torch.Tensor:
    """``(2^m, d)`` zero-mean, mutually orthogonal ±1 columns (Sylvester's Hadamard matrix)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d + 1:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h[:, 1 : d + 1]


def rotation(d: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return q


# ------------------------------------------------------------------------------ PCA, Eq. 1


def test_pca_recovers_known_axes_and_variances():
    # Four samples on three orthogonal zero-mean axes with spreads 3, 2, 1: variances in the
    # ratio 9 : 4 : 1, along the columns of a rotation.
    axes = rotation(3)
    data = hadamard_columns(3) * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    z = data @ axes.T + torch.tensor([5.0, -1.0, 2.0], dtype=torch.float64)
    pca = ExpressionPCA.fit(z, standardize=False)
    assert torch.allclose(pca.explained_variance, torch.tensor([9, 4, 1], dtype=torch.float64) / 14)
    assert torch.allclose(
        (pca.components @ axes).abs(), torch.eye(3, dtype=torch.float64), atol=1e-9
    )
    assert torch.allclose(pca.components @ pca.components.T, torch.eye(3, dtype=torch.float64))
    assert torch.allclose(pca.mean, torch.tensor([5.0, -1.0, 2.0], dtype=torch.float64))
    assert torch.equal(pca.scale, torch.ones(3, dtype=torch.float64))
    # The coefficients of a sample are its spreads along the axes (up to each axis' sign).
    assert torch.allclose(pca.project(z).abs(), data.abs(), atol=1e-9)


def test_standardisation_divides_by_the_deviation():
    # Independent axes with different spreads: standardised, every direction has the same
    # variance (Eq. 1's Z_std), so each component explains 1/d.
    z = hadamard_columns(7) * torch.arange(1.0, 8.0, dtype=torch.float64)
    pca = ExpressionPCA.fit(z)
    assert torch.allclose(pca.scale, z.std(0))
    assert torch.allclose(pca.explained_variance, torch.full((7,), 1 / 7, dtype=torch.float64))


def test_auc_z_of_isotropic_and_rank_one_codes():
    d = 7
    isotropic = hadamard_columns(d) * torch.arange(1.0, d + 1.0, dtype=torch.float64)
    assert auc_z(isotropic) == pytest.approx((d + 1) / (2 * d))
    torch.manual_seed(0)
    line = torch.randn(50, 1) * torch.randn(1, 16) + torch.randn(16)
    assert auc_z(line) == pytest.approx(1.0, abs=1e-5)
    ratios = explained_variance(line)
    assert ratios.shape == (16,)
    assert float(ratios[0]) == pytest.approx(1.0, abs=1e-5)
    assert bool((ratios[:-1] >= ratios[1:]).all())


def test_fit_keeps_components_and_float_dtype():
    torch.manual_seed(0)
    z = torch.randn(40, 6)
    pca = ExpressionPCA.fit(z, num_components=4)
    assert pca.components.shape == (4, 6) and pca.components.dtype == torch.float32
    assert pca.explained_variance.shape == (4,)
    assert float(pca.explained_variance.sum()) < 1.0
    assert pca.project(z, 2).shape == (40, 2)
    full = ExpressionPCA.fit(z)
    assert torch.allclose(full.explained_variance[:4], pca.explained_variance)
    # With every component kept, reconstruct undoes project.
    assert torch.allclose(full.reconstruct(full.project(z)), z, atol=1e-5)


def test_constant_dimension_keeps_unit_scale():
    torch.manual_seed(0)
    z = torch.cat([torch.randn(10, 3), torch.full((10, 1), 2.0)], 1)
    pca = ExpressionPCA.fit(z)
    assert float(pca.scale[3]) == 1.0
    assert float(pca.explained_variance[3]) == pytest.approx(0.0, abs=1e-6)


def test_replace_components_swaps_only_the_first_coefficients():
    torch.manual_seed(0)
    pca = ExpressionPCA.fit(torch.randn(64, 8) * torch.linspace(0.5, 3, 8))
    z_keep, z_from = torch.randn(5, 8), torch.randn(5, 8)
    mixed = pca.replace_components(z_keep, z_from, 3)
    assert mixed.shape == (5, 8)
    assert torch.allclose(pca.project(mixed)[:, :3], pca.project(z_from)[:, :3], atol=1e-5)
    assert torch.allclose(pca.project(mixed)[:, 3:], pca.project(z_keep)[:, 3:], atol=1e-5)
    assert torch.allclose(pca.replace_components(z_keep, z_keep, 3), z_keep)
    # With fewer components kept, what lies outside them is kept from z_keep too.
    partial = ExpressionPCA.fit(torch.randn(64, 8), num_components=4)
    mixed = partial.replace_components(z_keep, z_from, 2)
    outside = (mixed - z_keep) / partial.scale
    assert torch.allclose(
        outside,
        (partial.project(mixed, 2) - partial.project(z_keep, 2)) @ partial.components[:2],
        atol=1e-5,
    )


def test_pca_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    pca = ExpressionPCA.fit(torch.randn(30, 5), num_components=3)
    path = tmp_path / "sub" / "mouth.safetensors"
    pca.save(path)
    loaded = ExpressionPCA.load(path)
    for name in ("mean", "scale", "components", "explained_variance"):
        assert torch.equal(getattr(loaded, name), getattr(pca, name))
    assert (loaded.dim, loaded.num_components) == (5, 3)


def test_pca_load_errors(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        ExpressionPCA.load(tmp_path / "none.safetensors")
    from safetensors.torch import save_file

    save_file({"mean": torch.zeros(3)}, str(tmp_path / "other.safetensors"), {"format": "else"})
    with pytest.raises(InputError, match="not an expression PCA file"):
        ExpressionPCA.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="cannot read"):
        ExpressionPCA.load(tmp_path / "junk.safetensors")


def test_pca_input_errors():
    torch.manual_seed(0)
    with pytest.raises(InputError, match="at least 2 codes"):
        ExpressionPCA.fit(torch.randn(1, 4))
    with pytest.raises(InputError, match=r"shape \(N, d\)"):
        ExpressionPCA.fit(torch.randn(4))
    with pytest.raises(InputError, match="num_components must be between 1 and 4"):
        ExpressionPCA.fit(torch.randn(10, 4), num_components=5)
    with pytest.raises(InputError, match="all equal"):
        ExpressionPCA.fit(torch.ones(5, 4))
    with pytest.raises(InputError, match="NaN"):
        ExpressionPCA.fit(torch.tensor([[0.0, 1.0], [float("nan"), 2.0]]))
    pca = ExpressionPCA.fit(torch.randn(10, 4), num_components=2)
    with pytest.raises(InputError, match=r"\(\.\.\., 4\)"):
        pca.project(torch.randn(3, 5))
    with pytest.raises(InputError, match="has 2 components; asked for 3"):
        pca.project(torch.randn(3, 4), 3)
    with pytest.raises(InputError, match="has 2 components"):
        pca.reconstruct(torch.randn(3, 3))
    with pytest.raises(InputError, match="z_from"):
        pca.replace_components(torch.randn(3, 4), torch.randn(3, 2), 1)


# ------------------------------------------------------------------------------ Eq. 6


def test_pca_loss_values():
    torch.manual_seed(0)
    pca = ExpressionPCA.fit(torch.randn(50, 6) * torch.linspace(1, 2, 6))
    z = torch.randn(4, 6)
    assert float(pca_loss(z, z, pca, n=3)) == 0.0
    # A shift of 0.6 along the first component changes PC(1) by 0.6 and no other: 0.6 / n.
    shifted = z + 0.6 * pca.scale * pca.components[0]
    assert float(pca_loss(z, shifted, pca, n=3)) == pytest.approx(0.2, abs=1e-5)
    # A shift along the fourth component is outside the first three.
    beyond = z + 0.6 * pca.scale * pca.components[3]
    assert float(pca_loss(z, beyond, pca, n=3)) == pytest.approx(0.0, abs=1e-5)
    # Per sample: |1| and |3| along the second component average to 2 / n.
    moved = z + torch.tensor([[1.0], [-3.0], [1.0], [-3.0]]) * pca.scale * pca.components[1]
    assert float(pca_loss(z, moved, pca, n=2)) == pytest.approx(1.0, abs=1e-5)


def test_pca_loss_gradients_reach_both_codes():
    torch.manual_seed(0)
    pca = ExpressionPCA.fit(torch.randn(50, 6))
    z_i = torch.randn(3, 6, requires_grad=True)
    z_j = torch.randn(3, 6, requires_grad=True)
    pca_loss(z_i, z_j, pca, n=4).backward()
    assert z_i.grad is not None and z_j.grad is not None
    assert float(z_i.grad.abs().sum()) > 0
    assert torch.allclose(z_i.grad, -z_j.grad)


def test_pca_loss_errors():
    pca = ExpressionPCA.fit(torch.randn(20, 6), num_components=4)
    with pytest.raises(InputError, match="equal shape"):
        pca_loss(torch.randn(2, 6), torch.randn(3, 6), pca)
    with pytest.raises(InputError, match="has 4 components; asked for 8"):
        pca_loss(torch.randn(2, 6), torch.randn(2, 6), pca)


# ------------------------------------------------------------------------------ Sec. 5.2


SIZE = 48


def face_landmarks(shift=(0.0, 0.0)) -> torch.Tensor:
    """The mesh template as a 48x48 face: eyes near row 19, mouth near row 28."""
    points = torch.from_numpy(load_template().vertices[:, :2]).float() * 14
    return points + torch.tensor([24.0 + shift[0], 18.0 + shift[1]])


def eye_row(landmarks: torch.Tensor) -> float:
    return float(landmarks[[33, 133, 263, 362], 1].mean())


def test_upper_face_mask_follows_the_eyes():
    landmarks = face_landmarks()
    mask = upper_face_mask(landmarks[None], SIZE, SIZE)[0, 0]
    cut = eye_row(landmarks) + 0.15 * 14  # 0.15 eye widths; the eye width is 14 pixels
    assert torch.all(mask[: int(cut - 0.7)] == 1)
    assert torch.all(mask[int(cut + 0.7) + 1 :] == 0)
    # A face upside down has its upper face at the bottom of the image.
    flipped = landmarks.clone()
    flipped[:, 1] = SIZE - 1 - flipped[:, 1]
    assert torch.equal(upper_face_mask(flipped[None], SIZE, SIZE)[0, 0], mask.flip(0))


def test_freeze_upper_face_on_itself_is_unchanged():
    torch.manual_seed(0)
    frames = torch.rand(3, 3, SIZE, SIZE)
    landmarks = torch.stack([face_landmarks(), face_landmarks((1, 0)), face_landmarks((0, 2))])
    out = freeze_upper_face(frames, landmarks, reference=1)
    assert out.shape == frames.shape
    assert torch.allclose(out[1], frames[1], atol=1e-5)


def test_still_head_gets_the_reference_upper_face():
    torch.manual_seed(0)
    frames = torch.rand(3, 3, SIZE, SIZE)
    landmarks = face_landmarks()[None].repeat(3, 1, 1)
    out = freeze_upper_face(frames, landmarks)
    cut = eye_row(landmarks[0]) + 0.15 * 14
    upper, lower = slice(0, int(cut - 0.7)), slice(int(cut + 0.7) + 1, SIZE)
    for t in range(3):
        assert torch.allclose(out[t, :, upper], frames[0, :, upper], atol=1e-5)
        assert torch.equal(out[t, :, lower], frames[t, :, lower])


def test_moved_head_gets_the_aligned_reference_upper_face():
    torch.manual_seed(0)
    frames = torch.rand(2, 3, SIZE, SIZE)
    landmarks = torch.stack([face_landmarks(), face_landmarks((3, 2))])
    out = freeze_upper_face(frames, landmarks)
    cut = eye_row(landmarks[1]) + 0.15 * 14
    last_upper = int(cut - 0.7)
    # Frame 1's upper face is the reference moved 3 pixels right and 2 down...
    assert torch.allclose(
        out[1, :, 2:last_upper, 3:], frames[0, :, : last_upper - 2, : SIZE - 3], atol=1e-5
    )
    # ... where the moved reference does not reach, and below the cut, frame 1 stays.
    assert torch.allclose(out[1, :, :last_upper, :3], frames[1, :, :last_upper, :3], atol=1e-5)
    assert torch.equal(out[1, :, int(cut + 0.7) + 1 :], frames[1, :, int(cut + 0.7) + 1 :])


def test_freeze_upper_face_follows_rotation_and_scale():
    # The reference is a smooth pattern of the face; frame 1 shows the same pattern turned
    # by 10 degrees and scaled by 1.1 about the image centre, and so are its landmarks.
    size = 64
    angle, scale = np.deg2rad(10), 1.1
    a = scale * complex(np.cos(angle), np.sin(angle))
    centre = complex(31.5, 31.5)
    ys, xs = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")

    def pattern(x, y):
        return torch.stack([torch.sin(x / 5), torch.cos(y / 7), torch.sin((x + y) / 9)])

    reference = pattern(xs, ys)
    inverse = (torch.complex(xs, ys) - centre) / a + centre
    moved = pattern(inverse.real, inverse.imag)
    points = face_landmarks() * (4 / 3)
    turned = torch.view_as_real(a * (torch.complex(points[:, 0], points[:, 1]) - centre) + centre)
    landmarks = torch.stack([points, turned.float()])
    frames = torch.stack([reference, torch.rand(3, size, size)])
    out = freeze_upper_face(frames, landmarks)
    inside = (
        (inverse.real >= 0)
        & (inverse.real <= size - 1)
        & (inverse.imag >= 0)
        & (inverse.imag <= size - 1)
    )
    mask = (upper_face_mask(landmarks[1:], size, size)[0, 0] == 1) & inside
    assert mask.sum() > 200
    # Bilinear resampling of the pattern is exact to about 0.5 % of its range.
    assert torch.allclose(out[1][:, mask], moved[:, mask], atol=1e-2)


def test_freeze_upper_face_errors():
    frames = torch.rand(2, 3, SIZE, SIZE)
    landmarks = face_landmarks()[None].repeat(2, 1, 1)
    with pytest.raises(InputError, match="478 points"):
        freeze_upper_face(frames, landmarks[:, :468])
    with pytest.raises(InputError, match=r"\(2, 478, 2\)"):
        freeze_upper_face(frames, landmarks[:1])
    with pytest.raises(InputError, match="reference frame 2 is out of range"):
        freeze_upper_face(frames, landmarks, reference=2)
    with pytest.raises(InputError, match="freeze_upper_face frames"):
        freeze_upper_face(frames[:, :1], landmarks)
    with pytest.raises(InputError, match="coincide"):
        freeze_upper_face(frames, torch.zeros(2, 478, 2))


# ------------------------------------------------------------------------------ with a model


@pytest.fixture(scope="module")
def model() -> MegaPortraitsBase:
    torch.manual_seed(0)
    return MegaPortraitsBase(preset("emoportraits-tiny")).train()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = make_dataset(tmp_path_factory.mktemp("latent") / "clip", num_frames=12, audio=False)
    valid = np.ones(12, bool)
    valid[[3, 7]] = False  # frames without a face are left out
    np.save(root / "valid.npy", valid)
    return root


def test_expression_codes_are_deterministic_and_restore_the_mode(model: MegaPortraitsBase):
    torch.manual_seed(0)
    images = torch.rand(5, 3, 64, 64)
    z = expression_codes(model, images, batch_size=2)
    assert z.shape == (5, 16)
    assert model.training  # eval only while encoding (no dropout on z)
    assert torch.allclose(z, expression_codes(model, images, batch_size=5), atol=1e-5)
    with torch.no_grad():
        model.eval()
        direct = model.expression_encoder(images, model.estimate_pose(images))
        model.train()
    assert torch.allclose(z, direct, atol=1e-5)
    with pytest.raises(InputError, match="at least one image"):
        expression_codes(model, images[:0])
    with pytest.raises(InputError, match="expression_codes images"):
        expression_codes(model, images[:, :2])


def test_mouth_basis(model: MegaPortraitsBase, dataset: Path):
    pca = mouth_basis(model, dataset, num_components=4, batch_size=4)
    assert pca.components.shape == (4, 16)
    assert torch.allclose(pca.components @ pca.components.T, torch.eye(4), atol=1e-4)
    # The PCA's mean is the mean code of the 10 valid frames with frame 0's upper face.
    from neuralhead.data.dataset import PortraitDataset

    data = PortraitDataset(dataset, "all", 64, progress=False)
    assert list(data.frames) == [0, 1, 2, 4, 5, 6, 8, 9, 10, 11]
    images = torch.stack([data.image_uint8(int(f)) for f in data.frames]).float() / 255
    landmarks = torch.from_numpy(np.load(dataset / "landmarks.npy")[data.frames, :, :2] * 2).float()
    z = expression_codes(model, freeze_upper_face(images, landmarks))
    assert torch.allclose(pca.mean, z.mean(0), atol=1e-4)
    few = mouth_basis(model, dataset, max_frames=3)
    assert few.num_components == 16
    with pytest.raises(InputError, match="the frame limit must be positive"):
        mouth_basis(model, dataset, max_frames=0)


def test_mouth_basis_needs_the_full_mesh(model: MegaPortraitsBase, dataset: Path, tmp_path: Path):
    root = make_dataset(tmp_path / "clip", num_frames=4, audio=False)
    np.save(root / "landmarks.npy", np.load(root / "landmarks.npy")[:, :468])
    with pytest.raises(InputError, match="478"):
        mouth_basis(model, root)


def test_analyse_writes_json_and_plot(model: MegaPortraitsBase, dataset: Path, tmp_path: Path):
    other = make_dataset(tmp_path / "other", num_frames=8, audio=False, seed=1)
    result = analyse(model, [dataset, other], tmp_path / "out", max_frames_per_dataset=6)
    assert result["num_frames"] == 12 and result["expression_dim"] == 16
    assert [d["frames"] for d in result["datasets"]] == [6, 6]
    ratios = torch.tensor(result["explained_variance"], dtype=torch.float64)
    assert ratios.shape == (16,) and float(ratios.sum()) == pytest.approx(1.0)
    cumulative = torch.tensor(result["cumulative_explained_variance"])
    assert result["auc_z"] == pytest.approx(float(cumulative.mean()), abs=1e-6)
    counts = result["components_for_variance"]
    assert set(counts) == {"90", "95", "99"}
    assert 1 <= counts["90"] <= counts["95"] <= counts["99"] <= 11  # 12 codes: rank <= 11
    assert float(cumulative[counts["90"] - 1]) >= 0.9 - 1e-9
    if counts["90"] > 1:
        assert float(cumulative[counts["90"] - 2]) < 0.9
    assert json.loads((tmp_path / "out" / "expression_space.json").read_text()) == result
    assert (tmp_path / "out" / "expression_space.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="at least one prepared dataset"):
        analyse(model, [], tmp_path / "none")


def test_command_line(model: MegaPortraitsBase, dataset: Path, tmp_path: Path, capsys):
    model.save_pretrained(tmp_path / "run" / "emoportraits")
    parser = argparse.ArgumentParser()
    add_analyse_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path / "run"), str(dataset), "--out", str(tmp_path / "a"), "--max-frames", "4"]
    )
    assert run_analyse(args) == 0
    assert "AUC_z" in capsys.readouterr().out
    assert (tmp_path / "a" / "expression_space.json").is_file()

    parser = argparse.ArgumentParser()
    add_mouth_basis_arguments(parser)
    out = tmp_path / "mouth.safetensors"
    args = parser.parse_args(
        [str(tmp_path / "run"), str(dataset), "--out", str(out), "--components", "3"]
    )
    assert run_mouth_basis(args) == 0
    assert ExpressionPCA.load(out).num_components == 3
    assert "wrote" in capsys.readouterr().out


# ------------------------------------------------------------------------------ Fig. 8


def test_pca_keeps_eigenvalues_and_loads_files_without_them(tmp_path: Path):
    torch.manual_seed(0)
    z = torch.randn(30, 5, dtype=torch.float64) * torch.tensor(
        [3.0, 1, 2, 1, 1], dtype=torch.float64
    )
    pca = ExpressionPCA.fit(z, num_components=3)
    # lambda_k is the variance of coefficient k over the fitted set.
    assert torch.allclose(pca.eigenvalues, pca.project(z).var(0))
    assert torch.allclose(pca.coefficient_std, pca.project(z).std(0))
    pca.save(tmp_path / "pca.safetensors")
    assert torch.equal(
        ExpressionPCA.load(tmp_path / "pca.safetensors").eigenvalues, pca.eigenvalues
    )
    from safetensors.torch import save_file

    older = {
        name: getattr(pca, name) for name in ("mean", "scale", "components", "explained_variance")
    }
    save_file(
        older,
        str(tmp_path / "old.safetensors"),
        {"format": "neuralhead-expression-pca", "version": "1"},
    )
    loaded = ExpressionPCA.load(tmp_path / "old.safetensors")
    assert loaded.eigenvalues is None
    assert torch.equal(loaded.coefficient_std, torch.ones(3, dtype=torch.float64))
    with pytest.raises(InputError, match="eigenvalues must be"):
        ExpressionPCA(**older, eigenvalues=torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))


def source_landmarks() -> torch.Tensor:
    """The mesh template as a 64x64 face, ``(1, 478, 2)``."""
    points = torch.from_numpy(load_template().vertices[:, :2]).float() * 20
    return (points + torch.tensor([32.0, 26.0]))[None]


@pytest.fixture(scope="module")
def effects(model: MegaPortraitsBase) -> dict:
    torch.manual_seed(1)
    pca = ExpressionPCA.fit(torch.randn(40, 16) * torch.linspace(0.5, 2, 16), num_components=5)
    source = torch.rand(1, 3, 64, 64)
    result = component_effects(
        model, source, pca, num_components=2, steps=(2, 0, -1), landmarks=source_landmarks()
    )
    return {"result": result, "pca": pca, "source": source}


def test_component_effects_shapes_and_steps(model: MegaPortraitsBase, effects: dict):
    result = effects["result"]
    assert model.training  # restored after the renders in eval mode
    assert result["steps"] == [-1.0, 0.0, 2.0]
    assert result["reference_column"] == 1 and result["step_unit"] == "standard deviation"
    assert result["renders"].shape == (2, 4, 3, 64, 64)
    assert [c["component"] for c in result["components"]] == [1, 2]
    renders = result["renders"]
    # Columns: -1 sd, z_0, 0 sd, +2 sd; the step of 0 renders z_0 again.
    assert torch.equal(renders[0, 1], renders[1, 1])
    assert torch.allclose(renders[:, 2], renders[:, 1], atol=1e-5)
    assert (renders[:, 3] - renders[:, 1]).abs().max() > 1e-3
    for component in result["components"]:
        for values in component["per_step"].values():
            assert len(values) == 3 and values[1] == pytest.approx(0.0, abs=1e-5)
        assert component["overall"] > 0


def test_component_effects_measures_the_regions(effects: dict):
    result, pca = effects["result"], effects["pca"]
    renders = result["renders"]
    masks = landmark_region_masks(source_landmarks(), 64)
    change = (renders[:, [0, 2, 3]] - renders[:, 1:2]).abs().mean(2, keepdim=True)
    for k, component in enumerate(result["components"]):
        mouth = float(((change[k] * masks["mouth"]).sum((1, 2, 3)) / masks["mouth"].sum()).mean())
        eyes = float(((change[k] * masks["eyes"]).sum((1, 2, 3)) / masks["eyes"].sum()).mean())
        assert component["mouth"] == pytest.approx(mouth, rel=1e-4)
        assert component["eyes"] == pytest.approx(eyes, rel=1e-4)
        assert component["overall"] == pytest.approx(float(change[k].mean()), rel=1e-4)
        assert 0 <= component["mouth_share"] <= 1
        assert component["mouth_share"] == pytest.approx(mouth / (mouth + eyes), rel=1e-4)
        assert component["coefficient_std"] == pytest.approx(float(pca.eigenvalues[k].sqrt()))
        assert component["explained_variance"] == pytest.approx(float(pca.explained_variance[k]))


def test_component_step_moves_one_coefficient_by_its_deviation(
    model: MegaPortraitsBase, effects: dict
):
    pca, source = effects["pca"], effects["source"]
    with torch.no_grad():
        model.eval()
        state = model.encode_source(source)
        z_0 = state.z_s
        # Two standard deviations along the second component, in code units.
        z = z_0 + 2 * pca.eigenvalues[1].sqrt() * pca.scale * pca.components[1]
        expected = model.render(state, DriverMotion(pose=state.pose, z_d=z))["image"]
        model.train()
    moved = pca.project(z) - pca.project(z_0)
    assert torch.allclose(moved, torch.eye(5)[1] * 2 * pca.eigenvalues[1].sqrt(), atol=1e-4)
    assert torch.allclose(effects["result"]["renders"][1, 3], expected[0], atol=1e-4)


def test_component_effects_without_eigenvalues_steps_one_unit(
    model: MegaPortraitsBase, effects: dict
):
    pca = effects["pca"]
    plain = ExpressionPCA(pca.mean, pca.scale, pca.components, pca.explained_variance)
    result = component_effects(
        model, effects["source"], plain, num_components=1, steps=(1,), landmarks=source_landmarks()
    )
    assert result["step_unit"] == "coefficient"
    assert result["components"][0]["coefficient_std"] == 1.0
    assert result["renders"].shape == (1, 2, 3, 64, 64) and result["reference_column"] == 0


def test_component_figure(effects: dict, tmp_path: Path):
    path = tmp_path / "figure" / "components.png"
    write_component_figure(effects["result"], path)
    image = cv2.imread(str(path))
    # Two rows of 128-pixel tiles (64-pixel renders enlarged): a label tile and 4 renders.
    assert image.shape == (2 * 130 + 2, 5 * 130 + 2, 3)
    with pytest.raises(InputError, match="result of component_effects"):
        write_component_figure({"components": []}, path)


def test_component_effects_errors(model: MegaPortraitsBase, effects: dict):
    pca, source, landmarks = effects["pca"], effects["source"], source_landmarks()

    def run(**kwargs):
        arguments = {"landmarks": landmarks, "num_components": 2, **kwargs}
        return component_effects(
            model, arguments.pop("source", source), arguments.pop("pca", pca), **arguments
        )

    with pytest.raises(InputError, match="num_components must be between 1 and 5"):
        run(num_components=6)
    with pytest.raises(InputError, match="num_components must be between 1 and 5"):
        run(num_components=0)
    with pytest.raises(InputError, match=r"\(1, 3, 64, 64\)"):
        run(source=torch.rand(1, 3, 32, 32))
    with pytest.raises(InputError, match="16-dimensional"):
        run(pca=ExpressionPCA.fit(torch.randn(10, 8)))
    with pytest.raises(InputError, match="finite numbers"):
        run(steps=())
    with pytest.raises(InputError, match="finite numbers"):
        run(steps=(1.0, float("nan")))
    with pytest.raises(InputError, match=r"\(1, 478, 2\)"):
        run(landmarks=landmarks.repeat(2, 1, 1))
    with pytest.raises(InputError, match="outside"):
        run(landmarks=landmarks + 500)
    with pytest.raises(InputError, match="source mask"):
        run(mask=torch.ones(1, 1, 32, 32))


def test_component_effects_needs_a_face(model: MegaPortraitsBase, effects: dict):
    with pytest.raises(NoFaceError, match="no face"):
        component_effects(model, torch.zeros(1, 3, 64, 64), effects["pca"], num_components=1)


def test_components_command(model: MegaPortraitsBase, dataset: Path, tmp_path: Path, capsys):
    import skimage.data

    model.save_pretrained(tmp_path / "run" / "emoportraits")
    portrait = cv2.resize(skimage.data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(tmp_path / "source.png"), portrait[:, :, ::-1])
    torch.manual_seed(0)
    ExpressionPCA.fit(torch.randn(30, 16), num_components=4).save(tmp_path / "basis.safetensors")
    parser = argparse.ArgumentParser()
    add_components_arguments(parser)
    common = [str(tmp_path / "run"), str(tmp_path / "source.png")]
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--out", str(tmp_path / "none")])  # no basis, no data
    args = parser.parse_args(
        [
            *common,
            "--basis",
            str(tmp_path / "basis.safetensors"),
            "--components",
            "2",
            "--steps",
            "-1",
            "1",
            "--out",
            str(tmp_path / "a"),
        ]
    )
    assert run_components(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["v1", "v2"]
    written = json.loads((tmp_path / "a" / "components.json").read_text())
    assert written["basis"] == {"file": str(tmp_path / "basis.safetensors")}
    assert written["steps"] == [-1.0, 1.0] and len(written["components"]) == 2
    assert (tmp_path / "a" / "components.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    args = parser.parse_args(
        [
            *common,
            "--data",
            str(dataset),
            "--max-frames",
            "4",
            "--components",
            "1",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert run_components(args) == 0
    written = json.loads((tmp_path / "b" / "components.json").read_text())
    assert written["basis"] == {"datasets": [{"path": str(dataset), "frames": 4}]}
