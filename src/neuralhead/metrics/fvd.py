"""Fréchet video distance (Unterthiner et al., "Towards Accurate Generative Models of Video:
A New Metric & Challenges", 2018), as HeadGAN reports it (Sec. 4.2, Appendix E).

FVD is FID (:mod:`neuralhead.metrics.fid`) on clips instead of images: each set of clips is
summarised by the mean and covariance of features of an I3D network trained on Kinetics-400
(:class:`neuralhead.pretrained.i3d.I3D`, registry entry :data:`I3D_WEIGHTS`, whose
``features`` method gives the features FVD is computed on), and FVD is the Fréchet distance
between the two Gaussians. It sees motion as well as appearance: frames that are each
plausible but flicker have a good FID and a bad FVD.

Clips are :data:`CLIP_LENGTH` = 16 consecutive frames, the length FVD was defined with.
Longer videos are cut into consecutive, non-overlapping 16-frame clips from their first
frame on, and a remainder shorter than a clip is left out (our choice; some papers sample
clips at random positions instead, which gives other numbers). Every clip counts once, so a
video contributes ``T // 16`` clips. The network resizes the frames itself.

As with FID the estimate is biased and its covariance singular with fewer clips than feature
dimensions: compare FVDs only between results on the same number of clips.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from neuralhead.metrics.fid import FeatureStatistics, frechet_distance

#: Registry name of the I3D weights (:mod:`neuralhead.weights`).
I3D_WEIGHTS = "i3d-rgb-imagenet"
#: Frames per clip (Unterthiner et al. 2018).
CLIP_LENGTH = 16
#: Clips per forward pass; our choice, a few hundred MB of activations at 224x224.
DEFAULT_BATCH_SIZE = 4


def _check_videos(videos: torch.Tensor, clip_length: int) -> None:
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"expected RGB videos shaped (B, 3, T, H, W), got {tuple(videos.shape)}")
    if videos.shape[2] < clip_length:
        raise ValueError(
            f"videos of {videos.shape[2]} frames are shorter than one clip of {clip_length}"
        )
    if not videos.is_floating_point():
        raise ValueError(f"expected float videos in [0, 1], got {videos.dtype}")
    if videos.min() < 0 or videos.max() > 1:
        raise ValueError(
            f"expected videos in [0, 1], got values in [{float(videos.min()):.3g}, "
            f"{float(videos.max()):.3g}]"
        )


def video_clips(videos: torch.Tensor, clip_length: int = CLIP_LENGTH) -> torch.Tensor:
    """Cut videos ``(B, 3, T, H, W)`` into consecutive non-overlapping clips
    ``(B * (T // clip_length), 3, clip_length, H, W)``, dropping each video's last
    ``T % clip_length`` frames; clips of one video are adjacent, in order."""
    _check_videos(videos, clip_length)
    batch, channels, frames, height, width = videos.shape
    count = frames // clip_length
    clips = videos[:, :, : count * clip_length].reshape(
        batch, channels, count, clip_length, height, width
    )
    return clips.transpose(1, 2).reshape(batch * count, channels, clip_length, height, width)


def _device(network: nn.Module) -> torch.device:
    parameter = next(network.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class FVD:
    """FVD between a stream of real and a stream of generated videos.

    ``network`` is an :class:`~neuralhead.pretrained.i3d.I3D`, or any module with a
    ``features(clips)`` method taking ``(N, 3, T, H, W)`` in ``[0, 1]`` and returning
    ``(N, D)``. Only running feature statistics are kept (:class:`FeatureStatistics`,
    created at the first clip, when ``D`` is known), plus at most ``clip_length - 1``
    frames per stream waiting in :meth:`update_frames` for their clip to fill up.
    :meth:`compute` needs at least 2 clips in each stream.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        clip_length: int = CLIP_LENGTH,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if clip_length < 1 or batch_size < 1:
            raise ValueError(
                f"clip_length and batch_size must be at least 1, got {clip_length} and {batch_size}"
            )
        self.network = network
        self.clip_length = clip_length
        self.batch_size = batch_size
        self.real: FeatureStatistics | None = None
        self.generated: FeatureStatistics | None = None
        self._pending: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        download: bool = False,
        clip_length: int = CLIP_LENGTH,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> FVD:
        """An :class:`FVD` on I3D with its published weights (an explicit ``path``, else
        the cache directory; ``download=True`` fetches it there); raises
        :class:`~neuralhead.errors.WeightsMissingError` saying how to obtain the file when
        it is absent."""
        from neuralhead.pretrained.i3d import I3D

        network = I3D.from_pretrained(path, download=download)
        return cls(network, clip_length=clip_length, batch_size=batch_size)

    def features(self, clips: torch.Tensor) -> np.ndarray:
        """Network features ``(N, D)`` float64 of clips ``(N, 3, clip_length, H, W)``."""
        _check_videos(clips, self.clip_length)
        device = _device(self.network)
        with torch.no_grad():
            chunks = [
                self.network.features(batch.to(device)).double().cpu()
                for batch in clips.split(self.batch_size)
            ]
        return torch.cat(chunks).flatten(1).numpy()

    def update(self, videos: torch.Tensor, *, real: bool) -> None:
        """Add videos ``(B, 3, T, H, W)`` in ``[0, 1]``, ``T >= clip_length``, to one stream,
        cut into clips as the module docstring says."""
        self.update_features(self.features(video_clips(videos, self.clip_length)), real=real)

    def update_frames(self, frames: torch.Tensor, *, real: bool) -> None:
        """Add the next frames ``(N, 3, H, W)`` of one long video to one stream.

        Frames wait until ``clip_length`` of them make a clip, so a video streamed frame by
        frame gives the clips :meth:`update` would give for the whole video at once.
        """
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected RGB frames shaped (N, 3, H, W), got {tuple(frames.shape)}")
        pending = self._pending[real]
        pending.extend(frames.unbind(0))
        while len(pending) >= self.clip_length:
            clip = torch.stack(pending[: self.clip_length], dim=1)[None]
            del pending[: self.clip_length]
            self.update(clip, real=real)

    def update_features(self, features: np.ndarray | torch.Tensor, *, real: bool) -> None:
        """Add features ``(N, D)`` computed by the same network to one stream."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        features = np.asarray(features, np.float64)
        if features.ndim != 2:
            raise ValueError(f"expected features shaped (N, D), got {features.shape}")
        stats = self.real if real else self.generated
        if stats is None:
            stats = FeatureStatistics(features.shape[1])
            if real:
                self.real = stats
            else:
                self.generated = stats
        stats.add(features)

    def num_clips(self, *, real: bool) -> int:
        """Clips added so far to one stream."""
        stats = self.real if real else self.generated
        return 0 if stats is None else stats.count

    def compute(self) -> float:
        """FVD between everything added so far to the two streams (frames still waiting
        for their clip to fill up are left out)."""
        generated, real = self.generated, self.real
        if generated is None or real is None or generated.count < 2 or real.count < 2:
            raise ValueError(
                f"FVD needs at least 2 clips of {self.clip_length} frames per stream, got "
                f"{self.num_clips(real=False)} generated and {self.num_clips(real=True)} real"
            )
        if generated.dim != real.dim:
            raise ValueError(f"feature sets of different widths: {generated.dim} and {real.dim}")
        return frechet_distance(
            generated.mean, generated.covariance(), real.mean, real.covariance()
        )
