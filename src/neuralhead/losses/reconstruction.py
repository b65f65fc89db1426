"""Masked pixel L1 losses.

- L_head of EMOPortraits (appendix Sec. 8.3, Eq. 8): L1 on the eye, mouth and ear regions
  given by a face parser, ``w_eyes L_eyes + w_mouth L_mouth + w_ears L_ears``.
- The face-region L1 of HeadGAN (Appendix B, Eq. 6; restricted to the face in the authors' code).
- L_lips of EMOPortraits' speech encoder (appendix Sec. 9.3, Eq. 14) on the mouth region.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from neuralhead.errors import InputError

Normalisation = Literal["mask", "image"]


def masked_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalize: Normalisation = "mask",
) -> torch.Tensor:
    """Mean absolute error of ``pred`` against ``target`` inside ``mask``.

    ``pred`` and ``target`` have shape ``(B, C, H, W)``; ``mask`` has shape ``(B, 1, H, W)``,
    ``(B, H, W)`` or ``(B, C, H, W)`` with values in [0, 1] (soft masks weight pixels).

    ``normalize="mask"`` divides the masked error summed over the whole batch by the mask's
    total area (times the channels it covers): the loss is the mean error per masked pixel,
    whatever the region's size, and pixels of every sample count alike. An empty mask gives 0.
    ``normalize="image"`` divides by the number of elements of ``pred`` instead, so that small
    regions contribute little; the papers do not say which they use (the large weights of the
    authors' code, 500 per region, suggest the second).
    """
    if pred.dim() != 4 or pred.shape != target.shape:
        raise InputError(
            f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} must be image "
            "batches (B, C, H, W) of one shape"
        )
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    batch, channels, height, width = pred.shape
    if mask.dim() != 4 or mask.shape not in (
        (batch, 1, height, width),
        (batch, channels, height, width),
    ):
        raise InputError(
            f"mask {tuple(mask.shape)} does not fit images {tuple(pred.shape)}: expected "
            f"({batch}, 1, {height}, {width}) or ({batch}, {height}, {width})"
        )
    mask = mask.to(pred.dtype)
    error = ((pred - target).abs() * mask).sum()
    if normalize == "image":
        return error / pred.numel()
    if normalize != "mask":
        raise InputError(f"normalize must be 'mask' or 'image', got {normalize!r}")
    area = mask.sum() * (channels // mask.shape[1])
    # A region absent from every image (closed eyes, hidden ears) contributes nothing.
    return error / area.clamp_min(1e-8)


class RegionL1Loss(nn.Module):
    """Weighted sum of :func:`masked_l1` over named regions, as in EMOPortraits' L_head (Eq. 8).

    ``weights`` maps region names to weights, e.g. ``{"eyes": w, "mouth": w, "ears": w}`` (500
    each in the authors' code; the paper gives no values). ``forward`` takes a mapping from
    region names to masks that must hold every weighted region; other regions are ignored, so
    the full output of a face parser can be passed.
    """

    def __init__(self, weights: Mapping[str, float], *, normalize: Normalisation = "mask") -> None:
        super().__init__()
        if not weights:
            raise InputError("RegionL1Loss needs at least one region weight")
        if normalize not in ("mask", "image"):
            raise InputError(f"normalize must be 'mask' or 'image', got {normalize!r}")
        self.weights = {name: float(w) for name, w in weights.items()}
        self.normalize = normalize

    def terms(
        self, pred: torch.Tensor, target: torch.Tensor, masks: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Unweighted masked L1 of each weighted region, for logging."""
        missing = sorted(set(self.weights) - set(masks))
        if missing:
            raise InputError(
                f"no mask given for region(s) {', '.join(missing)}; got {', '.join(sorted(masks))}"
            )
        return {
            name: masked_l1(pred, target, masks[name], normalize=self.normalize)
            for name in self.weights
        }

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, masks: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        terms = self.terms(pred, target, masks)
        return torch.stack([self.weights[name] * term for name, term in terms.items()]).sum()
