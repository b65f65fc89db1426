"""FVD: clip cutting, streaming, and the Fréchet distance on a tiny random stand-in for I3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralhead import weights
from neuralhead.errors import WeightsMissingError
from neuralhead.metrics import (
    CLIP_LENGTH,
    FVD,
    I3D_WEIGHTS,
    METRICS,
    available_metrics,
    frechet_distance,
    video_clips,
)


class TinyVideoNet(nn.Module):
    """I3D's ``features`` signature, (N, 3, T, H, W) in [0, 1] -> (N, 12), at a tiny size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 6, 3, stride=2)
        self.fc = nn.Linear(6 * 2 * 2 * 2, 12)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool3d(torch.relu(self.conv(2 * video - 1)), 2)
        return self.fc(x.flatten(1))


@pytest.fixture
def network() -> TinyVideoNet:
    torch.manual_seed(0)
    return TinyVideoNet().eval()


def _videos(n: int, frames: int, seed: int, size: int = 12) -> torch.Tensor:
    """Smooth random motion: a random start plus a drift that grows over time, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    start = torch.rand(n, 3, 1, size, size, generator=g)
    drift = 0.3 * torch.rand(n, 3, 1, size, size, generator=g)
    t = torch.linspace(0, 1, frames).view(1, 1, frames, 1, 1)
    return (0.7 * start + drift * t).clamp(0, 1)


def test_clips_are_consecutive_and_the_tail_is_dropped():
    videos = torch.arange(2 * 3 * 35 * 2 * 2, dtype=torch.float32).view(2, 3, 35, 2, 2) / 1000
    clips = video_clips(videos, 16)
    assert clips.shape == (4, 3, 16, 2, 2)
    torch.testing.assert_close(clips[0], videos[0, :, :16])
    torch.testing.assert_close(clips[1], videos[0, :, 16:32])
    torch.testing.assert_close(clips[2], videos[1, :, :16])
    torch.testing.assert_close(clips[3], videos[1, :, 16:32])
    assert CLIP_LENGTH == 16


def test_same_clips_give_zero_and_noise_makes_it_grow(network):
    real = _videos(24, 16, 1)
    fvd = FVD(network, batch_size=5)
    fvd.update(real, real=True)
    fvd.update(real, real=False)
    assert fvd.compute() == pytest.approx(0.0, abs=1e-8)

    distances = []
    g = torch.Generator().manual_seed(2)
    for sigma in (0.05, 0.2, 0.5):
        noisy = (real + sigma * torch.randn(real.shape, generator=g)).clamp(0, 1)
        fvd = FVD(network)
        fvd.update(real, real=True)
        fvd.update(noisy, real=False)
        distances.append(fvd.compute())
    assert distances[0] > 0 and distances == sorted(distances)


def test_equals_the_frechet_distance_of_the_clip_features(network):
    real, generated = _videos(6, 32, 3), _videos(5, 40, 4)
    fvd = FVD(network)
    fvd.update(real, real=True)
    fvd.update(generated, real=False)
    assert fvd.num_clips(real=True) == 12 and fvd.num_clips(real=False) == 10
    with torch.no_grad():
        f_real = network.features(video_clips(real)).double().numpy()
        f_gen = network.features(video_clips(generated)).double().numpy()
    expected = frechet_distance(
        f_gen.mean(0), np.cov(f_gen, rowvar=False), f_real.mean(0), np.cov(f_real, rowvar=False)
    )
    assert fvd.compute() == pytest.approx(expected, rel=1e-5)  # float32 batches differ


def test_frames_streamed_one_by_one_give_the_clips_of_the_whole_video(network):
    video = _videos(1, 40, 5)
    whole, streamed = FVD(network), FVD(network)
    whole.update(video, real=True)
    for start in range(0, 40, 3):  # batches that straddle the clip boundaries
        streamed.update_frames(video[0, :, start : start + 3].transpose(0, 1), real=True)
    assert streamed.num_clips(real=True) == whole.num_clips(real=True) == 2
    assert len(streamed._pending[True]) == 40 - 32
    # The same clips; only float32 rounding in differently sized batches differs.
    np.testing.assert_allclose(streamed.real.mean, whole.real.mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        streamed.real.covariance(), whole.real.covariance(), rtol=1e-4, atol=1e-8
    )


def test_needs_two_clips_per_stream(network):
    fvd = FVD(network)
    fvd.update(_videos(3, 16, 6), real=True)
    fvd.update(_videos(1, 31, 7), real=False)  # one clip: the 15-frame tail is dropped
    with pytest.raises(
        ValueError, match="at least 2 clips of 16 frames.*got 1 generated and 3 real"
    ):
        fvd.compute()


def test_input_errors(network):
    fvd = FVD(network)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        fvd.update(torch.rand(2, 3, 16, 8), real=True)
    with pytest.raises(ValueError, match="shorter than one clip of 16"):
        fvd.update(torch.rand(1, 3, 15, 8, 8), real=True)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fvd.update(torch.rand(1, 3, 16, 8, 8) * 255, real=True)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        fvd.update_frames(torch.rand(3, 8, 8), real=True)
    with pytest.raises(ValueError, match="at least 1"):
        FVD(network, clip_length=0)


def test_needs_the_i3d_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path))
    assert METRICS["fvd"].weights == (I3D_WEIGHTS,) and METRICS["fvd"].unsupported is None
    # The name the metric table uses is the one the network registers its file under.
    weights.get_weights(I3D_WEIGHTS)
    with pytest.raises(WeightsMissingError, match=I3D_WEIGHTS):
        FVD.from_pretrained()
    status = available_metrics()["fvd"]
    assert not status.available and I3D_WEIGHTS in status.reason
