"""HeadGAN's training objective (App. B, Eqs. 3-9).

Generator (Eq. 8)::

    L_G = L_GAN(D) + L_GAN(D_m)                       hinge, Eq. 3
          + λ_FM (L_FM(D) + L_FM(D_m))                feature matching on both discriminators
          + λ_L1 L1(ỹ, y) + λ_VGG VGG(ỹ, y)             Eqs. 6-7, generated frame
          + λ_L1 L1(ȳ_ref, y) + λ_VGG VGG(ȳ_ref, y)     the same on the warped reference

with λ_L1 = 50 and λ_VGG = λ_FM = 10; VGG is VGG19 relu1_1 .. relu5_1 with the layer weights
1/32 .. 1 of the authors' code. Discriminators (Eqs. 4, 5, 9): the hinge loss of D on
(render, frame) pairs and of D_m on mouth crops with audio.

The building blocks come from :mod:`neuralhead.losses`; their normalisation (every loss a
mean over elements, discriminator scales and feature-matching layers averaged) is ours, the
paper does not state one. The authors' code sums feature matching over layers with weight
4 / (layers + 1), about 4 times our mean for 4-layer discriminators, and additionally
supervises the flow mask with a face mask (a term the paper does not describe; left out).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.headgan.config import HeadGANConfig
from neuralhead.losses import (
    HEADGAN_VGG_LAYER_WEIGHTS,
    PerceptualLoss,
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    masked_l1,
)
from neuralhead.losses.gan import DiscriminatorOutput

#: Render values above this count as face when ``l1_region="face"`` (authors' code).
FACE_THRESHOLD = 0.01


class HeadGANLoss(nn.Module):
    """The generator and discriminator objectives of HeadGAN for one training step.

    ``vgg`` is a feature network mapping images in [0, 1] to five feature maps, shallowest
    first: :class:`neuralhead.pretrained.vgg.VGG19` with its default layers, loaded by the
    caller (``VGG19.from_pretrained()``). With ``vgg=None`` the two VGG terms are unavailable:
    they are left out of the total and of the returned terms, never replaced by a stand-in.

    Terms whose weight in the config is 0 are not computed. Both methods return
    ``(total, terms)``: ``total`` is the weighted sum to back-propagate and ``terms`` maps each
    computed term's name to its unweighted, detached value for logging; the weights are
    :attr:`weights`.
    """

    def __init__(self, config: HeadGANConfig, vgg: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.perceptual = (
            PerceptualLoss(vgg, HEADGAN_VGG_LAYER_WEIGHTS) if vgg is not None else None
        )

    @property
    def weights(self) -> dict[str, float]:
        """Weight of every generator term (see :attr:`HeadGANConfig.loss_weights`)."""
        return self.config.loss_weights

    def generator_loss(
        self,
        outputs: Mapping[str, torch.Tensor],
        target: torch.Tensor,
        *,
        d_fake: DiscriminatorOutput | None = None,
        d_real: DiscriminatorOutput | None = None,
        dm_fake: DiscriminatorOutput | None = None,
        dm_real: DiscriminatorOutput | None = None,
        render: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_G of Eq. 8.

        Args:
            outputs: the generator's output, with ``"image"`` and ``"warped_image"``.
            target: the ground-truth frame ``(B, 3, H, W)`` in [0, 1] (self-reenactment).
            d_fake, d_real: the image discriminator's features of the generated frame (not
                detached) and of the real frame, both or neither; neither leaves the GAN and
                feature-matching terms out (e.g. while pre-training without discriminators).
            dm_fake, dm_real: the same for the mouth discriminator.
            render: the 3D face render of the target frame ``(B, 3, H, W)``, needed when
                ``config.l1_region == "face"``.
        """
        image, warped = _output(outputs, "image"), _output(outputs, "warped_image")
        for name, tensor in (("image", image), ("warped_image", warped)):
            if tensor.shape != target.shape or target.dim() != 4:
                raise InputError(
                    f"HeadGANLoss: outputs[{name!r}] {tuple(tensor.shape)} and target "
                    f"{tuple(target.shape)} must be image batches of one shape"
                )
        weights = self.weights
        terms: dict[str, torch.Tensor] = {}
        discriminators = (("", "d", d_fake, d_real), ("mouth_", "dm", dm_fake, dm_real))
        for prefix, arg, fake, real in discriminators:
            if (fake is None) != (real is None):
                raise InputError(
                    f"HeadGANLoss: pass both {arg}_fake and {arg}_real discriminator outputs "
                    "(feature matching compares them), or neither"
                )
            if fake is None:
                continue
            if weights[f"{prefix}gan"]:
                terms[f"{prefix}gan"] = hinge_generator_loss(fake)
            if weights[f"{prefix}feature_matching"]:
                terms[f"{prefix}feature_matching"] = feature_matching_loss(real, fake)
        face = self._face_mask(render, target) if self.config.l1_region == "face" else None
        for prefix, prediction in (("", image), ("warp_", warped)):
            if weights[f"{prefix}l1"]:
                terms[f"{prefix}l1"] = _l1(prediction, target, face)
            if weights[f"{prefix}vgg"] and self.perceptual is not None:
                terms[f"{prefix}vgg"] = self.perceptual(prediction, target)
        return _weighted_sum(terms, weights), _detached(terms)

    def discriminator_loss(
        self,
        d_real: DiscriminatorOutput,
        d_fake: DiscriminatorOutput,
        dm_real: DiscriminatorOutput | None = None,
        dm_fake: DiscriminatorOutput | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_D + L_Dm (Eqs. 4, 5, 9): hinge losses on real and detached generated inputs.

        The two discriminators share no parameters, so minimising the sum trains each on its
        own loss. ``terms`` holds ``"d"`` and, when the mouth outputs are given, ``"d_mouth"``.
        """
        terms = {"d": hinge_discriminator_loss(d_real, d_fake)}
        if (dm_real is None) != (dm_fake is None):
            raise InputError("HeadGANLoss: pass both dm_real and dm_fake, or neither")
        if dm_real is not None:
            terms["d_mouth"] = hinge_discriminator_loss(dm_real, dm_fake)
        total = torch.stack(list(terms.values())).sum()
        return total, _detached(terms)

    def _face_mask(self, render: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = target.shape
        if render is None or render.dim() != 4 or render.shape[0] != batch:
            got = None if render is None else tuple(render.shape)
            raise InputError(
                f"HeadGANLoss with l1_region='face' needs the target frame's render "
                f"({batch}, C, {height}, {width}), got {got}"
            )
        if render.shape[-2:] != target.shape[-2:]:
            raise InputError(
                f"render size {tuple(render.shape[-2:])} differs from the target's "
                f"{tuple(target.shape[-2:])}"
            )
        return (render.sum(dim=1, keepdim=True) > FACE_THRESHOLD).to(target.dtype)


def _output(outputs: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in outputs:
        raise InputError(f"HeadGANLoss: generator outputs lack {key!r} (got {sorted(outputs)})")
    return outputs[key]


def _l1(prediction: torch.Tensor, target: torch.Tensor, face: torch.Tensor | None) -> torch.Tensor:
    """Eq. 6 over the whole frame, or over the face averaged over the frame (authors' code)."""
    if face is None:
        return F.l1_loss(prediction, target)
    return masked_l1(prediction, target, face, normalize="image")


def _weighted_sum(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    if not terms:
        raise InputError("HeadGANLoss: every generator term is disabled or unavailable")
    return torch.stack([weights[name] * value for name, value in terms.items()]).sum()


def _detached(terms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach() for name, value in terms.items()}
