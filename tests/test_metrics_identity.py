"""CSIM: cosine similarity of identity embeddings, on a tiny random stand-in for ArcFace, and
the five-point alignment to ArcFace's template."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralhead import weights
from neuralhead.errors import WeightsMissingError
from neuralhead.geometry.rotation import similarity_transform
from neuralhead.metrics import ARCFACE_WEIGHTS, CSIM, available_metrics, csim
from neuralhead.metrics.identity import (
    ARCFACE_TEMPLATE,
    align_faces,
    five_points_from_mesh,
    similarity_matrix_2d,
)


class TinyIdentityNet(nn.Module):
    """ArcFace's call signature, (B, 3, H, W) in [0, 1] -> unit (B, 16), at a tiny size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 4 * 4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(torch.relu(self.conv(2 * x - 1)), 4)
        return F.normalize(self.fc(x.flatten(1)), dim=-1)


@pytest.fixture
def network() -> TinyIdentityNet:
    torch.manual_seed(0)
    return TinyIdentityNet().eval()


def _images(n: int, seed: int, size: int = 24) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_identical_images_have_similarity_one_and_different_ones_less(network):
    images = _images(4, 1)
    same = csim(images, images, network)
    assert same.shape == (4,)
    torch.testing.assert_close(same, torch.ones(4), atol=1e-6, rtol=0)
    other = csim(images, _images(4, 2), network)
    assert (other < 0.999).all() and (other >= -1).all()


def test_equals_the_cosine_of_the_embeddings(network):
    pred, target = _images(3, 3), _images(3, 4)
    expected = F.cosine_similarity(network(pred), network(target), dim=-1)
    torch.testing.assert_close(csim(pred, target, network), expected, atol=1e-6, rtol=0)


def test_unnormalised_embeddings_are_normalised(network):
    class Scaled(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 7.0 * network(x)

    pred, target = _images(3, 3), _images(3, 4)
    torch.testing.assert_close(csim(pred, target, Scaled()), csim(pred, target, network))


def test_one_reference_image_for_every_frame(network):
    # HeadGAN's reenactment protocol: each generated frame against the one source image.
    frames, source = _images(5, 5), _images(1, 6, size=32)
    values = csim(frames, source, network)
    expected = torch.stack([csim(f[None], source, network)[0] for f in frames])
    torch.testing.assert_close(values, expected)


def test_gradients_reach_the_prediction(network):
    pred = _images(2, 7).requires_grad_(True)
    (1 - csim(pred, _images(2, 8), network)).mean().backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_accumulator_streams_the_mean(network):
    metric = CSIM(network, batch_size=2)
    pred, target = _images(5, 9), _images(5, 10)
    first = metric.update(pred[:3], target[:3])
    second = metric.update(pred[3:], target[3:])
    assert first.shape == (3,) and second.shape == (2,)
    expected = csim(pred, target, network).mean().item()
    assert metric.compute() == pytest.approx(expected, abs=1e-6)
    assert metric.count == 5
    metric.reset()
    with pytest.raises(ValueError, match="no images"):
        metric.compute()


def test_input_errors(network):
    images = _images(2, 11)
    with pytest.raises(ValueError, match=r"RGB images \(B, 3, H, W\)"):
        csim(images[:, :1], images[:, :1], network)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        csim(images * 255, images, network)
    with pytest.raises(ValueError, match="float images"):
        csim((images * 255).byte(), images, network)
    with pytest.raises(ValueError, match="single reference image"):
        csim(images, _images(3, 12), network)
    with pytest.raises(ValueError, match="batch_size"):
        CSIM(network, batch_size=0)


def test_needs_the_arcface_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path))
    # The name the metric table uses is the one the network registers its file under.
    weights.get_weights(ARCFACE_WEIGHTS)
    with pytest.raises(WeightsMissingError, match=ARCFACE_WEIGHTS):
        CSIM.from_pretrained()
    status = available_metrics()["csim"]
    assert not status.available and ARCFACE_WEIGHTS in status.reason


