"""Configuration and named presets of HeadGAN's generator, discriminators and objective.

Sizes follow Appendix C (Tables 4 and 5) and the facts read from the authors' code (256x256,
base width 32, channels x4 per level, SPADE hidden width 256, spectral norm, xavier
initialisation with gain 0.02); loss weights follow Appendix B (Eq. 8) and the optimiser
Sec. 4.1. Every value is a config field; the docstring of :class:`HeadGANConfig` marks the
ones that are our choice.

Presets (``preset(name)``; the networks are built by
:func:`neuralhead.headgan.generator.create_generator` and
:func:`neuralhead.headgan.discriminators.create_discriminators`):

- ``headgan-256``: the paper's model. Generator 51,749,158 parameters: dense flow network F
  30,605,507 and rendering network R 21,143,651. Image discriminator D 5,535,618 and mouth
  discriminator D_m 6,143,874 (two scales each; D_m's first layers read 3 + 300 channels).
  The paper gives widths, not counts. From the widths of Tables 4-5, most of F sits in its
  three 512-channel SPADE blocks at 64x64 (9.48M each: two SPADE layers whose 256 -> 512
  gamma / beta convs hold 2.4M each, and two 512 -> 512 convs), and most of R in its 64x64
  SPADE block (11.8M, its SPADE layers read the 512-channel warped features h(3)) and AdaIN
  block (5.3M). The discriminators have pix2pixHD's / SPADE's multi-scale size (2.8M per
  scale). For scale: LivePortrait's modules total about 130M.
- ``headgan-256-noaudio``: the variant without AdaIN blocks and with a plain mouth
  discriminator (5,529,474), which the paper trains for frontalisation (Sec. 4.2) and uses
  for expression / pose editing (Sec. 4.3, Fig. 7), where no driving audio exists, and
  compares in its ablation (Sec. 4.4). Generator 45,906,790 parameters.
- ``headgan-tiny``: for CPU training at 128x128 (our choice): base width 8 (8 -> 32 -> 128
  channels), SPADE hidden width 32, one SPADE block in F's 32x32 bottleneck instead of three,
  discriminators with base 16 and at most 128 channels. Generator 1,731,342 parameters; a forward and
  backward pass through the generator and both discriminators on a batch of 2 takes about
  0.7 s on one CPU thread.
- ``headgan-tiny-noaudio``: the same without audio.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from torch import nn

from neuralhead.errors import InputError
from neuralhead.nn.blocks import apply_spectral_norm

#: Side of the square mouth crop judged by D_m at 256x256 (App. B, Eq. 3).
MOUTH_CROP_SIZE_AT_256 = 64

_L1_REGIONS = ("image", "face")


def mouth_crop_size(image_size: int) -> int:
    """Side of the mouth crop for frames of ``image_size``: 64 at 256, scaled in proportion."""
    return max(1, round(MOUTH_CROP_SIZE_AT_256 * image_size / 256))


@dataclass
class HeadGANConfig:
    """Sizes, options, loss weights and optimiser settings of HeadGAN.

    Attributes:
        image_size: side ``H = W`` of every image the generator reads and writes (256 in the
            paper). A multiple of 4: the encoders down-sample twice (Tables 4-5).
        base_channels: width of the first encoder level (32). Level ``i`` has
            ``base_channels * 4**i`` channels (32 -> 128 -> 512), so that each PixelShuffle of
            the decoders divides the channels by exactly 4 without a convolution, as the
            tables' output sizes show.
        spade_hidden_channels: width of the shared conv inside every SPADE layer (256 in the
            authors' code, 128 in SPADE).
        flow_blocks: SPADE blocks in the dense flow network's bottleneck (3 in Table 4).
        render_channels: channels of one 3D face render (3, NCC colours).
        driving_frames: renders stacked as the driving condition, frames ``t-2 .. t`` (3,
            Sec. 3.3); the driving tensor has ``render_channels * driving_frames`` channels.
        use_audio: condition the rendering network on audio through AdaIN blocks and the
            mouth discriminator on audio (Sec. 3.2-3.3). False gives the variant the paper
            uses for frontalisation and editing (Sec. 4.2-4.3): no AdaIN blocks, a mouth
            discriminator on the crop alone, and passing audio is an error.
        audio_dim: length of the per-frame audio feature vector (300, Sec. 3.2). The features
            are expected to be standardised (zero mean, unit variance per dimension).
        spectral_norm: spectral norm on every convolution and linear layer of the generator
            (authors' code), except the three output convolutions (flow, mask and RGB heads),
            which stay plain as in the authors' code and in SPADE, so that with the small
            initial weights the first flow is close to zero and the first image close to grey.
        init_gain: gain of the xavier-normal initialisation of the generator's weights (0.02,
            authors' code); biases start at zero. Under spectral norm the gain only sets the
            direction of the initial weights; it fixes the scale of the plain output heads.
        discriminator_scales, discriminator_layers, discriminator_channels,
        discriminator_max_channels: the two-scale PatchGAN of the authors' code (2, 4, 64,
            512), spectral + instance norm (App. C.2), for both D and D_m.
        mouth_discriminator: train the mouth discriminator D_m (Sec. 3.3).
        lambda_gan: weight of the image discriminator's hinge term (1, Eq. 8).
        lambda_mouth_gan: weight of the mouth discriminator's hinge term (1, authors' code).
        lambda_l1: weight of the pixel L1 on the generated image (50, Eq. 8).
        lambda_vgg: weight of the VGG19 loss on the generated image (10, Eq. 8).
        lambda_feature_matching: weight of feature matching on D and D_m (10, Eq. 8).
        lambda_warp_l1, lambda_warp_vgg: the same L1 and VGG weights on the warped reference
            image (50 and 10, Eq. 8).
        l1_region: ``"image"`` (Eq. 6: L1 over the whole frame) or ``"face"`` (authors' code:
            L1 only where the driving render is non-zero, averaged over the whole frame).
        learning_rate, betas: Adam for G and both discriminators (2e-4, (0.5, 0.999), Sec. 4.1).
    """

    image_size: int = 256
    base_channels: int = 32
    spade_hidden_channels: int = 256
    flow_blocks: int = 3
    render_channels: int = 3
    driving_frames: int = 3
    use_audio: bool = True
    audio_dim: int = 300
    spectral_norm: bool = True
    init_gain: float = 0.02
    discriminator_scales: int = 2
    discriminator_layers: int = 4
    discriminator_channels: int = 64
    discriminator_max_channels: int = 512
    mouth_discriminator: bool = True
    lambda_gan: float = 1.0
    lambda_mouth_gan: float = 1.0
    lambda_l1: float = 50.0
    lambda_vgg: float = 10.0
    lambda_feature_matching: float = 10.0
    lambda_warp_l1: float = 50.0
    lambda_warp_vgg: float = 10.0
    l1_region: str = "image"
    learning_rate: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size % 4:
            raise InputError(
                f"image_size must be a multiple of 4 and at least 16, got {self.image_size}"
            )
        positive = {
            "base_channels": self.base_channels,
            "spade_hidden_channels": self.spade_hidden_channels,
            "flow_blocks": self.flow_blocks,
            "render_channels": self.render_channels,
            "driving_frames": self.driving_frames,
            "audio_dim": self.audio_dim,
            "discriminator_scales": self.discriminator_scales,
            "discriminator_layers": self.discriminator_layers,
            "discriminator_channels": self.discriminator_channels,
            "discriminator_max_channels": self.discriminator_max_channels,
        }
        for name, value in positive.items():
            if value < 1:
                raise InputError(f"{name} must be at least 1, got {value}")
        for name, value in self.loss_weights.items():
            if value < 0:
                raise InputError(f"loss weight {name} must not be negative, got {value}")
        if self.l1_region not in _L1_REGIONS:
            raise InputError(f"l1_region must be 'image' or 'face', got {self.l1_region!r}")
        if len(self.betas) != 2:
            raise InputError(f"betas must be two numbers, got {self.betas!r}")

    @property
    def driving_channels(self) -> int:
        """Channels of the driving condition: the stacked renders of frames t-2, t-1, t."""
        return self.render_channels * self.driving_frames

    @property
    def channels(self) -> tuple[int, int, int]:
        """Widths of the three feature levels h(1), h(2), h(3) at H, H/2 and H/4."""
        return (self.base_channels, 4 * self.base_channels, 16 * self.base_channels)

    @property
    def mouth_crop_size(self) -> int:
        """Side of the mouth crop judged by D_m (64 at 256x256, App. B)."""
        return mouth_crop_size(self.image_size)

    @property
    def loss_weights(self) -> dict[str, float]:
        """The weight of every generator loss term of Eq. 8, keyed by the term's name.

        Feature matching is one weight for the image and mouth discriminators' terms.
        """
        return {
            "gan": self.lambda_gan,
            "mouth_gan": self.lambda_mouth_gan,
            "feature_matching": self.lambda_feature_matching,
            "mouth_feature_matching": self.lambda_feature_matching,
            "l1": self.lambda_l1,
            "vgg": self.lambda_vgg,
            "warp_l1": self.lambda_warp_l1,
            "warp_vgg": self.lambda_warp_vgg,
        }


# The CPU preset also trains faster: with the paper's 2e-4, 15 CPU minutes (about 850 steps)
# left the held-out L1 just above the no-motion baseline, with 5e-4 (about 1000 steps) below it
# (docs/results.md); our choice for short runs of this small network.
_TINY = dict(
    learning_rate=5e-4,
    image_size=128,
    base_channels=8,
    spade_hidden_channels=32,
    flow_blocks=1,
    discriminator_channels=16,
    discriminator_max_channels=128,
)

PRESETS: dict[str, HeadGANConfig] = {
    "headgan-256": HeadGANConfig(),
    "headgan-256-noaudio": HeadGANConfig(use_audio=False),
    "headgan-tiny": HeadGANConfig(**_TINY),
    "headgan-tiny-noaudio": HeadGANConfig(**_TINY, use_audio=False),
}


def preset(name: str, **overrides) -> HeadGANConfig:
    """The config of a named preset (see the module docstring), with fields overridden."""
    if name not in PRESETS:
        raise InputError(f"unknown HeadGAN preset {name!r}; available: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def initialize_weights(
    module: nn.Module,
    *,
    gain: float,
    spectral_norm: bool,
    exclude: Iterable[nn.Module] = (),
) -> None:
    """Xavier-normal weights and zero biases on every conv / linear layer, then spectral norm.

    HeadGAN's code initialises with xavier (gain 0.02) and spectral-normalises every conv.
    The layers must be built without spectral norm: it is registered here, after the
    initialisation, so that its power-iteration vectors are estimated on the final weights
    (registering first would leave them stale, and an eval-mode pass would then divide by a
    wrong norm). Layers in ``exclude`` (the output heads) are initialised but not normalised.
    """
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        nn.init.xavier_normal_(layer.weight, gain=gain)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    if spectral_norm:
        excluded = {id(m) for m in exclude}
        for layer in layers:
            if id(layer) not in excluded:
                apply_spectral_norm(layer)
