"""Perceptual losses: weighted L1 distances between the feature maps of a frozen network.

Implements L_IN and L_face of MegaPortraits (Sec. 3.1, Eq. 4; EMOPortraits appendix
Sec. 8.3, Eq. 7) and L_VGG of HeadGAN (Appendix B, Eq. 7). The gaze term L_gaze of the same
sum lives in :mod:`neuralhead.losses.gaze`.

The feature network is any module that maps images in [0, 1] of shape ``(B, 3, H, W)`` to a
list of feature maps (for example :class:`neuralhead.pretrained.vgg.VGG19` or
:class:`neuralhead.pretrained.vggface.VGGFace`); it applies its own input normalisation.
The weights between the terms of Eq. 4 (w_IN, w_face) are applied by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError

Criterion = Literal["l1", "l2"]

#: VGG19 layer weights of HeadGAN's authors' code, from the shallowest layer to the deepest.
HEADGAN_VGG_LAYER_WEIGHTS: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)

_DISTANCES = {"l1": F.l1_loss, "l2": F.mse_loss}


def check_image_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    """Raise :class:`InputError` unless ``pred`` and ``target`` are image batches of one shape."""
    if pred.dim() != 4:
        raise InputError(f"expected images of shape (B, C, H, W), got {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise InputError(
            f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
        )


class PerceptualLoss(nn.Module):
    """Weighted sum over layers of the mean distance between features of ``pred`` and ``target``.

    ``loss = sum_l w_l * mean |f_l(pred) - f_l(target)|`` (``criterion="l2"`` squares the
    difference instead). Each layer's distance is a mean over all its elements, so layers of
    different sizes are comparable before weighting; ``layer_weights=None`` weighs every layer
    returned by the network by 1 (MegaPortraits does not publish per-layer weights; HeadGAN's
    are :data:`HEADGAN_VGG_LAYER_WEIGHTS`).

    With ``pyramid_levels > 1`` the loss is also computed on copies of both images average-pooled
    by 2 per level, and the levels are averaged, not summed, so that the paper's loss weights
    keep their meaning whatever the number of levels (the pyramid is our option; the papers
    use a single scale). Odd sizes are pooled by flooring.

    Target features are computed without gradient, so the loss only trains the prediction.
    The network is frozen (its parameters stop requiring gradients) and kept in eval mode even
    when the loss module is switched to training mode; it is registered as a submodule so that
    ``.to(device)`` moves it.
    """

    def __init__(
        self,
        network: nn.Module,
        layer_weights: Sequence[float] | None = None,
        *,
        pyramid_levels: int = 1,
        criterion: Criterion = "l1",
    ) -> None:
        super().__init__()
        if layer_weights is not None and len(layer_weights) == 0:
            raise InputError("layer_weights is empty: give one weight per feature map, or None")
        if pyramid_levels < 1:
            raise InputError(f"pyramid_levels must be at least 1, got {pyramid_levels}")
        if criterion not in _DISTANCES:
            raise InputError(f"criterion must be one of {sorted(_DISTANCES)}, got {criterion!r}")
        self.network = network.eval().requires_grad_(False)
        self.layer_weights = None if layer_weights is None else tuple(map(float, layer_weights))
        self.pyramid_levels = pyramid_levels
        self.criterion = criterion

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.network.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss between image batches ``pred`` and ``target`` ``(B, 3, H, W)`` in [0, 1]."""
        check_image_pair(pred, target)
        smallest = min(pred.shape[-2:])
        if smallest < 2 ** (self.pyramid_levels - 1):
            raise InputError(
                f"images of size {tuple(pred.shape[-2:])} are too small for "
                f"{self.pyramid_levels} pyramid levels"
            )
        total = self._single_scale(pred, target)
        for _ in range(self.pyramid_levels - 1):
            pred = F.avg_pool2d(pred, 2)
            target = F.avg_pool2d(target, 2)
            total = total + self._single_scale(pred, target)
        return total / self.pyramid_levels

    def _single_scale(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred_features = _feature_list(self.network(pred))
        with torch.no_grad():
            target_features = _feature_list(self.network(target))
        weights = self.layer_weights or (1.0,) * len(pred_features)
        if len(weights) != len(pred_features):
            raise InputError(
                f"{len(weights)} layer weights given for a network that returns "
                f"{len(pred_features)} feature maps"
            )
        distance = _DISTANCES[self.criterion]
        terms = [w * distance(p, t) for w, p, t in zip(weights, pred_features, target_features)]
        return torch.stack(terms).sum()


class FacePerceptualLoss(PerceptualLoss):
    """L_face of MegaPortraits Eq. 4: :class:`PerceptualLoss` on a face-recognition network.

    Pass :class:`neuralhead.pretrained.vggface.VGGFace` (or another face network with the same
    call signature) as ``network``. The papers give no per-layer weights, so every layer weighs 1
    by default. The term's weight is applied by the caller: w_face = 4 in MegaPortraits (Sec. 4.1),
    10 in EMOPortraits (appendix Sec. 8.3) and in the authors' code.
    """


def _feature_list(features: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(features, torch.Tensor):
        return [features]
    features = list(features)
    if not features:
        raise InputError("the feature network returned no feature maps")
    return features