# ------------------------------------------------------------------------- alignment
TEMPLATE = torch.tensor(ARCFACE_TEMPLATE)


def _rotation_about(center: tuple[float, float], degrees: float, scale: float) -> np.ndarray:
    """A 2x3 similarity (OpenCV's convention: pixel centres at whole numbers)."""
    return cv2.getRotationMatrix2D(center, degrees, scale)


def _apply(matrix: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    m = torch.from_numpy(matrix).float()
    return points @ m[:, :2].T + m[:, 2]


def _smooth_face(size: int, seed: int) -> torch.Tensor:
    """A smooth random pattern (1, 3, size, size): resampling it twice changes it little."""
    coarse = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _warp(image: torch.Tensor, matrix: np.ndarray, size: int) -> torch.Tensor:
    """The image moved by ``matrix`` with OpenCV, an implementation independent of ours."""
    array = image[0].permute(1, 2, 0).numpy()
    moved = cv2.warpAffine(array, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    return torch.from_numpy(moved).permute(2, 0, 1)[None].clamp(0, 1)


def test_the_template_is_insightfaces():
    assert ARCFACE_TEMPLATE[0] == (38.2946, 51.6963)
    assert ARCFACE_TEMPLATE[4] == (70.7299, 92.2041)
    x, y = TEMPLATE.unbind(-1)
    # Image-left eye and mouth corner first; eyes above the nose above the mouth.
    assert x[0] < x[2] < x[1] and x[3] < x[2] < x[4]
    assert y[:2].max() < y[2] < y[3:].min()


@pytest.mark.parametrize(("degrees", "scale", "shift"), [(0, 1, (0, 0)), (30, 1.6, (7, -5))])
def test_align_faces_puts_the_five_points_on_the_template(degrees, scale, shift):
    # Five bright dots, placed where a rotated, scaled, shifted template puts them.
    size = 160
    matrix = _rotation_about((size / 2, size / 2), degrees, scale)
    matrix[:, 2] += shift
    points = _apply(matrix, TEMPLATE + (size - 112) / 2)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    dots = sum(torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2)) for x, y in points)
    image = dots.clamp(0, 1).expand(1, 3, size, size).contiguous()

    aligned = align_faces(image, points[None])
    assert aligned.shape == (1, 3, 112, 112)
    brightness = aligned[0, 0]
    for x, y in TEMPLATE:
        # Brightness-weighted centroid of the dot, in a window around where it should be.
        x0, y0 = int(x) - 6, int(y) - 6
        window = brightness[y0 : y0 + 13, x0 : x0 + 13]
        ys, xs = torch.meshgrid(torch.arange(13.0) + y0, torch.arange(13.0) + x0, indexing="ij")
        found = torch.stack([(window * xs).sum(), (window * ys).sum()]) / window.sum()
        assert torch.dist(found, torch.tensor([x, y])) < 1.0


def test_align_faces_matches_opencv_and_scales_the_template():
    image = _smooth_face(180, seed=1)  # the crop lies inside it
    points = torch.tensor([[[52.0, 60], [90, 55], [74, 84], [58, 108], [91, 104]]]) + 30
    matrix = similarity_matrix_2d(points.double(), TEMPLATE[None].double())[0].numpy()
    expected = _warp(image, matrix, 112)
    # OpenCV rounds its bilinear weights to 1/32 pixel: close, not equal.
    difference = (align_faces(image, points) - expected).abs()
    assert difference.mean() < 2e-3 and difference.max() < 0.03
    # At twice the size, the same crop at twice the resolution.
    large = align_faces(image, points, size=224)
    torch.testing.assert_close(F.avg_pool2d(large, 2), expected, atol=0.02, rtol=0)


def test_the_2d_fit_is_umeyamas():
    generator = torch.Generator().manual_seed(2)
    source = torch.randn(3, 5, 2, generator=generator, dtype=torch.float64)
    target = torch.randn(3, 5, 2, generator=generator, dtype=torch.float64)
    matrix = similarity_matrix_2d(source, target)
    scale, rotation, shift = similarity_transform(source, target)
    torch.testing.assert_close(matrix[..., :2], scale[:, None, None] * rotation)
    torch.testing.assert_close(matrix[..., 2], shift)


