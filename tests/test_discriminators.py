"""Discriminators: return structure, conditioning, receptive field, gradients, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from neuralhead.errors import InputError
from neuralhead.nn.discriminators import (
    MultiScalePatchDiscriminator,
    PatchDiscriminator,
    SequenceDiscriminator,
    TemporalPatchDiscriminator1d,
)


def assert_gradients_reach_every_parameter(module: nn.Module, output: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    (output.square().mean() + output.mean()).backward()
    for name, param in module.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(param.grad).all(), f"non-finite gradient for {name}"


def convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]


# --------------------------------------------------------------------------------------------
# Multi-scale PatchGAN


@pytest.mark.parametrize("norm", ["spectral", "instance", "spectral+instance", "none"])
def test_multiscale_structure_and_gradients(norm: str) -> None:
    torch.manual_seed(0)
    disc = MultiScalePatchDiscriminator(
        3, num_scales=3, num_layers=3, base_channels=4, max_channels=8, norm=norm
    )
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    outputs = disc(x)
    assert len(outputs) == 3
    for features in outputs:
        assert [f.shape[1] for f in features] == [4, 8, 8, 1]
        assert all(f.shape[0] == 2 for f in features)
    sizes = [features[-1].shape[-1] for features in outputs]
    assert sizes[0] > sizes[1] > sizes[2]  # finest scale first
    logits = torch.cat([features[-1].flatten(1) for features in outputs], dim=1)
    assert_gradients_reach_every_parameter(disc, logits)
    assert x.grad is not None and x.grad.abs().sum() > 0

    spectral = "spectral" in norm
    assert all(parametrize.is_parametrized(c, "weight") == spectral for c in convs(disc))
    instance_norms = [m for m in disc.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(instance_norms) == (3 * 2 if "instance" in norm else 0)  # not on the first layer


def test_single_patch_discriminator_layout() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(3, num_layers=4, base_channels=4, max_channels=16)
    features = disc(torch.randn(1, 3, 32, 32))
    # Three stride-2 layers, one stride-1 layer and the stride-1 logits conv (4x4, padding 2).
    assert [tuple(f.shape[1:]) for f in features] == [
        (4, 17, 17),
        (8, 9, 9),
        (16, 5, 5),
        (16, 6, 6),
        (1, 7, 7),
    ]


def test_multiscale_condition_as_map_or_tiled_vector() -> None:
    torch.manual_seed(0)
    disc = MultiScalePatchDiscriminator(
        3, condition_channels=5, num_scales=2, num_layers=2, base_channels=4
    ).eval()  # eval: no power iteration between the two calls
    x = torch.randn(2, 3, 16, 16)
    vector = torch.randn(2, 5, requires_grad=True)
    tiled = vector[:, :, None, None].expand(2, 5, 16, 16)
    from_vector = disc(x, vector)
    from_map = disc(x, tiled)
    for a, b in zip(from_vector, from_map):
        torch.testing.assert_close(a[-1], b[-1])
    from_vector[-1][-1].sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0


def test_multiscale_rejects_bad_input() -> None:
    disc = MultiScalePatchDiscriminator(3, condition_channels=2, num_layers=2, base_channels=4)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(InputError, match=r"expects a tensor of shape \(B, 3, H, W\)"):
        disc(torch.randn(1, 4, 16, 16), torch.randn(1, 2))
    with pytest.raises(InputError, match=r"condition of shape \(1, 2\) or \(1, 2, 16, 16\)"):
        disc(x)
    with pytest.raises(InputError, match="condition of shape"):
        disc(x, torch.randn(1, 2, 8, 8))
    with pytest.raises(InputError, match="without condition_channels"):
        MultiScalePatchDiscriminator(3, num_layers=2, base_channels=4)(x, torch.randn(1, 2))
    with pytest.raises(InputError, match="unknown discriminator norm"):
        MultiScalePatchDiscriminator(3, norm="batch")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Temporal PatchGAN (EMOPortraits' local content discriminator)


def test_temporal_patch_logits_see_exactly_n_frames() -> None:
    torch.manual_seed(0)
    disc = TemporalPatchDiscriminator1d(9, patch_frames=8, num_layers=3, base_channels=4).eval()
    x = torch.randn(1, 9, 20)
    features = disc(x)
    logits = features[-1]
    assert [f.shape[1] for f in features] == [4, 8, 16, 1]
    assert logits.shape == (1, 1, 20 - 8 + 1)
    changed = x.clone()
    changed[..., 10] += 1.0
    moved = (disc(changed)[-1] - logits).abs().flatten() > 1e-7
    # Window p covers frames p..p+7; frame 10 lies in windows 3..10.
    assert moved.nonzero().flatten().tolist() == list(range(3, 11))


@pytest.mark.parametrize("norm", ["spectral", "instance", "none"])
def test_temporal_patch_gradients(norm: str) -> None:
    torch.manual_seed(0)
    disc = TemporalPatchDiscriminator1d(9, patch_frames=6, num_layers=2, base_channels=4, norm=norm)
    x = torch.randn(2, 9, 12)
    features = disc(x)
    assert features[-1].shape == (2, 1, 7)
    assert_gradients_reach_every_parameter(disc, features[-1])


def test_temporal_patch_rejects_bad_input() -> None:
    disc = TemporalPatchDiscriminator1d(9, base_channels=4)
    with pytest.raises(InputError, match=r"\(B, 9, T\)"):
        disc(torch.randn(1, 6, 20))
    with pytest.raises(InputError, match="at least 8 frames"):
        disc(torch.randn(1, 9, 7))
    with pytest.raises(InputError, match="patch_frames = 8"):
        TemporalPatchDiscriminator1d(9, patch_frames=8, num_layers=4, kernel_size=3)


# --------------------------------------------------------------------------------------------
# Sequence discriminator (EMOPortraits' global content discriminator)


@pytest.mark.parametrize("conditioning", ["concat", "projection"])
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_sequence_discriminator_scores_and_gradient_penalty(
    conditioning: str, spectral_norm: bool
) -> None:
    torch.manual_seed(0)
    disc = SequenceDiscriminator(
        9,
        12,
        num_blocks=2,
        base_channels=4,
        hidden_dim=8,
        norm="group",
        spectral_norm=spectral_norm,
        conditioning=conditioning,
    )
    x = torch.randn(3, 9, 16, requires_grad=True)
    audio = torch.randn(3, 12)
    score, features = disc(x, audio)
    assert score.shape == (3,)
    assert [tuple(f.shape[1:]) for f in features] == [(4, 16), (8, 8), (16, 4)]
    assert not torch.allclose(score, disc(x, torch.randn(3, 12))[0])

    # WGAN-GP (EMOPortraits supp. Eq. 8) differentiates the critic's input gradient again.
    (grad,) = torch.autograd.grad(score.sum(), x, create_graph=True)
    penalty = (grad.flatten(1).norm(dim=1) - 1).square().mean()
    assert_gradients_reach_every_parameter(disc, score + penalty)


def test_sequence_discriminator_samples_are_independent_and_audio_is_pooled() -> None:
    """No layer mixes the batch (required by the per-sample gradient penalty)."""
    torch.manual_seed(0)
    disc = SequenceDiscriminator(9, 6, num_blocks=2, base_channels=4, hidden_dim=8)
    x = torch.randn(3, 9, 12)
    frames = torch.randn(3, 6, 5)
    score, _ = disc(x, frames)
    torch.testing.assert_close(score, disc(x, frames.mean(dim=-1))[0])
    alone = torch.cat([disc(x[i : i + 1], frames[i : i + 1])[0] for i in range(3)])
    torch.testing.assert_close(score, alone)


def test_sequence_discriminator_rejects_bad_input() -> None:
    disc = SequenceDiscriminator(9, 6, num_blocks=2, base_channels=4)
    x = torch.randn(2, 9, 12)
    with pytest.raises(InputError, match=r"condition of shape \(2, 6\)"):
        disc(x, torch.randn(2, 5))
    with pytest.raises(InputError, match=r"\(B, 9, T\)"):
        disc(torch.randn(2, 9), torch.randn(2, 6))
    with pytest.raises(InputError, match="at least 4 frames"):
        disc(torch.randn(2, 9, 3), torch.randn(2, 6))
    with pytest.raises(InputError, match="conditioning must be"):
        SequenceDiscriminator(9, 6, conditioning="add")  # type: ignore[arg-type]
