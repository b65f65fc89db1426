"""Training losses shared by HeadGAN, MegaPortraits and EMOPortraits.

:class:`GazeLoss` is imported from :mod:`neuralhead.losses.gaze` on first access, so that
importing this package does not build or load the gaze network's module.
"""

from __future__ import annotations

from typing import Any

from neuralhead.losses.contrastive import (
    large_margin_cosine_loss,
    pair_contrastive_loss,
    source_driver_mismatch_loss,
)
from neuralhead.losses.gan import (
    feature_matching_loss,
    gradient_penalty,
    hinge_discriminator_loss,
    hinge_generator_loss,
    wgan_discriminator_loss,
    wgan_generator_loss,
)
from neuralhead.losses.perceptual import (
    HEADGAN_VGG_LAYER_WEIGHTS,
    FacePerceptualLoss,
    PerceptualLoss,
)
from neuralhead.losses.reconstruction import RegionL1Loss, masked_l1
from neuralhead.losses.temporal import temporal_smoothness

__all__ = [
    "HEADGAN_VGG_LAYER_WEIGHTS",
    "FacePerceptualLoss",
    "GazeLoss",
    "PerceptualLoss",
    "RegionL1Loss",
    "feature_matching_loss",
    "gradient_penalty",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "large_margin_cosine_loss",
    "masked_l1",
    "pair_contrastive_loss",
    "source_driver_mismatch_loss",
    "temporal_smoothness",
    "wgan_discriminator_loss",
    "wgan_generator_loss",
]


def __getattr__(name: str) -> Any:
    if name == "GazeLoss":
        from neuralhead.losses.gaze import GazeLoss

        return GazeLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