def test_a_turned_and_scaled_face_aligns_like_the_upright_one():
    size = 160
    upright = _smooth_face(size, seed=3)
    points = TEMPLATE + (size - 112) / 2
    matrix = _rotation_about((size / 2, size / 2), 25, 0.8)
    moved, moved_points = _warp(upright, matrix, size), _apply(matrix, points)
    a = align_faces(upright, points[None])
    b = align_faces(moved, moved_points[None])
    assert (a - b).abs().mean() < 0.01 and (a - b).abs().max() < 0.06
    # Unaligned, the two are far apart.
    assert (upright - moved).abs().mean() > 0.05


def test_gradients_reach_the_images_and_the_points():
    image = _smooth_face(128, seed=4).requires_grad_(True)
    points = (TEMPLATE + 8)[None].clone().requires_grad_(True)
    (align_faces(image, points) * torch.linspace(0, 1, 112)).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert points.grad is not None and torch.isfinite(points.grad).all()
    assert points.grad.abs().sum() > 0


def test_aligned_csim_ignores_the_framing(network):
    size = 160
    upright = _smooth_face(size, seed=5)
    points = TEMPLATE + (size - 112) / 2
    matrix = _rotation_about((size / 2, size / 2), 25, 0.8)
    moved, moved_points = _warp(upright, matrix, size), _apply(matrix, points)
    aligned = csim(
        moved, upright, network, pred_points=moved_points[None], target_points=points[None]
    )
    unaligned = csim(moved, upright, network)
    assert aligned.item() > 0.995
    assert unaligned.item() < aligned.item() - 0.02
    # The accumulator aligns the same way, with one reference image for every frame.
    metric = CSIM(network, batch_size=1)
    values = metric.update(
        torch.cat([moved, upright]),
        upright,
        pred_points=torch.stack([moved_points, points]),
        target_points=points[None],
    )
    torch.testing.assert_close(values[0], aligned[0])
    assert values[1].item() == pytest.approx(1.0, abs=1e-5)


def test_five_points_from_the_face_mesh():
    from neuralhead.tracking.template import load_template

    mesh = torch.from_numpy(load_template().vertices)[None]
    for landmarks in (mesh, mesh[:, :468], mesh[..., :2]):
        five = five_points_from_mesh(landmarks)
        assert five.shape == (1, 5, 2)
        # A frontal face's five points sit where the template's do, up to a similarity.
        matrix = similarity_matrix_2d(five, TEMPLATE[None])
        fitted = five @ matrix[0, :, :2].T + matrix[0, :, 2]
        assert (fitted - TEMPLATE).norm(dim=-1).max() < 8  # pixels of the 112 crop
    torch.testing.assert_close(five_points_from_mesh(mesh)[0, 0], mesh[0, 468, :2])
    torch.testing.assert_close(five_points_from_mesh(mesh)[0, 2], mesh[0, 1, :2])
    with pytest.raises(ValueError, match=r"face-mesh landmarks \(B, 478 or 468"):
        five_points_from_mesh(mesh[:, :100])


def test_alignment_input_errors(network):
    images = _images(2, 13)
    points = (TEMPLATE - 40)[None].expand(2, 5, 2)
    with pytest.raises(ValueError, match=r"five \(x, y\) points per image, \(2, 5, 2\)"):
        align_faces(images, points[:1])
    with pytest.raises(ValueError, match="NaN"):
        align_faces(images, torch.full((2, 5, 2), float("nan")))
    with pytest.raises(ValueError, match="float pixel"):
        align_faces(images, points.long())
    with pytest.raises(ValueError, match=r"pred_points.*\(3, 5, 2\)"):
        CSIM(network, batch_size=2).update(_images(3, 14), _images(3, 15), pred_points=points)
