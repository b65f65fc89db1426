"""The training objective of the MegaPortraits base model (Sec. 3.1, Eqs. 4-8; Sec. 4.1).

Generator (Eq. 8)::

    L_base = w_IN L_IN + w_face L_face + w_gaze L_gaze      perceptual, Eq. 4
             + w_adv L_adv + w_FM L_FM                      GAN, Eq. 5
             + w_cos L_cos                                  cycle consistency, Eqs. 6-7

with the weights of the config (Sec. 4.1: 20, 4, 5, 1, 40, 2; s = 5, m = 0.2). L_IN is an
L1 distance between VGG19 features (ImageNet), computed on an image pyramid (averaged over
levels, :class:`~neuralhead.losses.PerceptualLoss`); L_face the same with VGGFace; L_gaze
the distilled gaze network's feature distance on eye patches placed by the target's
landmarks (:class:`~neuralhead.losses.GazeLoss`). The discriminator is a multi-scale patch
discriminator trained with the hinge loss; L_FM matches its features.

"These losses are calculated using only foreground regions" (Sec. 3.1): the target is the
driver frame with everything outside its foreground mask replaced by a constant colour
(:func:`foreground`), so the model learns to paint the background that colour and never
generates one (the background is composited back after training). We composite the target
only: the prediction is left whole so that its background, too, is trained to the constant.

L_cos (Eqs. 6-7) compares expression codes: positive pairs ``(z_s->d, z_d)`` and
``(z_s*->d, z_d)``, negative pairs ``(z_s->d, z_d*)`` and ``(z_s*->d, z_d*)``, where
``z_s->d`` and ``z_s*->d`` are the codes E_mtn gives the predicted images x_s->d and
x_s*->d (the cycle: the motion read back from an output must be the driver's, whichever
source it was rendered from), ``z_d`` the driver's and ``z_d*`` that of a driver from
another video. :func:`contrastive_ranking` is the matching check: the fraction of
(positive, negative) comparisons the positive wins.

A term whose pretrained network is missing is left out of the total and of the logged terms,
never replaced by a stand-in (the trainer warns once); a term whose weight is 0 is not
computed. ``l1_weight`` adds a foreground L1 between prediction and target, which the paper
does not use (our option, off by default). The config's ``weight_mismatch`` adds the
source-driver mismatch ``max(0, cos(z_s, z_d) - margin)`` of the authors' code (off by
default, as in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.losses import (
    FacePerceptualLoss,
    PerceptualLoss,
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    pair_contrastive_loss,
    source_driver_mismatch_loss,
)
from neuralhead.losses.gan import DiscriminatorOutput
from neuralhead.losses.gaze import GazeLoss
from neuralhead.megaportraits.config import MegaPortraitsConfig

#: Grey level the background is filled with (our choice: black, what multiplying a frame by
#: its mask gives; the paper only says the model generates no background).
BACKGROUND = 0.0

#: Smallest side of an image pyramid level of the VGG19 loss (our choice: VGG19's fifth block
#: then still sees 2x2 features).
MIN_PYRAMID_SIZE = 32

#: Term names in the order of Eq. 8, and the config field holding each weight.
TERM_WEIGHTS = {
    "vgg19": "weight_vgg19",
    "vggface": "weight_vggface",
    "gaze": "weight_gaze",
    "adversarial": "weight_adv",
    "feature_matching": "weight_fm",
    "contrastive": "weight_cos",
    "mismatch": "weight_mismatch",
}


def foreground(
    image: torch.Tensor, mask: torch.Tensor, background: float = BACKGROUND
) -> torch.Tensor:
    """``image`` inside ``mask`` ``(B, 1, H, W)`` and the constant ``background`` outside."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:]:
        raise InputError(
            f"mask must have shape (B, 1, {image.shape[-2]}, {image.shape[-1]}) for images "
            f"{tuple(image.shape)}, got {tuple(mask.shape)}"
        )
    return image * mask + background * (1 - mask)


def pyramid_levels(image_size: int, wanted: int = 3) -> int:
    """Levels of the VGG19 pyramid at ``image_size``: ``wanted``, fewer if a level would fall
    below :data:`MIN_PYRAMID_SIZE` pixels (at least one)."""
    levels = 1
    while levels < wanted and image_size >> levels >= MIN_PYRAMID_SIZE:
        levels += 1
    return levels


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1, eps=1e-8)


