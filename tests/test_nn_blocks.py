"""Shared layers: weight standardisation, spectral norm, residual blocks, SPADE/AdaIN, AGN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from neuralhead.errors import InputError
from neuralhead.nn.blocks import (
    SPADE,
    AdaIN,
    AdaINBlock,
    AdaptiveGroupNorm,
    AdaptiveResBlock3d,
    PixelShuffleUpsample,
    ResBlock1d,
    ResBlock2d,
    ResBlock3d,
    SPADEBlock,
    WeightStandardization,
    WSConv1d,
    WSConv2d,
    WSConv3d,
    apply_spectral_norm,
    group_count,
    make_norm,
)

RESBLOCKS = {1: ResBlock1d, 2: ResBlock2d, 3: ResBlock3d}


def assert_gradients_reach_every_parameter(module: nn.Module, output: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    (output.square().mean() + output.mean()).backward()
    for name, param in module.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(param.grad).all(), f"non-finite gradient for {name}"


def effective_convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def spectral_norms(module: nn.Module) -> list[float]:
    return [
        torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2).item()
        for conv in effective_convs(module)
    ]


# --------------------------------------------------------------------------------------------
# Weight standardisation and spectral norm


@pytest.mark.parametrize("cls", [WSConv1d, WSConv2d, WSConv3d])
def test_weight_standardisation_gives_zero_mean_unit_std_filters(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    conv = cls(3, 5, 3, eps=1e-12)
    weight = conv.weight.flatten(1)
    torch.testing.assert_close(weight.mean(dim=1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(weight.std(dim=1, unbiased=False), torch.ones(5), atol=1e-5, rtol=0)
    raw = conv.parametrizations.weight.original
    assert not torch.allclose(raw.flatten(1).std(dim=1), torch.ones(5), atol=0.1)


def test_ws_conv_uses_the_standardised_weight_in_forward() -> None:
    torch.manual_seed(0)
    conv = WSConv2d(2, 3, 3, padding=1, eps=1e-5)
    raw = conv.parametrizations.weight.original.detach()
    mean = raw.mean(dim=(1, 2, 3), keepdim=True)
    var = raw.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    expected_weight = (raw - mean) / torch.sqrt(var + 1e-5)
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(conv(x), F.conv2d(x, expected_weight, conv.bias, padding=1))


def test_spectral_norm_is_a_parametrization_that_bounds_the_weight() -> None:
    torch.manual_seed(0)
    conv = apply_spectral_norm(nn.Conv2d(4, 6, 3))
    assert parametrize.is_parametrized(conv, "weight")
    for _ in range(30):  # each training-mode forward runs one power iteration
        conv(torch.randn(1, 4, 6, 6))
    assert spectral_norms(conv) == pytest.approx([1.0], abs=1e-3)
    assert not parametrize.is_parametrized(apply_spectral_norm(nn.Conv2d(4, 6, 3), False))


def test_spectral_norm_acts_after_weight_standardisation() -> None:
    torch.manual_seed(0)
    block = ResBlock2d(4, 8, weight_standardization=True, spectral_norm=True, norm="none")
    convs = effective_convs(block)
    assert len(convs) == 3
    for conv in convs:
        steps = [type(p).__name__ for p in conv.parametrizations.weight]
        assert steps == ["WeightStandardization", "_SpectralNorm"]
    for _ in range(30):
        block(torch.randn(1, 4, 6, 6))
    assert spectral_norms(block) == pytest.approx([1.0] * 3, abs=1e-3)


def test_weight_standardization_is_scale_invariant() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    ws = WeightStandardization(eps=0.0)
    torch.testing.assert_close(ws(w), ws(7.0 * w))


def test_group_count_is_the_largest_divisor_not_above_groups() -> None:
    assert group_count(64, 32) == 32
    assert group_count(48, 32) == 24
    assert group_count(8, 32) == 8
    assert group_count(7, 4) == 1
    assert make_norm("group", 48, dims=2).num_groups == 24
    with pytest.raises(InputError, match="unknown norm"):
        make_norm("layer", 8, dims=2)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Residual blocks


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("norm", ["group", "instance", "batch", "none"])
@pytest.mark.parametrize(
    ("kwargs", "factor"), [({}, 1), ({"downsample": 2}, 0.5), ({"upsample": 2}, 2)]
)
def test_resblock_shapes_and_gradients(dims: int, norm: str, kwargs: dict, factor: float) -> None:
    torch.manual_seed(0)
    block = RESBLOCKS[dims](4, 6, norm=norm, groups=4, weight_standardization=True, **kwargs)
    x = torch.randn(2, 4, *([4] * dims))
    out = block(x)
    assert out.shape == (2, 6, *([int(4 * factor)] * dims))
    assert_gradients_reach_every_parameter(block, out)


@pytest.mark.parametrize("upsample_mode", ["nearest", "trilinear"])
def test_resblock3d_per_axis_resampling(upsample_mode: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 2, 4, 4)
    down = ResBlock3d(4, 4, groups=2, downsample=(1, 2, 2))
    assert down(x).shape == (1, 4, 2, 2, 2)
    up = ResBlock3d(4, 2, groups=2, upsample=(2, 1, 2), upsample_mode=upsample_mode)
    assert up(x).shape == (1, 2, 4, 4, 8)


def test_resblock_skip_path_is_identity_or_projection() -> None:
    """With the residual branch's last conv zeroed, the block returns its skip path alone."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    same = ResBlock2d(4, 4, groups=2, downsample=2)
    assert isinstance(same.skip, nn.Identity)
    nn.init.zeros_(same.conv2.weight)
    nn.init.zeros_(same.conv2.bias)
    torch.testing.assert_close(same(x), F.avg_pool2d(x, 2))

    wider = ResBlock2d(4, 6, groups=2, upsample=2)
    nn.init.zeros_(wider.conv2.weight)
    nn.init.zeros_(wider.conv2.bias)
    projected = F.conv2d(x, wider.skip.weight, wider.skip.bias)
    torch.testing.assert_close(wider(x), F.interpolate(projected, scale_factor=2.0))


