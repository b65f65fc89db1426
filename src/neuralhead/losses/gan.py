"""Adversarial losses: hinge GAN with feature matching, and WGAN-GP.

Hinge loss and feature matching train MegaPortraits (Sec. 3.1, Eq. 5), EMOPortraits
(appendix Sec. 8.3, Eq. 10) and HeadGAN (Appendix B, Eqs. 3-5). WGAN-GP (Gulrajani et al.
2017) trains EMOPortraits' audio-to-rotation generator (appendix Sec. 10.4, Eqs. 21-22).
HeadGAN needs no other GAN objective, so no non-saturating or least-squares variant is defined.

Every function accepts a discriminator output in the forms of
:mod:`neuralhead.nn.discriminators`:

- a tensor of logits (any shape, e.g. ``(B, 1, h, w)`` patch logits);
- one discriminator's list of feature maps whose last element is the logits
  (``PatchDiscriminator``, ``TemporalPatchDiscriminator1d``);
- a list over scales of such lists (``MultiScalePatchDiscriminator``).

``SequenceDiscriminator`` returns ``(score, features)``: pass its ``score``.

Each scale's logits are averaged over all their elements and the scales are averaged, so the
loss weights of the papers do not depend on the number of scales or the patch count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch
import torch.nn.functional as F

from neuralhead.errors import InputError

DiscriminatorOutput = Union[torch.Tensor, Sequence[torch.Tensor], Sequence[Sequence[torch.Tensor]]]


def hinge_discriminator_loss(
    real_logits: DiscriminatorOutput, fake_logits: DiscriminatorOutput
) -> torch.Tensor:
    """``E[max(0, 1 - D(real))] + E[max(0, 1 + D(fake))]`` (HeadGAN Eq. 4).

    Detach the generated images before the discriminator pass that produces ``fake_logits``.
    """
    real, fake = _scale_logits(real_logits), _scale_logits(fake_logits)
    _check_scale_count(real, fake)
    terms = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)]
    return torch.stack(terms).mean()


def hinge_generator_loss(fake_logits: DiscriminatorOutput) -> torch.Tensor:
    """``-E[D(fake)]``: L_adv of MegaPortraits Eq. 5 and HeadGAN Eq. 3."""
    return -_mean_over_scales(_scale_logits(fake_logits))


def feature_matching_loss(
    real_features: DiscriminatorOutput, fake_features: DiscriminatorOutput
) -> torch.Tensor:
    """L_FM (Wang et al. 2018; MegaPortraits Eq. 5, HeadGAN Eq. 8): L1 of discriminator features.

    Both arguments are one discriminator's list of feature maps or a list over scales of such
    lists; the last element of each list, the logits, is left out. The mean absolute
    difference of each feature map is averaged over the layers of a scale and then over the
    scales (our normalisation: the papers do not state theirs). Real features are detached, so
    only the generator is trained.
    """
    real, fake = _as_scales(real_features), _as_scales(fake_features)
    _check_scale_count(real, fake)
    per_scale = []
    for scale, (real_scale, fake_scale) in enumerate(zip(real, fake)):
        if len(real_scale) != len(fake_scale):
            raise InputError(
                f"scale {scale}: {len(real_scale)} real and {len(fake_scale)} fake feature maps"
            )
        if len(real_scale) < 2:
            raise InputError(
                f"scale {scale} holds only logits: feature matching needs intermediate features"
            )
        layers = [F.l1_loss(f, r.detach()) for r, f in zip(real_scale[:-1], fake_scale[:-1])]
        per_scale.append(torch.stack(layers).mean())
    return torch.stack(per_scale).mean()


def wgan_discriminator_loss(
    real_logits: DiscriminatorOutput, fake_logits: DiscriminatorOutput
) -> torch.Tensor:
    """``E[D(fake)] - E[D(real)]``: the WGAN critic loss (EMOPortraits Eq. 21 without its penalty).

    Add :func:`gradient_penalty` to it for WGAN-GP.
    """
    real, fake = _scale_logits(real_logits), _scale_logits(fake_logits)
    _check_scale_count(real, fake)
    return _mean_over_scales(fake) - _mean_over_scales(real)


def wgan_generator_loss(fake_logits: DiscriminatorOutput) -> torch.Tensor:
    """``-E[D(fake)]`` (EMOPortraits Eq. 22)."""
    return -_mean_over_scales(_scale_logits(fake_logits))


def gradient_penalty(
    discriminator: Callable[..., DiscriminatorOutput],
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    condition: torch.Tensor | None = None,
    weight: float = 10.0,
) -> torch.Tensor:
    """``weight * E[(||grad_x D(x_hat)||_2 - 1)^2]`` on random interpolates (EMOPortraits Eq. 21).

    ``x_hat = a * real + (1 - a) * fake`` with one ``a ~ U(0, 1)`` per sample. ``real`` and
    ``fake`` are detached first, so the penalty trains only the discriminator; the gradient is
    taken with ``create_graph=True`` so the penalty itself can be backpropagated.

    A sample's score ``D(x_hat)`` is the mean of its logits (over patches, then over scales), the
    judgement EMOPortraits' temporal PatchGAN averages to. The per-sample gradient is exact only
    for discriminators that treat samples independently (no batch normalisation), as WGAN-GP
    requires anyway. ``condition``, if given, is passed unchanged as the discriminator's second
    argument (e.g. the audio features of EMOPortraits' global discriminator); it is not
    interpolated. ``weight`` is lambda, 10 in the paper.
    """
    if real.shape != fake.shape:
        raise InputError(
            f"real {tuple(real.shape)} and fake {tuple(fake.shape)} samples differ in shape"
        )
    alpha_shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    alpha = torch.rand(alpha_shape, device=real.device, dtype=real.dtype)
    interpolates = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    output = (
        discriminator(interpolates) if condition is None else discriminator(interpolates, condition)
    )
    scores = torch.stack(
        [logits.reshape(logits.shape[0], -1).mean(dim=1) for logits in _scale_logits(output)]
    ).mean(dim=0)
    (gradient,) = torch.autograd.grad(scores.sum(), interpolates, create_graph=True)
    # The epsilon keeps the backward pass finite where the gradient vanishes.
    norm = torch.sqrt(gradient.flatten(1).pow(2).sum(dim=1) + 1e-12)
    return weight * (norm - 1).pow(2).mean()


def _as_scales(output: DiscriminatorOutput) -> list[list[torch.Tensor]]:
    """A list over scales of lists of feature maps ending with the logits."""
    if isinstance(output, torch.Tensor):
        return [[output]]
    items = list(output)
    if items and all(isinstance(item, torch.Tensor) for item in items):
        return [items]
    if items and all(
        not isinstance(scale, torch.Tensor)
        and len(scale) > 0
        and all(isinstance(item, torch.Tensor) for item in scale)
        for scale in items
    ):
        return [list(scale) for scale in items]
    raise InputError(
        "a discriminator output must be a tensor of logits, a list of feature maps ending with "
        "the logits, or a list over scales of such lists"
    )


def _scale_logits(output: DiscriminatorOutput) -> list[torch.Tensor]:
    return [scale[-1] for scale in _as_scales(output)]


def _check_scale_count(real: Sequence[object], fake: Sequence[object]) -> None:
    if len(real) != len(fake):
        raise InputError(
            f"real and fake discriminator outputs have {len(real)} and {len(fake)} scales"
        )


def _mean_over_scales(logits: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([scale.mean() for scale in logits]).mean()
