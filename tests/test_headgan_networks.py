"""HeadGAN's generator (dense flow network F + rendering network R) and discriminators."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from neuralhead.errors import InputError
from neuralhead.headgan.config import PRESETS, HeadGANConfig, mouth_crop_size, preset
from neuralhead.headgan.discriminators import (
    HeadGANDiscriminators,
    MouthDiscriminator,
    create_discriminators,
    crop_mouths,
)
from neuralhead.headgan.generator import HeadGANGenerator, create_generator
from neuralhead.nn.blocks import AdaIN, AdaINBlock

SIZE = 64


def make_inputs(config: HeadGANConfig, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = config.image_size

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    audio = torch.randn(batch, config.audio_dim, generator=generator)
    return {
        "driving": rand(batch, config.driving_channels, size, size),
        "reference_image": rand(batch, 3, size, size),
        "reference_render": rand(batch, 3, size, size),
        "audio": audio if config.use_audio else None,
    }


def tiny(name: str = "headgan-tiny", **overrides) -> HeadGANGenerator:
    torch.manual_seed(0)
    return create_generator(name, image_size=SIZE, **overrides)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Presets and configuration


def test_paper_preset_parameter_counts_match_the_config_docstring() -> None:
    generator = create_generator("headgan-256")
    discriminators = create_discriminators("headgan-256")
    assert parameter_count(generator.flow_network) == 30_605_507
    assert parameter_count(generator.rendering_network) == 21_143_651
    assert parameter_count(generator) == 51_749_158
    assert parameter_count(discriminators.image) == 5_535_618
    assert parameter_count(discriminators.mouth) == 6_143_874
    assert parameter_count(create_generator("headgan-256-noaudio")) == 45_906_790
    assert parameter_count(create_generator("headgan-tiny")) == 1_731_342


def test_spectral_norm_on_every_layer_but_the_output_heads() -> None:
    generator = tiny()
    heads = {
        generator.flow_network.flow_head,
        generator.flow_network.mask_head,
        generator.rendering_network.to_rgb,
    }
    layers = [m for m in generator.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) > 30
    for layer in layers:
        assert parametrize.is_parametrized(layer, "weight") == (layer not in heads)
    plain = tiny(spectral_norm=False)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())


def test_presets_and_config_validation() -> None:
    assert set(PRESETS) == {
        "headgan-256",
        "headgan-256-noaudio",
        "headgan-tiny",
        "headgan-tiny-noaudio",
    }
    paper = preset("headgan-256")
    assert (paper.image_size, paper.channels, paper.spade_hidden_channels) == (
        256,
        (32, 128, 512),
        256,
    )
    assert (paper.driving_channels, paper.audio_dim, paper.mouth_crop_size) == (9, 300, 64)
    assert (paper.lambda_l1, paper.lambda_vgg, paper.lambda_feature_matching) == (50, 10, 10)
    assert (paper.learning_rate, paper.betas) == (2e-4, (0.5, 0.999))
    assert preset("headgan-tiny", image_size=64).mouth_crop_size == 16
    assert mouth_crop_size(128) == 32
    with pytest.raises(InputError, match="unknown HeadGAN preset 'headgan-512'"):
        preset("headgan-512")
    with pytest.raises(InputError, match="multiple of 4"):
        HeadGANConfig(image_size=66)
    with pytest.raises(InputError, match="l1_region"):
        HeadGANConfig(l1_region="mouth")
    with pytest.raises(InputError, match="lambda|loss weight"):
        HeadGANConfig(lambda_l1=-1.0)


# --------------------------------------------------------------------------------------------
# Generator


def test_paper_widths_forward_shapes() -> None:
    # The paper's widths at 64x64: a 256x256 forward takes about 7 s on one CPU thread (see the
    # slow test below); the layer structure does not depend on the resolution.
    torch.manual_seed(0)
    generator = create_generator("headgan-256", image_size=SIZE).eval()
    inputs = make_inputs(generator.config)
    with torch.no_grad():
        out = generator(**inputs)
    assert out["image"].shape == (1, 3, SIZE, SIZE)
    assert out["warped_image"].shape == (1, 3, SIZE, SIZE)
    assert out["flow"].shape == (1, 2, SIZE, SIZE)
    assert out["flow_mask"].shape == (1, 1, SIZE, SIZE)
    assert 0 <= out["image"].min() and out["image"].max() <= 1
    assert 0 <= out["flow_mask"].min() and out["flow_mask"].max() <= 1


@pytest.mark.slow
def test_paper_preset_forward_at_256() -> None:
    torch.manual_seed(0)
    generator = create_generator("headgan-256").eval()
    with torch.no_grad():
        out = generator(**make_inputs(generator.config))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "image": (1, 3, 256, 256),
        "warped_image": (1, 3, 256, 256),
        "flow": (1, 2, 256, 256),
        "flow_mask": (1, 1, 256, 256),
    }


@pytest.mark.parametrize("name", ["headgan-tiny", "headgan-tiny-noaudio"])
def test_gradients_reach_every_parameter_of_f_r_d_and_dm(name: str) -> None:
    generator = tiny(name)
    discriminators = create_discriminators(name, image_size=SIZE)
    inputs = make_inputs(generator.config, batch=2)
    out = generator(**inputs)
    centers = torch.tensor([[32.0, 44.0], [30.5, 40.0]])
    d_out, dm_out = discriminators(
        out["image"], inputs["driving"][:, -3:], centers, inputs["audio"]
    )
    loss = out["image"].mean() + out["warped_image"].mean()
    loss = loss + sum(scale[-1].mean() for scale in d_out + dm_out)
    loss.backward()
    for module in (generator.flow_network, generator.rendering_network, discriminators):
        for param_name, param in module.named_parameters():
            assert param.grad is not None, f"no gradient for {param_name}"
            assert torch.isfinite(param.grad).all(), f"non-finite gradient for {param_name}"
            assert param.grad.abs().sum() > 0, f"zero gradient for {param_name}"


def _force_flow(generator: HeadGANGenerator, dx: float, dy: float) -> None:
    """Replace the flow head's output by a constant flow and open the mask fully."""

    def flow(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        constant = output.new_tensor([dx, dy]).view(1, 2, 1, 1)
        return constant.expand_as(output)

    def mask(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return torch.full_like(output, 30.0)  # tanh(30) == 1 in float32

    generator.flow_network.flow_head.register_forward_hook(flow)
    generator.flow_network.mask_head.register_forward_hook(mask)


def test_zero_flow_returns_the_reference_and_its_features() -> None:
    generator = tiny().eval()
    inputs = make_inputs(generator.config, batch=2)
    generator.flow_network.flow_head.register_forward_hook(
        lambda module, args, output: torch.zeros_like(output)
    )
    with torch.no_grad():
        out = generator(**inputs)
        flow = generator.flow_network(
            inputs["reference_image"], inputs["reference_render"], inputs["driving"]
        )
    assert torch.equal(out["flow"], torch.zeros_like(out["flow"]))
    torch.testing.assert_close(out["warped_image"], inputs["reference_image"], atol=1e-6, rtol=0)
    torch.testing.assert_close(flow.warped_image, inputs["reference_image"], atol=1e-6, rtol=0)
    assert [f.shape[1:] for f in flow.features] == [(8, 64, 64), (32, 32, 32), (128, 16, 16)]
    for warped, features in zip(flow.warped_features, flow.features):
        torch.testing.assert_close(warped, features, atol=1e-5, rtol=0)


def test_flow_is_in_pixels_and_rescaled_per_feature_level() -> None:
    generator = tiny().eval()
    inputs = make_inputs(generator.config)
    _force_flow(generator, dx=2.0, dy=0.0)
    with torch.no_grad():
        flow = generator.flow_network(
            inputs["reference_image"], inputs["reference_render"], inputs["driving"]
        )
    torch.testing.assert_close(
        flow.flow, torch.tensor([2.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, SIZE, SIZE)
    )
    reference = inputs["reference_image"]
    # Backward warp: the output at x shows the reference at x + 2.
    torch.testing.assert_close(flow.warped_image[..., :-2], reference[..., 2:], atol=1e-5, rtol=0)
    h1, h2, h3 = flow.features
    torch.testing.assert_close(flow.warped_features[0][..., :-2], h1[..., 2:], atol=1e-5, rtol=0)
    # Half resolution: one pixel; quarter resolution: half a pixel (the mean of two neighbours).
    torch.testing.assert_close(flow.warped_features[1][..., :-1], h2[..., 1:], atol=1e-5, rtol=0)
    expected = (h3[..., :-1] + h3[..., 1:]) / 2
    torch.testing.assert_close(flow.warped_features[2][..., :-1], expected, atol=1e-5, rtol=0)


def test_no_audio_variant_has_no_adain_and_rejects_audio() -> None:
    generator = tiny("headgan-tiny-noaudio").eval()
    assert not any(isinstance(m, (AdaIN, AdaINBlock)) for m in generator.modules())
    assert any(isinstance(m, AdaINBlock) for m in tiny().modules())
    inputs = make_inputs(generator.config)
    with torch.no_grad():
        assert generator(**inputs)["image"].shape == (1, 3, SIZE, SIZE)
    with pytest.raises(InputError, match="without audio"):
        generator(**{**inputs, "audio": torch.zeros(1, 300)})
    discriminators = create_discriminators("headgan-tiny-noaudio", image_size=SIZE)
    assert discriminators.mouth.network.condition_channels == 0
    with pytest.raises(InputError, match="without audio"):
        discriminators.mouth(torch.rand(1, 3, 16, 16), torch.zeros(1, 300))


def test_bad_generator_inputs_raise_clear_errors() -> None:
    generator = tiny()
    good = make_inputs(generator.config, batch=2)
    with pytest.raises(InputError, match=r"driving must have shape \(B, 9, 64, 64\)"):
        generator(**{**good, "driving": good["driving"][:, :6]})
    with pytest.raises(InputError, match="reference_image must have shape"):
        generator(**{**good, "reference_image": torch.rand(2, 3, 32, 32)})
    with pytest.raises(InputError, match="with B = 2"):
        generator(**{**good, "reference_render": torch.rand(1, 3, SIZE, SIZE)})
    with pytest.raises(InputError, match="uses audio"):
        generator(**{**good, "audio": None})
    with pytest.raises(InputError, match=r"audio must have shape \(2, 300\)"):
        generator(**{**good, "audio": torch.zeros(2, 29)})


def test_save_and_load_give_identical_outputs(tmp_path: Path) -> None:
    generator = tiny()
    inputs = make_inputs(generator.config)
    generator(**inputs)  # a training-mode pass moves the spectral-norm estimates off their start
    generator.eval()
    with torch.no_grad():
        expected = generator(**inputs)
    generator.save_pretrained(tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = HeadGANGenerator.from_pretrained(tmp_path / "g").eval()
    assert loaded.config == generator.config
    with torch.no_grad():
        got = loaded(**inputs)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key

    discriminators = create_discriminators("headgan-tiny", image_size=SIZE).eval()
    discriminators.save_pretrained(tmp_path / "d")
    loaded_d = HeadGANDiscriminators.from_pretrained(tmp_path / "d").eval()
    image, render, centers = (
        torch.rand(1, 3, SIZE, SIZE),
        torch.rand(1, 3, SIZE, SIZE),
        torch.full((1, 2), 32.0),
    )
    with torch.no_grad():
        a = discriminators(image, render, centers, inputs["audio"])
        b = loaded_d(image, render, centers, inputs["audio"])
    assert all(torch.equal(x[-1], y[-1]) for x, y in zip(a[0] + a[1], b[0] + b[1]))


# --------------------------------------------------------------------------------------------
# Discriminators and mouth crops


def test_discriminator_outputs_two_scales_of_features_and_logits() -> None:
    torch.manual_seed(0)
    discriminators = create_discriminators("headgan-tiny", image_size=SIZE)
    image, render = torch.rand(2, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)
    d_out, dm_out = discriminators(image, render, torch.full((2, 2), 32.0), torch.randn(2, 300))
    assert len(d_out) == len(dm_out) == 2
    assert all(len(scale) == 5 and scale[-1].shape[1] == 1 for scale in d_out + dm_out)
    assert discriminators.image.network.discriminators[0].in_channels == 6
    assert discriminators.mouth.network.discriminators[0].in_channels == 3 + 300
    with pytest.raises(InputError, match="mouth_centers"):
        discriminators(image, render)
    with pytest.raises(InputError, match="needs audio"):
        discriminators(image, render, torch.full((2, 2), 32.0))
    assert (
        create_discriminators("headgan-tiny", image_size=SIZE, mouth_discriminator=False).mouth
        is None
    )
    assert isinstance(discriminators.mouth, MouthDiscriminator)


def test_crop_mouths_slices_at_whole_pixels_clamps_and_passes_gradients() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 128, 128, requires_grad=True)
    centers = torch.tensor([[60.0, 90.0], [5.0, 127.0]])
    crops = crop_mouths(images, centers)
    assert crops.shape == (2, 3, 32, 32)  # 64 at 256, scaled to 128
    torch.testing.assert_close(crops[0], images[0, :, 74:106, 44:76], atol=1e-6, rtol=0)
    # Too close to the left and bottom edges: moved inside the frame.
    torch.testing.assert_close(crops[1], images[1, :, 96:128, 0:32], atol=1e-6, rtol=0)
    half_pixel = crop_mouths(images, torch.tensor([[60.5, 90.0], [64.0, 64.0]]), size=8)
    expected = (images[0, :, 86:94, 56:64] + images[0, :, 86:94, 57:65]) / 2
    torch.testing.assert_close(half_pixel[0], expected, atol=1e-6, rtol=0)
    crops.sum().backward()
    assert images.grad[0, :, 74:106, 44:76].eq(1).all()
    assert images.grad.sum() == 2 * 3 * 32 * 32
    with pytest.raises(InputError, match=r"mouth_centers of shape \(2, 2\)"):
        crop_mouths(images, torch.zeros(2, 3))
    with pytest.raises(InputError, match="does not fit"):
        crop_mouths(images, centers, size=200)