def test_resblock_rejects_bad_input_and_options() -> None:
    block = ResBlock2d(4, 8)
    with pytest.raises(InputError, match=r"ResBlock2d expects a tensor of shape \(B, 4, H, W\)"):
        block(torch.randn(1, 3, 8, 8))
    with pytest.raises(InputError, match="ResBlock3d"):
        ResBlock3d(4, 8)(torch.randn(1, 4, 8, 8))
    with pytest.raises(InputError, match="not both"):
        ResBlock2d(4, 8, downsample=2, upsample=2)
    with pytest.raises(InputError, match="downsample must be"):
        ResBlock3d(4, 8, downsample=(2, 2))


# --------------------------------------------------------------------------------------------
# SPADE and AdaIN


def test_spade_with_zero_modulation_is_instance_norm_and_resizes_condition() -> None:
    torch.manual_seed(0)
    spade = SPADE(4, 3, hidden_channels=8)
    x = torch.randn(2, 4, 8, 8)
    condition = torch.randn(2, 3, 16, 16)
    assert spade(x, condition).shape == x.shape
    for conv in (spade.to_gamma, spade.to_beta):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    torch.testing.assert_close(spade(x, condition), F.instance_norm(x))
    nn.init.constant_(spade.to_gamma.bias, 1.0)
    nn.init.constant_(spade.to_beta.bias, 0.5)
    torch.testing.assert_close(spade(x, condition), 2 * F.instance_norm(x) + 0.5)


def test_adain_scale_and_shift_per_channel() -> None:
    torch.manual_seed(0)
    adain = AdaIN(2, 5)
    x = torch.randn(3, 2, 4, 4)
    nn.init.zeros_(adain.affine.weight)
    with torch.no_grad():
        adain.affine.bias.copy_(torch.tensor([1.0, -0.5, 0.25, 2.0]))  # γ1, γ2, β1, β2
    out = adain(x, torch.randn(3, 5))
    normed = F.instance_norm(x)
    torch.testing.assert_close(out[:, 0], 2.0 * normed[:, 0] + 0.25)
    torch.testing.assert_close(out[:, 1], 0.5 * normed[:, 1] + 2.0)


def test_spade_and_adain_reject_bad_conditions() -> None:
    with pytest.raises(InputError, match="SPADE condition"):
        SPADE(4, 3)(torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8))
    with pytest.raises(InputError, match=r"AdaIN expects a condition of shape \(1, 5\)"):
        AdaIN(4, 5)(torch.randn(1, 4, 8, 8), torch.randn(1, 6))
    with pytest.raises(InputError, match="AdaIN expects a tensor"):
        AdaIN(4, 5)(torch.randn(1, 3, 8, 8), torch.randn(1, 5))


@pytest.mark.parametrize("spectral_norm", [True, False])
def test_spade_block_keeps_channels(spectral_norm: bool) -> None:
    torch.manual_seed(0)
    block = SPADEBlock(6, 3, hidden_channels=8, spectral_norm=spectral_norm)
    x = torch.randn(2, 6, 8, 8)
    out = block(x, torch.randn(2, 3, 32, 32))
    assert out.shape == x.shape
    convs = effective_convs(block)
    assert len(convs) == 8  # two convs of the block, three in each SPADE layer
    assert all(parametrize.is_parametrized(c, "weight") == spectral_norm for c in convs)
    assert_gradients_reach_every_parameter(block, out)


