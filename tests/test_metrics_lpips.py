"""LPIPS: behaviour with untrained weights, parameter names of the published files, and
loading through the weights registry (with small files the test makes itself)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from neuralhead import weights
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.metrics import (
    LPIPS,
    METRICS,
    available_metrics,
)

# Keys and shapes of torchvision's vgg16().features (configuration "D").
TORCHVISION_VGG16_FEATURES = {
    f"features.{index}.{kind}": shape
    for index, cin, cout in [
        (0, 3, 64),
        (2, 64, 64),
        (5, 64, 128),
        (7, 128, 128),
        (10, 128, 256),
        (12, 256, 256),
        (14, 256, 256),
        (17, 256, 512),
        (19, 512, 512),
        (21, 512, 512),
        (24, 512, 512),
        (26, 512, 512),
        (28, 512, 512),
    ]
    for kind, shape in [("weight", (cout, cin, 3, 3)), ("bias", (cout,))]
}

# Every key of lpips 0.1.4's weights/v0.1/vgg.pth, with its shape, as read from the wheel
# (verified while writing this module; the test itself has no network to fetch it).
PUBLISHED_VGG_HEADS = {
    "lin0.model.1.weight": (1, 64, 1, 1),
    "lin1.model.1.weight": (1, 128, 1, 1),
    "lin2.model.1.weight": (1, 256, 1, 1),
    "lin3.model.1.weight": (1, 512, 1, 1),
    "lin4.model.1.weight": (1, 512, 1, 1),
}


@pytest.fixture(scope="module")
def model() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS()


def _images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(2, 3, 32, 48, generator=g)
    pred = (target + 0.2 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    return pred, target


def test_zero_for_identical_and_positive_for_different(model):
    pred, target = _images()
    same = model(target, target)
    assert same.shape == (2,)
    torch.testing.assert_close(same, torch.zeros(2))
    different = model(pred, target)
    assert different.shape == (2,) and (different > 0).all()
    torch.testing.assert_close(model(target, pred), different)
    assert model(pred[0], target[0]).shape == ()


def test_training_mode_does_not_make_it_random(model):
    pred, target = _images()
    expected = model(pred, target)
    model.train()
    try:
        torch.testing.assert_close(model(pred, target), expected)
    finally:
        model.eval()


def test_gradients_reach_the_input_not_the_weights(model):
    pred, target = _images()
    pred.requires_grad_(True)
    model(pred, target).sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_parameter_names_match_the_published_files(model):
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {f"net.{k}": v for k, v in TORCHVISION_VGG16_FEATURES.items()}
    expected.update(PUBLISHED_VGG_HEADS)
    assert shapes == expected


def test_input_errors(model):
    image = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="same shape"):
        model(image, image[..., :31])
    with pytest.raises(ValueError, match="at least 16x16"):
        model(image[..., :15, :], image[..., :15, :])
    with pytest.raises(InputError, match="expected keys"):
        model.load_heads({"lins.0.model.1.weight": torch.ones(1, 64, 1, 1)})


def _published_like_files(tmp_path):
    """Small stand-ins for the two published files, in their formats and key layouts."""
    g = torch.Generator().manual_seed(1)
    vgg = {
        k: 0.05 * torch.randn(shape, generator=g) for k, shape in TORCHVISION_VGG16_FEATURES.items()
    }
    # The real file also holds the classifier; tiny tensors stand in for its 400 MB here.
    vgg.update(
        {f"classifier.{i}.{kind}": torch.zeros(2) for i in (0, 3, 6) for kind in ("weight", "bias")}
    )
    heads = {k: torch.rand(shape, generator=g) for k, shape in PUBLISHED_VGG_HEADS.items()}
    files = {}
    for name, state in [("vgg16-imagenet", vgg), ("lpips-vgg-v0.1", heads)]:
        path = tmp_path / weights.get_weights(name).filename
        torch.save(state, path)
        files[name] = path
    return vgg, heads, files


@pytest.fixture
def test_registry(tmp_path, monkeypatch):
    """The real LPIPS entries with digests of the test's own files; cache in tmp_path."""
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_REGISTRY", dict(weights._REGISTRY))
    monkeypatch.setattr(weights, "_VERIFIED", {})
    vgg, heads, files = _published_like_files(tmp_path)
    for name, path in files.items():
        data = path.read_bytes()
        weights._REGISTRY[name] = dataclasses.replace(
            weights.get_weights(name), sha256=hashlib.sha256(data).hexdigest(), size=len(data)
        )
    return vgg, heads, files


def test_from_pretrained_loads_both_files(test_registry):
    vgg, heads, files = test_registry
    model = LPIPS.from_pretrained(files["vgg16-imagenet"], files["lpips-vgg-v0.1"])
    state = model.state_dict()
    assert all(
        torch.equal(state[f"net.{k}"], v) for k, v in vgg.items() if k.startswith("features.")
    )
    assert all(torch.equal(state[k], v) for k, v in heads.items())
    pred, target = _images()
    assert (model(pred, target) > 0).all()


def test_from_pretrained_without_files_raises(test_registry):
    with pytest.raises(WeightsMissingError, match="vgg16-397923af.pth not found"):
        LPIPS.from_pretrained()


def test_availability_follows_the_files(test_registry):
    _, _, files = test_registry
    status = available_metrics()
    assert status["psnr"].available and status["ssim"].available
    assert not status["lpips"].available
    assert "neuralhead weights download vgg16-imagenet" in status["lpips"].reason
    assert not status["fid"].available
    assert "neuralhead weights download inception-v3-fid" in status["fid"].reason
    assert not status["fvd"].available and "rgb_imagenet.pt not found" in status["fvd"].reason

    cache = weights.cache_dir()
    cache.mkdir()
    for path in files.values():
        (cache / path.name).write_bytes(path.read_bytes())
    status = available_metrics()
    assert status["lpips"].available and status["lpips"].reason is None
    assert not status["fid"].available


def test_metric_registry():
    assert set(METRICS) >= {"l1_255", "psnr", "ssim", "lpips", "fid"}
    assert METRICS["psnr"].higher_is_better and METRICS["ssim"].higher_is_better
    assert not METRICS["lpips"].higher_is_better and METRICS["lpips"].needs_weights
    assert set(METRICS["lpips"].weights) == {"vgg16-imagenet", "lpips-vgg-v0.1"}
    assert all(
        name in {e.name for e in weights.registered_weights()}
        for info in METRICS.values()
        for name in info.weights
    )
