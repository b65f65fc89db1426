"""LPIPS, the learned perceptual image patch similarity (Zhang et al., "The Unreasonable
Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018), VGG16 variant v0.1.

Written without torchvision. The feature network is
:class:`neuralhead.pretrained.vgg.VGG16`, whose parameters are named as in torchvision's
``vgg16().features``, and the linear heads are named as in the published
``weights/v0.1/vgg.pth`` of the authors' ``lpips`` package, so that both published files
load unchanged through :mod:`neuralhead.weights`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from neuralhead import weights
from neuralhead.errors import InputError
from neuralhead.metrics.image import _as_batch, _out
from neuralhead.pretrained.vgg import VGG16

#: The VGG16 layers LPIPS compares, and their channels.
LPIPS_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
LPIPS_CHANNELS = (64, 128, 256, 512, 512)

#: Parameter names of the published LPIPS v0.1 VGG heads (read from ``vgg.pth`` in the
#: lpips 0.1.4 wheel): one bias-free 1x1 convolution per tap, shaped ``(1, C, 1, 1)``.
LPIPS_HEAD_KEYS = tuple(f"lin{i}.model.1.weight" for i in range(len(LPIPS_LAYERS)))

# LPIPS's ScalingLayer: maps its [-1, 1] input to ImageNet normalisation. These are the
# ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) moved to [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

_EPS = 1e-10
_MIN_SIZE = 16


class _LinearHead(nn.Module):
    """LPIPS's NetLinLayer: a bias-free 1x1 convolution to one channel.

    Index 0 of ``model`` held the heads' training-time dropout in the original; an identity
    keeps the weight's published name ``model.1.weight`` without making the metric random
    when a parent module is put in training mode.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))
        # Our choice for untrained heads: all ones, which is the uncalibrated "baseline"
        # variant of the paper (squared feature differences summed over channels). The
        # published weights are non-negative too, so the distance stays >= 0.
        nn.init.ones_(self.model[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS distance, VGG16 trunk, version 0.1 (Zhang et al. 2018, Sec. 3 and Eq. 1).

    For images in ``[0, 1]`` shaped ``(B, 3, H, W)`` (or ``(3, H, W)``), ``forward`` returns
    one distance per image, ``(B,)``: both images are mapped to ``[-1, 1]`` and normalised
    as LPIPS's ScalingLayer does, VGG16 activations at relu1_2 ... relu5_3 are unit-normalised
    along channels, their squared differences weighted by the 1x1 heads, averaged over
    space and summed over the five layers. 0 for identical images, larger = less similar.

    A fresh module has untrained weights (fine for tests, meaningless as a metric); use
    :meth:`from_pretrained` for the published ones. All parameters are frozen: gradients
    reach the input images, so the module also serves as a perceptual loss.
    """

    def __init__(self) -> None:
        super().__init__()
        # The trunk only, up to relu5_3: LPIPS applies its own input scaling (below).
        self.net = VGG16(LPIPS_LAYERS)
        for index, channels in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{index}", _LinearHead(channels))
        # Constants, not weights: kept out of the state dict so that it holds exactly the
        # published parameters.
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        vgg_path: str | os.PathLike[str] | None = None,
        heads_path: str | os.PathLike[str] | None = None,
        *,
        download: bool = False,
    ) -> LPIPS:
        """LPIPS with the published weights: torchvision's ImageNet VGG16
        (``vgg16-imagenet``) and the v0.1 heads (``lpips-vgg-v0.1``).

        Files are found and verified by :func:`neuralhead.weights.load_state_dict`
        (explicit paths, else the cache directory); a missing or corrupt file raises
        :class:`~neuralhead.errors.WeightsMissingError` saying how to obtain it.
        """
        model = cls()
        model.net.load_published(
            weights.load_state_dict("vgg16-imagenet", vgg_path, download=download)
        )
        model.load_heads(weights.load_state_dict("lpips-vgg-v0.1", heads_path, download=download))
        return model

    def heads(self) -> list[_LinearHead]:
        return [getattr(self, f"lin{index}") for index in range(len(LPIPS_LAYERS))]

    def load_heads(self, state: dict[str, torch.Tensor]) -> None:
        """Load the linear heads from a state dict keyed like the published ``vgg.pth``."""
        if set(state) != set(LPIPS_HEAD_KEYS):
            raise InputError(
                f"LPIPS heads: expected keys {list(LPIPS_HEAD_KEYS)}, got {sorted(state)}"
            )
        self.load_state_dict(state, strict=False)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        scaled = (images * 2.0 - 1.0 - self.shift) / self.scale
        # vector_norm, not sqrt(sum of squares): its gradient is 0, not NaN, where a
        # feature vector is all zero (a dead ReLU position).
        return [
            f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + _EPS)
            for f in self.net.extract(scaled)
        ]

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target, unbatched = _as_batch(pred, target)
        height, width = pred.shape[-2:]
        if height < _MIN_SIZE or width < _MIN_SIZE:
            raise ValueError(
                f"LPIPS needs images of at least {_MIN_SIZE}x{_MIN_SIZE} pixels (VGG16 pools "
                f"four times before relu5_3), got {height}x{width}"
            )
        pred, target = pred.to(self.shift.dtype), target.to(self.shift.dtype)
        batch = pred.shape[0]
        distance = pred.new_zeros(batch)
        # One pass over both images: half the per-layer overhead of two calls.
        for features, head in zip(self._features(torch.cat([pred, target])), self.heads()):
            f0, f1 = features.split(batch)
            distance = distance + head((f0 - f1) ** 2).mean(dim=(1, 2, 3))
        return _out(distance, unbatched)