@pytest.mark.parametrize("spectral_norm", [True, False])
def test_adain_block_keeps_channels(spectral_norm: bool) -> None:
    torch.manual_seed(0)
    block = AdaINBlock(6, 10, spectral_norm=spectral_norm)
    x = torch.randn(2, 6, 8, 8)
    out = block(x, torch.randn(2, 10))
    assert out.shape == x.shape
    assert parametrize.is_parametrized(block.conv1, "weight") == spectral_norm
    assert parametrize.is_parametrized(block.norm1.affine, "weight") == spectral_norm
    assert_gradients_reach_every_parameter(block, out)


# --------------------------------------------------------------------------------------------
# Adaptive GroupNorm


@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("spatial", [(5, 5), (3, 4, 4)])
def test_adaptive_group_norm_reduces_to_group_norm(rank: int | None, spatial: tuple) -> None:
    torch.manual_seed(0)
    agn = AdaptiveGroupNorm(8, 6, groups=4, rank=rank)
    x = torch.randn(2, 8, *spatial)
    e1, e2 = torch.randn(2, 6), torch.randn(2, 6)
    assert not torch.allclose(agn(x, e1), agn(x, e2))
    out = agn(x, e1)
    assert out.shape == x.shape
    assert_gradients_reach_every_parameter(agn, out)
    for param in agn.projection.parameters():
        nn.init.zeros_(param)
    torch.testing.assert_close(agn(x, e1), nn.GroupNorm(4, 8)(x))


def test_adaptive_group_norm_flattens_embedding_and_checks_it() -> None:
    torch.manual_seed(0)
    agn = AdaptiveGroupNorm(4, 12, groups=2)
    x = torch.randn(2, 4, 3, 3)
    e = torch.randn(2, 3, 4)
    torch.testing.assert_close(agn(x, e), agn(x, e.flatten(1)))
    with pytest.raises(InputError, match="12 values per sample"):
        agn(x, torch.randn(2, 10))
    with pytest.raises(InputError, match=r"\(B, 4, \.\.\.\)"):
        agn(torch.randn(2, 5, 3, 3), e)


def test_adaptive_resblock3d_upsamples_and_trains() -> None:
    torch.manual_seed(0)
    block = AdaptiveResBlock3d(
        8, 4, 6, groups=4, rank=2, upsample=2, weight_standardization=True, spectral_norm=True
    )
    x = torch.randn(2, 8, 2, 3, 3)
    e = torch.randn(2, 6)
    out = block(x, e)
    assert out.shape == (2, 4, 4, 6, 6)
    assert not torch.allclose(out, block(x, torch.randn(2, 6)))
    assert_gradients_reach_every_parameter(block, out)
    with pytest.raises(InputError, match="AdaptiveResBlock3d"):
        block(torch.randn(2, 8, 3, 3), e)


# --------------------------------------------------------------------------------------------
# PixelShuffle


def test_pixel_shuffle_upsample() -> None:
    torch.manual_seed(0)
    up = PixelShuffleUpsample(6, 4, scale_factor=2, spectral_norm=True)
    out = up(torch.randn(2, 6, 5, 5))
    assert out.shape == (2, 4, 10, 10)
    assert parametrize.is_parametrized(up.conv, "weight")
    assert_gradients_reach_every_parameter(up, out)

    bare = PixelShuffleUpsample(16, 4, use_conv=False)
    x = torch.randn(1, 16, 3, 3)
    torch.testing.assert_close(bare(x), F.pixel_shuffle(x, 2))
    with pytest.raises(InputError, match="in_channels = out_channels"):
        PixelShuffleUpsample(12, 4, use_conv=False)
    with pytest.raises(InputError, match="PixelShuffleUpsample expects"):
        up(torch.randn(2, 5, 5, 5))


def test_parametrized_block_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    block = AdaptiveResBlock3d(4, 2, 3, groups=2, weight_standardization=True, spectral_norm=True)
    x, e = torch.randn(1, 4, 2, 2, 2), torch.randn(1, 3)
    block(x, e)  # one power iteration, so the stored u, v differ from a fresh module's
    torch.manual_seed(1)
    copy = AdaptiveResBlock3d(4, 2, 3, groups=2, weight_standardization=True, spectral_norm=True)
    copy.load_state_dict(block.state_dict())
    torch.testing.assert_close(copy.eval()(x, e), block.eval()(x, e))
