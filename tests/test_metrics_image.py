"""L1, PSNR and SSIM: known values, agreement with torchmetrics, input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from skimage.data import astronaut

from neuralhead.metrics import l1_255, psnr, ssim


@pytest.fixture(scope="module")
def reference():
    """torchmetrics' functional PSNR and SSIM (a dev dependency, used only as a reference)."""
    return pytest.importorskip("torchmetrics.functional.image")


def _random_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(4, 3, 40, 56, generator=g)
    pred = (target + 0.15 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    return pred, target


def _structured_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A natural portrait, a gradient and a checkerboard, each against a distorted copy."""
    portrait = torch.from_numpy(astronaut()[::4, ::4].copy()).permute(2, 0, 1).float() / 255
    portrait = portrait[:, :96, 16:112]
    ramp = torch.linspace(0, 1, 96).expand(3, 96, 96).contiguous()
    checker = ((torch.arange(96)[:, None] // 8 + torch.arange(96)[None] // 8) % 2).float()
    target = torch.stack([portrait, ramp, checker.expand(3, 96, 96)])
    blurred = F.avg_pool2d(F.pad(target, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    shifted = torch.roll(target, shifts=(2, -3), dims=(-2, -1))
    pred = torch.stack([blurred[0], shifted[1], 0.8 * target[2] + 0.1])
    return pred, target


@pytest.mark.parametrize("pair", [_random_pair, _structured_pair], ids=["random", "structured"])
def test_ssim_agrees_with_torchmetrics(pair, reference):
    pred, target = pair()
    ours = ssim(pred, target)
    assert ours.shape == (pred.shape[0],)
    theirs = reference.structural_similarity_index_measure(
        pred, target, data_range=1.0, reduction="none"
    )
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    batch_mean = reference.structural_similarity_index_measure(pred, target, data_range=1.0)
    torch.testing.assert_close(ours.mean(), batch_mean, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pair", [_random_pair, _structured_pair], ids=["random", "structured"])
def test_psnr_agrees_with_torchmetrics(pair, reference):
    pred, target = pair()
    ours = psnr(pred, target)
    per_image = torch.stack(
        [reference.peak_signal_noise_ratio(p, t, data_range=1.0) for p, t in zip(pred, target)]
    )
    torch.testing.assert_close(ours, per_image, atol=1e-4, rtol=0)


@pytest.mark.parametrize("data_range", [1.0, 255.0])
@pytest.mark.parametrize("shape", [(1, 3, 11, 11), (3, 3, 13, 29), (2, 3, 37, 53), (5, 3, 64, 65)])
def test_psnr_and_ssim_agree_with_torchmetrics_at_any_size_and_range(shape, data_range, reference):
    g = torch.Generator().manual_seed(shape[2] * shape[3])
    target = torch.rand(shape, generator=g)
    pred = (target + 0.2 * torch.randn(shape, generator=g)).clamp(0, 1)
    pred, target = pred * data_range, target * data_range
    ours = ssim(pred, target, data_range=data_range)
    theirs = reference.structural_similarity_index_measure(
        pred, target, data_range=data_range, reduction="none"
    )
    # torchmetrics' defaults are the paper's: an 11x11 Gaussian window, sigma 1.5.
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    per_image = torch.stack(
        [
            reference.peak_signal_noise_ratio(p, t, data_range=data_range)
            for p, t in zip(pred, target)
        ]
    )
    torch.testing.assert_close(
        psnr(pred, target, data_range=data_range), per_image, atol=1e-4, rtol=0
    )


def test_data_range_255():
    pred, target = _structured_pair()
    torch.testing.assert_close(ssim(pred * 255, target * 255, data_range=255.0), ssim(pred, target))
    torch.testing.assert_close(psnr(pred * 255, target * 255, data_range=255.0), psnr(pred, target))


def test_known_values():
    target = torch.full((2, 3, 16, 16), 0.25)
    pred = torch.full((2, 3, 16, 16), 0.5)
    torch.testing.assert_close(l1_255(pred, target), torch.tensor([63.75, 63.75]))
    # MSE = 1/16, so PSNR = 10 log10(16).
    torch.testing.assert_close(
        psnr(pred, target), torch.full((2,), 10 * torch.log10(torch.tensor(16.0)).item())
    )


def test_identical_images():
    image = _random_pair()[1]
    torch.testing.assert_close(ssim(image, image), torch.ones(4))
    assert torch.isinf(psnr(image, image)).all()
    assert (l1_255(image, image) == 0).all()


def test_unbatched_image_gives_a_scalar():
    pred, target = _random_pair()
    for metric in (l1_255, psnr, ssim):
        value = metric(pred[1], target[1])
        assert value.shape == ()
        torch.testing.assert_close(value, metric(pred, target)[1])


def test_ssim_is_differentiable():
    pred, target = _random_pair()
    pred.requires_grad_(True)
    (1 - ssim(pred, target)).mean().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_half_precision_input_is_computed_in_float32():
    pred, target = _random_pair()
    value = ssim(pred.half(), target.half())
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ssim(pred, target), atol=2e-3, rtol=0)


@pytest.mark.parametrize("metric", [l1_255, psnr, ssim])
def test_input_errors(metric):
    image = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3, 16, 16\) and \(2, 3, 16, 15\)"):
        metric(image, image[..., :15])
    with pytest.raises(ValueError, match="RGB images"):
        metric(image[:, :1], image[:, :1])
    with pytest.raises(ValueError, match="RGB images"):
        metric(image[0, 0], image[0, 0])
    as_bytes = (image * 255).to(torch.uint8)
    with pytest.raises(ValueError, match="float images"):
        metric(as_bytes, as_bytes)


def test_ssim_rejects_images_smaller_than_its_window():
    image = torch.rand(1, 3, 10, 32)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(image, image)


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_data_range_must_be_positive(metric):
    image = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="data_range must be positive"):
        metric(image, image, data_range=0.0)
