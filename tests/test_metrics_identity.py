"""CSIM: cosine similarity of identity embeddings, on a tiny random stand-in for ArcFace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralhead import weights
from neuralhead.errors import WeightsMissingError
from neuralhead.metrics import ARCFACE_WEIGHTS, CSIM, available_metrics, csim


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
