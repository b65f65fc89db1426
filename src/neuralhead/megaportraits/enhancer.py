"""The high-resolution model G_enh of MegaPortraits (Sec. 3.2, A.2, Fig. 10) and G_HR = G_enh ∘ G_base.

G_enh is an image-to-image network that maps the base model's output x̂ (512x512) to an
enhanced x̂^HR at twice the resolution (1024x1024). A.2 describes two parts:

* **Encoder**: "just conv layer followed by 2 residual blocks" producing a 3D feature tensor
  f; Fig. 10 (a) shows the conv's 1536 channels reshaped to 96 channels x depth 16 and two
  ResBlock3D-96 (the same volume layout as the base model's appearance encoder).
* **Decoder**: "recalls" the base model's G2D: the volume is flattened back to 2D (the
  projection P: reshape + 1x1 conv), 8 residual blocks at constant resolution and width, two
  up-sampling units with residual blocks, three residual blocks at high resolution
  (Fig. 10 (b): ResBlock2D-128, -64, -32), GroupNorm, ReLU, 3x3 conv to RGB and tanh.

Two up-samplings reaching twice the input size put f at half the input size, so the
encoder's conv has stride 2 (our reading; the paper gives no kernel or stride: we use a 7x7
kernel as in the appearance encoder's stem). The decoder's width (256) and the up-sampling
units' widths (256, 128) are our choice: the paper only says the 8 blocks keep resolution and
width, and running them at the base G2D's 512 channels at 256x256 would cost four times as
much. Residual blocks are the shared pre-activation blocks with GroupNorm; weight
standardisation on every conv but the first and last (A.1) and spectral norm on all (B.1).
Images are ``(B, 3, H, W)`` in [0, 1] at the API; the tanh output is mapped to [0, 1].

:class:`HighResolutionModel` chains a frozen base model and G_enh: the teacher G_HR of the
student (Sec. 3.3).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.nn.blocks import ResBlock2d, ResBlock3d, make_conv, make_norm
from neuralhead.nn.pretrained import PretrainedModel


@dataclass
class EnhancerConfig:
    """Sizes of G_enh (A.2, Fig. 10) and the settings of its training (Sec. 3.2, 4.1, B.1).

    Attributes:
        input_size: side of the base model's output that G_enh takes (512).
        scale: output side / input side (2: 512 -> 1024).
        encoder_stride: stride of the encoder's conv (2, see the module docstring);
            ``log2(scale * encoder_stride)`` up-sampling units follow in the decoder.
        encoder_kernel: kernel of the encoder's conv (7, our choice).
        volume_channels, volume_depth: the feature volume f is ``volume_channels`` x
            ``volume_depth`` (96 x 16 = 1536 channels reshaped, Fig. 10 (a)).
        volume_blocks: 3D residual blocks of the encoder (2).
        decoder_channels: width after the projection's 1x1 conv and of the constant-resolution
            blocks (256, our choice).
        decoder_blocks: residual blocks at the feature resolution (8, as in G2D).
        up_channels: output widths of the up-sampling units (two in A.2; widths ours).
        up_blocks: residual blocks per up-sampling unit, the first of which up-samples (1).
        highres_channels: widths of the residual blocks at the output resolution
            (128, 64, 32; Fig. 10 (b)).
        norm_groups: GroupNorm groups (32).
        weight_standardization: on every conv but the first and the last (A.1).
        spectral_norm: on every conv (B.1: "for both G_base and G_HR").
        disc_num_scales, disc_num_layers, disc_base_channels: the multi-scale patch
            discriminator of L_GAN and L_adv^c (its layout is not given; ours).
        weight_mae: w_MAE of Eq. 10 (100, Sec. 4.1).
        weight_adv: weight of the adversarial term of L_GAN (1, as w_adv of the base model).
        weight_fm: w_FM, the feature-matching term of L_GAN (100, Sec. 4.1).
        weight_adv_cross: w_adv^c of Eq. 10 (1, Sec. 4.1).
        weight_cyc_cross: w_cyc^c of Eq. 10 (10, Sec. 4.1).
        weight_vgg19: a VGG19 perceptual term between x̂^HR and x^HR. Sec. 3.2's text mentions
            "the perceptual losses" but Eq. 10 and Sec. 4.1 give none, so it is 0 (off).
        lr, lr_min, betas, eps, weight_decay: AdamW with cosine decay, "the same optimizer and
            learning rate scheduling" as the base model (Sec. 4.1, B.1).
        num_iterations, batch_size: 50,000 x 16 (Sec. 4.1).
    """

    input_size: int = 512
    scale: int = 2
    encoder_stride: int = 2
    encoder_kernel: int = 7
    volume_channels: int = 96
    volume_depth: int = 16
    volume_blocks: int = 2
    decoder_channels: int = 256
    decoder_blocks: int = 8
    up_channels: tuple[int, ...] = (256, 128)
    up_blocks: int = 1
    highres_channels: tuple[int, ...] = (128, 64, 32)
    norm_groups: int = 32
    weight_standardization: bool = True
    spectral_norm: bool = True

    disc_num_scales: int = 3
    disc_num_layers: int = 4
    disc_base_channels: int = 32

    weight_mae: float = 100.0
    weight_adv: float = 1.0
    weight_fm: float = 100.0
    weight_adv_cross: float = 1.0
    weight_cyc_cross: float = 10.0
    weight_vgg19: float = 0.0

    lr: float = 2e-4
    lr_min: float = 1e-6
    betas: tuple[float, float] = (0.5, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    num_iterations: int = 50_000
    batch_size: int = 16

    def __post_init__(self) -> None:
        ups = self.scale * self.encoder_stride
        if self.scale < 1 or self.encoder_stride < 1 or ups & (ups - 1):
            raise InputError(
                f"scale x encoder_stride must be a power of two, got {self.scale} x "
                f"{self.encoder_stride}"
            )
        if len(self.up_channels) != self.num_upsamplings:
            raise InputError(
                f"up_channels needs {self.num_upsamplings} entries (log2 of scale x "
                f"encoder_stride), got {len(self.up_channels)}"
            )
        if self.input_size % self.encoder_stride:
            raise InputError(
                f"input_size {self.input_size} must be a multiple of encoder_stride "
                f"{self.encoder_stride}"
            )
        if not self.highres_channels or self.up_blocks < 1:
            raise InputError("G_enh needs at least one high-resolution block and up-sampling block")

    @property
    def num_upsamplings(self) -> int:
        return (self.scale * self.encoder_stride).bit_length() - 1

    @property
    def output_size(self) -> int:
        return self.input_size * self.scale


ENHANCER_PRESETS: dict[str, EnhancerConfig] = {
    "enhancer-512": EnhancerConfig(),
    # For a 256x256 base model (the paper's VoxCeleb2 model): same widths, 256 -> 512.
    "enhancer-256": EnhancerConfig(input_size=256),
    # 64 -> 128 with small widths: a training step well under a second on a 2-core CPU.
    "enhancer-tiny": EnhancerConfig(
        input_size=64,
        volume_channels=8,
        volume_depth=4,
        decoder_channels=32,
        decoder_blocks=2,
        up_channels=(16, 16),
        highres_channels=(16, 8, 8),
        norm_groups=4,
        disc_num_scales=2,
        disc_num_layers=3,
        disc_base_channels=8,
        num_iterations=1000,
        batch_size=2,
    ),
}


def enhancer_preset(name: str, **overrides) -> EnhancerConfig:
    """The preset ``name`` (see :data:`ENHANCER_PRESETS`) with fields overridden by keyword."""
    if name not in ENHANCER_PRESETS:
        raise InputError(
            f"unknown enhancer preset {name!r}; available: {', '.join(sorted(ENHANCER_PRESETS))}"
        )
    try:
        return replace(ENHANCER_PRESETS[name], **overrides)
    except TypeError as exc:
        raise InputError(f"bad enhancer override: {exc}") from None


class EnhancerEncoder(nn.Module):
    """A.2's encoder (Fig. 10 (a)): conv, reshape to a volume, two 3D residual blocks.

    ``(B, 3, H, W)`` in [-1, 1] → f ``(B, volume_channels, volume_depth, H/s, W/s)`` with
    ``s = encoder_stride``.
    """

    def __init__(self, config: EnhancerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.conv = make_conv(
            2,
            3,
            c.volume_channels * c.volume_depth,
            c.encoder_kernel,
            stride=c.encoder_stride,
            spectral_norm=c.spectral_norm,
        )
        block = dict(
            groups=c.norm_groups,
            weight_standardization=c.weight_standardization,
            spectral_norm=c.spectral_norm,
        )
        self.blocks = nn.Sequential(
            *(
                ResBlock3d(c.volume_channels, c.volume_channels, **block)
                for _ in range(c.volume_blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        c = self.config
        return self.blocks(h.view(h.shape[0], c.volume_channels, c.volume_depth, *h.shape[-2:]))


class EnhancerDecoder(nn.Module):
    """A.2's decoder (Fig. 10 (b)): projection, constant-resolution blocks, up-sampling, RGB.

    f ``(B, C, D, h, w)`` → ``(B, 3, h * 2^u, w * 2^u)`` in [-1, 1] (tanh), ``u`` the number of
    up-sampling units (nearest up-sampling inside the first block of each unit, as in G2D).
    """

    def __init__(self, config: EnhancerConfig) -> None:
        super().__init__()
        c = config
        block = dict(
            groups=c.norm_groups,
            weight_standardization=c.weight_standardization,
            spectral_norm=c.spectral_norm,
        )
        self.projection = make_conv(
            2,
            c.volume_channels * c.volume_depth,
            c.decoder_channels,
            1,
            weight_standardization=c.weight_standardization,
            spectral_norm=c.spectral_norm,
        )
        layers: list[nn.Module] = [
            ResBlock2d(c.decoder_channels, c.decoder_channels, **block)
            for _ in range(c.decoder_blocks)
        ]
        width = c.decoder_channels
        for out in c.up_channels:
            layers.append(ResBlock2d(width, out, upsample=2, **block))
            layers += [ResBlock2d(out, out, **block) for _ in range(c.up_blocks - 1)]
            width = out
        for out in c.highres_channels:
            layers.append(ResBlock2d(width, out, **block))
            width = out
        self.blocks = nn.Sequential(*layers)
        self.norm = make_norm("group", width, dims=2, groups=c.norm_groups)
        self.to_rgb = make_conv(2, width, 3, 3, spectral_norm=c.spectral_norm)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        h = self.projection(volume.flatten(1, 2))
        h = self.blocks(h)
        return torch.tanh(self.to_rgb(F.relu(self.norm(h))))


class Enhancer(PretrainedModel):
    """G_enh (Sec. 3.2, A.2): ``(B, 3, H, W)`` in [0, 1] → ``(B, 3, scale H, scale W)`` in [0, 1].

    Fully convolutional: any ``H`` and ``W`` divisible by ``encoder_stride`` work, though it is
    trained at ``config.input_size`` (the base model's output size).
    """

    config_class = EnhancerConfig

    def __init__(self, config: EnhancerConfig) -> None:
        super().__init__(config)
        self.encoder = EnhancerEncoder(config)
        self.decoder = EnhancerDecoder(config)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        stride = self.config.encoder_stride
        if image.dim() != 4 or image.shape[1] != 3:
            raise InputError(f"Enhancer expects images (B, 3, H, W), got {tuple(image.shape)}")
        if image.shape[-2] % stride or image.shape[-1] % stride:
            raise InputError(
                f"Enhancer needs a height and width divisible by {stride}, got "
                f"{image.shape[-2]}x{image.shape[-1]}"
            )
        out = self.decoder(self.encoder(image * 2 - 1))
        return (out + 1) / 2


def base_image(output: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """The image of a base model's output: its ``"image"`` entry, or the tensor itself."""
    if isinstance(output, dict):
        if "image" not in output:
            raise InputError("the base model's output has no 'image' entry")
        return output["image"]
    return output


class HighResolutionModel(nn.Module):
    """G_HR = G_enh ∘ G_base (Sec. 3.3): ``forward(source, driver)`` → the enhanced image.

    ``base`` is any module mapping ``(source, driver)`` to an image or to a dict with an
    ``"image"`` (:class:`~neuralhead.megaportraits.base_model.MegaPortraitsBase`). It is frozen
    (Sec. 3.2: "we fix the base neural head avatar model") and stays in eval mode when this
    module is switched to training. Without an enhancer the model is G_base alone.
    """

    def __init__(self, base: nn.Module, enhancer: Enhancer | None = None) -> None:
        super().__init__()
        self.base = base.eval().requires_grad_(False)
        self.enhancer = enhancer

    def train(self, mode: bool = True) -> HighResolutionModel:
        super().train(mode)
        self.base.eval()
        return self

    def forward(self, source: torch.Tensor, driver: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            image = base_image(self.base(source, driver))
        return image if self.enhancer is None else self.enhancer(image)
