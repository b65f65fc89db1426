"""The training objective of DNP, Eq. 4: ``L = ||Ĩ_i - I_i||² + ||C_i - I'_i||²``.

Both terms are mean squared errors; ``I'_i`` is the ground-truth frame area-averaged to the
feature map's resolution. The paper found L1, perceptual and adversarial losses worse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neuralhead.dnp.model import DNPOutput


def reconstruction_loss(output: DNPOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss terms of Eq. 4 for target frames ``(B, 3, H, W)`` in [-1, 1]; ``total`` sums them."""
    terms = {"rec": F.mse_loss(output.image.float(), target)}
    if output.rgb is not None:
        small = F.interpolate(target, size=output.rgb.shape[-2:], mode="area")
        terms["rec_lowres"] = F.mse_loss(output.rgb.float(), small)
    terms["total"] = sum(terms.values())
    return terms
