"""The distilled student G_DT of MegaPortraits (Sec. 3.3, A.3, Fig. 11), locked to its avatars.

``G_DT(x_d, i)`` renders avatar ``i`` of a fixed set of N appearances in the motion of the
driver frame ``x_d``. A.3: "The encoder of a student model is ResNet18, and the generator
consists of residual blocks with SPADE normalization layers, in each SPADE block a tensor
used for normalization is fixed for a specific avatar. During the forward pass we select which
tensor to use [...] to switch between predefined avatars." The tensors dominate the model's
size, so they are stored at a spatial size of at most 64x64 and up-sampled bilinearly to the
feature map's size.

Our reading of the parts Fig. 11 leaves open:

* The encoder is a ResNet-18 (:mod:`neuralhead.nn.resnet`, torchvision parameter names, so
  ImageNet weights load into ``encoder``) up to ``layer4``, stride 32, on the driver
  normalised with the ImageNet statistics.
* Each generator block is a pre-activation residual block whose two normalisations are
  :class:`~neuralhead.nn.blocks.SPADE` layers conditioned on the block's avatar tensor
  ``(num_avatars, C, h, w)``, ``C`` the block's input width ("by default these tensors must
  be of the same shape as a corresponding input feature map") and ``h = w = min(feature size,
  64)``; the tensor of avatar ``i`` is selected by indexing, resized bilinearly inside SPADE.
  The optional parts of Fig. 11 (dashed: nearest up-sampling, a 1x1 conv when the width
  changes) sit on the shortcut. SPADE's hidden width is the block's input width, at most
  ``spade_hidden_channels`` (128, SPADE's default; the cap is ours).
* ``bottleneck_blocks`` blocks at the encoder's resolution, then one up-sampling block per
  factor of two up to ``image_size``, then ReLU, a 3x3 conv to RGB and a sigmoid (images are
  in [0, 1] at every public API).

Identity lock (Sec. 1, 3.3): the student has no input for a source image. ``forward`` renders
only the registered avatars ``0 .. num_avatars - 1`` and raises :class:`InputError` for any
other index.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.nn.blocks import SPADE, check_input, make_conv
from neuralhead.nn.pretrained import PretrainedModel
from neuralhead.nn.resnet import ResNet, imagenet_normalize, resnet18

#: The encoder's output stride (ResNet stem, max pool and three strided stages).
ENCODER_STRIDE = 32


@dataclass
class StudentConfig:
    """Sizes of G_DT (A.3, Fig. 11) and of its distillation (Sec. 3.3, 4.1, B.1).

    Attributes:
        image_size: side of the driver and of the output (512 in the paper's speed figure).
        num_avatars: N, the registered avatars (100 in Sec. 4.1).
        encoder_width: the ResNet-18's stem width (64 published; stages 1, 2, 4, 8 times it).
        encoder_norm: the ResNet-18's norm ("batch" as published, so ImageNet weights load).
        bottleneck_blocks: SPADE blocks at the encoder's resolution, at its width (ours: 2).
        up_channels: output widths of the up-sampling SPADE blocks, one per factor of two
            from ``image_size / 32`` to ``image_size`` (ours: 256 ... 16 at 512).
        avatar_max_size: bound on the side of the per-avatar tensors (64, A.3).
        spade_hidden_channels: cap on the SPADE layers' hidden width (128, as in SPADE).
        spectral_norm: spectral norm on the generator's convs (off: the paper does not say).
        disc_num_scales, disc_num_layers, disc_base_channels: the multi-scale discriminator
            ("on four resolutions", B.1; layers and widths ours).
        weight_vgg19, weight_vggface, weight_gaze: the teacher's perceptual weights (B.1: "the
            same that were used to train teacher model"; Sec. 4.1: 20, 4, 5).
        weight_adv, weight_fm: adversarial and feature-matching weights (the base model's 1
            and 40, our choice: B.1 gives none).
        weight_l1: an L1 term between student and teacher (ours, off: the paper uses only
            perceptual and adversarial losses).
        lr, lr_min, betas, eps, weight_decay: AdamW with cosine decay (the paper does not give
            the student's optimiser; we use the base model's).
        num_iterations, batch_size: 170,000 x 8 (Sec. 4.1).
    """

    image_size: int = 512
    num_avatars: int = 100
    encoder_width: int = 64
    encoder_norm: str = "batch"
    bottleneck_blocks: int = 2
    up_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    avatar_max_size: int = 64
    spade_hidden_channels: int = 128
    spectral_norm: bool = False

    disc_num_scales: int = 4
    disc_num_layers: int = 4
    disc_base_channels: int = 32

    weight_vgg19: float = 20.0
    weight_vggface: float = 4.0
    weight_gaze: float = 5.0
    weight_adv: float = 1.0
    weight_fm: float = 40.0
    weight_l1: float = 0.0

    lr: float = 2e-4
    lr_min: float = 1e-6
    betas: tuple[float, float] = (0.5, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    num_iterations: int = 170_000
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.num_avatars < 1:
            raise InputError(f"a student needs at least one avatar, got {self.num_avatars}")
        if self.image_size % ENCODER_STRIDE:
            raise InputError(
                f"image_size must be a multiple of {ENCODER_STRIDE}, got {self.image_size}"
            )
        if len(self.up_channels) != 5:
            raise InputError(
                f"up_channels needs 5 entries (log2 of the encoder's stride {ENCODER_STRIDE}), "
                f"got {len(self.up_channels)}"
            )
        if self.avatar_max_size < 1:
            raise InputError(f"avatar_max_size must be positive, got {self.avatar_max_size}")

    @property
    def encoder_channels(self) -> int:
        """Width of the ResNet-18's ``layer4`` output."""
        return self.encoder_width * 8


STUDENT_PRESETS: dict[str, StudentConfig] = {
    "student-512": StudentConfig(),
    "student-256": StudentConfig(image_size=256),
    # For a teacher with an enhancer (1024x1024 output).
    "student-1024": StudentConfig(image_size=1024),
    # 64x64 and small widths: a distillation step in tens of milliseconds on a 2-core CPU.
    "student-tiny": StudentConfig(
        image_size=64,
        num_avatars=4,
        encoder_width=8,
        bottleneck_blocks=1,
        up_channels=(16, 16, 8, 8, 8),
        avatar_max_size=16,
        disc_num_scales=2,
        disc_num_layers=3,
        disc_base_channels=8,
        num_iterations=1000,
        batch_size=4,
    ),
}


def student_preset(name: str, **overrides) -> StudentConfig:
    """The preset ``name`` (see :data:`STUDENT_PRESETS`) with fields overridden by keyword."""
    if name not in STUDENT_PRESETS:
        raise InputError(
            f"unknown student preset {name!r}; available: {', '.join(sorted(STUDENT_PRESETS))}"
        )
    try:
        return replace(STUDENT_PRESETS[name], **overrides)
    except TypeError as exc:
        raise InputError(f"bad student override: {exc}") from None


class AvatarSPADEBlock(nn.Module):
    """A residual block with SPADE norms conditioned on a learned per-avatar tensor (A.3).

    ``forward(x, avatars)``: ``x`` ``(B, in_channels, H, W)``, ``avatars`` ``(B,)`` int64
    indices (already checked) → ``(B, out_channels, uH, uW)`` with ``u = 2`` when
    ``upsample``. Branch: [up] → SPADE → ReLU → 3x3 conv → SPADE → ReLU → 3x3 conv; shortcut:
    [up] → [1x1 conv]. Both SPADE layers read the block's avatar tensor ``avatar_maps``
    ``(num_avatars, in_channels, size, size)``, initialised from N(0, 1) so that avatars
    differ from the start.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_avatars: int,
        avatar_size: int,
        upsample: bool,
        hidden_channels: int = 128,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.upsample = upsample
        self.avatar_maps = nn.Parameter(
            torch.randn(num_avatars, in_channels, avatar_size, avatar_size)
        )
        spade = dict(
            hidden_channels=min(in_channels, hidden_channels),
            resize_mode="bilinear",
            spectral_norm=spectral_norm,
        )
        self.norm1 = SPADE(in_channels, in_channels, **spade)
        self.conv1 = make_conv(2, in_channels, out_channels, 3, spectral_norm=spectral_norm)
        self.norm2 = SPADE(out_channels, in_channels, **spade)
        self.conv2 = make_conv(2, out_channels, out_channels, 3, spectral_norm=spectral_norm)
        self.skip = (
            make_conv(2, in_channels, out_channels, 1, spectral_norm=spectral_norm)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, avatars: torch.Tensor) -> torch.Tensor:
        check_input(x, name="AvatarSPADEBlock", channels=self.in_channels, spatial_dims=2)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        condition = self.avatar_maps[avatars]
        h = self.conv1(F.relu(self.norm1(x, condition)))
        h = self.conv2(F.relu(self.norm2(h, condition)))
        return h + self.skip(x)


class Student(PretrainedModel):
    """G_DT (Sec. 3.3, A.3): ``forward(driver, avatar_index)`` → the avatar in the driver's motion.

    ``driver`` ``(B, 3, image_size, image_size)`` in [0, 1]; ``avatar_index`` an int or an
    integer tensor of shape ``()`` or ``(B,)`` with values in ``0 .. num_avatars - 1``.
    Returns ``(B, 3, image_size, image_size)`` in [0, 1].
    """

    config_class = StudentConfig

    def __init__(self, config: StudentConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder: ResNet = resnet18(
            num_classes=None, width=c.encoder_width, norm=c.encoder_norm
        )
        size = c.image_size // ENCODER_STRIDE
        width = c.encoder_channels
        blocks = [
            self._block(c, width, width, size, upsample=False) for _ in range(c.bottleneck_blocks)
        ]
        for out in c.up_channels:
            blocks.append(self._block(c, width, out, size * 2, upsample=True))
            width, size = out, size * 2
        self.blocks = nn.ModuleList(blocks)
        self.to_rgb = make_conv(2, width, 3, 3, spectral_norm=c.spectral_norm)

    @staticmethod
    def _block(
        c: StudentConfig, in_channels: int, out_channels: int, size: int, *, upsample: bool
    ) -> AvatarSPADEBlock:
        # The tensor conditions the block at its working resolution (after up-sampling).
        return AvatarSPADEBlock(
            in_channels,
            out_channels,
            num_avatars=c.num_avatars,
            avatar_size=min(size, c.avatar_max_size),
            upsample=upsample,
            hidden_channels=c.spade_hidden_channels,
            spectral_norm=c.spectral_norm,
        )

    @property
    def num_avatars(self) -> int:
        return self.config.num_avatars

    def check_avatar_index(self, avatar_index: int | torch.Tensor, batch: int) -> torch.Tensor:
        """The index as a ``(batch,)`` int64 tensor; :class:`InputError` unless registered."""
        index = torch.as_tensor(avatar_index)
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise InputError(f"avatar_index must be an integer, got dtype {index.dtype}")
        if index.dim() == 0:
            index = index.expand(batch)
        if index.shape != (batch,):
            raise InputError(
                f"avatar_index must be a scalar or have shape ({batch},), got {tuple(index.shape)}"
            )
        bad = index[(index < 0) | (index >= self.num_avatars)]
        if bad.numel():
            raise InputError(
                f"avatar {int(bad[0])} is not registered: this student renders only avatars "
                f"0 .. {self.num_avatars - 1}"
            )
        return index.long()

    def forward(self, driver: torch.Tensor, avatar_index: int | torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if driver.dim() != 4 or tuple(driver.shape[1:]) != (3, size, size):
            raise InputError(
                f"Student expects drivers of shape (B, 3, {size}, {size}), got {tuple(driver.shape)}"
            )
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            # A traced graph cannot branch on values. The exported Gather refuses indices past
            # the avatar count (negative ones wrap to registered avatars), and
            # export.OnnxStudent checks indices before running, as this method does.
            index = avatar_index
        else:
            index = self.check_avatar_index(avatar_index, driver.shape[0]).to(driver.device)
        h = self.encoder.features(imagenet_normalize(driver))
        for block in self.blocks:
            h = block(h, index)
        return torch.sigmoid(self.to_rgb(F.relu(h)))