def contrastive_pairs(
    z_pred: torch.Tensor,
    z_cross_pred: torch.Tensor,
    z_driver: torch.Tensor,
    z_other_driver: torch.Tensor,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The positive and negative pairs of Sec. 3.1: ``P = [(z_s->d, z_d), (z_s*->d, z_d)]``,
    ``N = [(z_s->d, z_d*), (z_s*->d, z_d*)]``."""
    positive = [(z_pred, z_driver), (z_cross_pred, z_driver)]
    negative = [(z_pred, z_other_driver), (z_cross_pred, z_other_driver)]
    return positive, negative


@torch.no_grad()
def contrastive_ranking(
    z_pred: torch.Tensor,
    z_cross_pred: torch.Tensor,
    z_driver: torch.Tensor,
    z_other_driver: torch.Tensor,
) -> torch.Tensor:
    """Fraction of (positive, negative) pair comparisons of Eq. 7 where the positive pair is
    the more similar (cosine), over the batch: 1 means every positive outranks every
    negative, 0.5 is chance. Ties count half."""
    return pair_ranking(*contrastive_pairs(z_pred, z_cross_pred, z_driver, z_other_driver))


@torch.no_grad()
def pair_ranking(
    positive: list[tuple[torch.Tensor, torch.Tensor]],
    negative: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Fraction of (positive, negative) comparisons, per sample and over every pair of each
    list, where the positive pair has the higher cosine similarity; ties count half."""
    pos = torch.stack([_cosine(a, b) for a, b in positive], dim=1)  # (B, P)
    neg = torch.stack([_cosine(a, b) for a, b in negative], dim=1)  # (B, N)
    difference = pos[:, :, None] - neg[:, None, :]
    wins = (difference > 0).float() + 0.5 * (difference == 0).float()
    return wins.mean()


class MegaPortraitsLoss(nn.Module):
    """Generator and discriminator objectives of the MegaPortraits base model for one step.

    Args:
        config: the weights ``weight_*``, ``cos_scale`` and ``cos_margin`` are read.
        vgg19, vggface: feature networks (images in [0, 1] -> list of feature maps), e.g.
            :class:`~neuralhead.pretrained.vgg.VGG19` and
            :class:`~neuralhead.pretrained.vggface.VGGFace`; ``None``: the term is unavailable.
        gaze: the distilled :class:`~neuralhead.pretrained.gaze.GazeBlinkNet`, or ``None``.
        vgg19_pyramid: levels of the VGG19 image pyramid (see :func:`pyramid_levels`).
        l1_weight: weight of an optional foreground L1 term (not in the paper; 0: off).

    Both methods return ``(total, terms)``: the weighted sum to back-propagate and each
    computed term's unweighted value, detached, for logging. :attr:`weights` gives the
    weights; :attr:`unavailable` the terms left out for a missing network.
    """

    def __init__(
        self,
        config: MegaPortraitsConfig,
        *,
        vgg19: nn.Module | None = None,
        vggface: nn.Module | None = None,
        gaze: nn.Module | None = None,
        vgg19_pyramid: int = 1,
        l1_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if l1_weight < 0:
            raise InputError(f"l1_weight must not be negative, got {l1_weight}")
        self.config = config
        self.l1_weight = float(l1_weight)
        self.vgg19 = None if vgg19 is None else PerceptualLoss(vgg19, pyramid_levels=vgg19_pyramid)
        self.vggface = None if vggface is None else FacePerceptualLoss(vggface)
        self.gaze = None if gaze is None else GazeLoss(gaze)

    @property
    def weights(self) -> dict[str, float]:
        """Weight of every generator term (Eq. 8), from the config."""
        weights = {name: float(getattr(self.config, field)) for name, field in TERM_WEIGHTS.items()}
        weights["l1"] = self.l1_weight
        return weights

    @property
    def unavailable(self) -> list[str]:
        """Weighted perceptual terms that cannot be computed because their network is missing."""
        weights = self.weights
        missing = {"vgg19": self.vgg19, "vggface": self.vggface, "gaze": self.gaze}
        return [name for name, network in missing.items() if network is None and weights[name]]

    def generator_loss(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        *,
        landmarks: torch.Tensor | None = None,
        d_fake: DiscriminatorOutput | None = None,
        d_real: DiscriminatorOutput | None = None,
        z_pred: torch.Tensor | None = None,
        z_cross_pred: torch.Tensor | None = None,
        z_driver: torch.Tensor | None = None,
        z_other_driver: torch.Tensor | None = None,
        z_source: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_base of Eq. 8.

        Args:
            pred: x_s->d ``(B, 3, H, W)`` in [0, 1].
            target: the driver frame with its background replaced (:func:`foreground`).
            landmarks: the target's landmarks ``(B, K, 2 or 3)`` in pixels (for L_gaze).
            d_fake, d_real: the discriminator's outputs for ``pred`` (not detached) and for
                ``target``, both or neither (neither leaves L_adv and L_FM out).
            z_pred, z_cross_pred, z_driver, z_other_driver: z_s->d, z_s*->d, z_d, z_d*, all
                or none (none leaves L_cos out).
            z_source: z_s, for the optional mismatch term (with ``z_driver``).
        """
        weights = self.weights
        terms = self._image_terms(pred, target, landmarks=landmarks, d_fake=d_fake, d_real=d_real)
        codes = (z_pred, z_cross_pred, z_driver, z_other_driver)
        if any(z is not None for z in codes):
            if any(z is None for z in codes):
                raise InputError(
                    "the cycle-consistency loss needs z_pred, z_cross_pred, z_driver and "
                    "z_other_driver together"
                )
            if weights["contrastive"]:
                positive, negative = contrastive_pairs(*codes)
                terms["contrastive"] = pair_contrastive_loss(
                    positive,
                    negative,
                    scale=self.config.cos_scale,
                    margin=self.config.cos_margin,
                )
        if weights["mismatch"] and z_source is not None and z_driver is not None:
            terms["mismatch"] = source_driver_mismatch_loss(
                z_source.float(), z_driver.float(), margin=self.config.mismatch_margin
            )
        if not terms:
            raise InputError("every generator term is disabled or unavailable")
        total = torch.stack([weights[name] * value.float() for name, value in terms.items()]).sum()
        return total, _detached(terms)

    def _image_terms(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        *,
        landmarks: torch.Tensor | None,
        d_fake: DiscriminatorOutput | None,
        d_real: DiscriminatorOutput | None,
    ) -> dict[str, torch.Tensor]:
        """The terms computed from the images and the discriminator's outputs (perceptual, GAN
        and the optional L1), unweighted and attached; shared with the EMOPortraits objective."""
        if pred.dim() != 4 or pred.shape != target.shape:
            raise InputError(
                f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} must be "
                "image batches (B, 3, H, W) of one shape"
            )
        weights = self.weights
        terms: dict[str, torch.Tensor] = {}
        if weights["vgg19"] and self.vgg19 is not None:
            terms["vgg19"] = self.vgg19(pred, target)
        if weights["vggface"] and self.vggface is not None:
            terms["vggface"] = self.vggface(pred, target)
        if weights["gaze"] and self.gaze is not None:
            if landmarks is None:
                raise InputError("the gaze loss needs the target's landmarks")
            terms["gaze"] = self.gaze(pred, target, landmarks)
        if (d_fake is None) != (d_real is None):
            raise InputError(
                "pass both d_fake and d_real (feature matching compares them), or neither"
            )
        if d_fake is not None:
            if weights["adversarial"]:
                terms["adversarial"] = hinge_generator_loss(d_fake)
            if weights["feature_matching"]:
                terms["feature_matching"] = feature_matching_loss(d_real, d_fake)
        if weights["l1"]:
            terms["l1"] = F.l1_loss(pred, target)
        return terms

    def discriminator_loss(
        self, d_real: DiscriminatorOutput, d_fake: DiscriminatorOutput
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The hinge loss of the patch discriminator on real targets and detached predictions."""
        loss = hinge_discriminator_loss(d_real, d_fake)
        return loss, {"discriminator": loss.detach()}


def _detached(terms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach() for name, value in terms.items()}
