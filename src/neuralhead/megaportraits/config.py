"""Configuration and named presets of the MegaPortraits base model (Sec. 3.1, 4.1, A.1, B.1).

Sizes follow the supplementary (A.1) where it gives them and the authors' public code (see
the MegaPortraits section of the project's implementation notes) where the paper leaves
them open; where the two differ the paper wins and the code's value is noted beside the
field. Presets:

* ``megaportraits-512``: the paper's 512x512 model (volume 96 x 16 x 64 x 64).
* ``megaportraits-256``: the same widths at 256x256 input (volume 96 x 16 x 32 x 32), as the
  paper's VoxCeleb2 model.
* ``megaportraits-tiny``: a CPU-sized model at 64x64 for tests and smoke runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from neuralhead.errors import InputError


@dataclass
class MegaPortraitsConfig:
    """Sizes and options of the MegaPortraits base model G_base and its training.

    Attributes:
        image_size: side of the square source / driver / output images.
        volume_channels: channels ``C`` of the appearance volume ``v_s`` (96).
        volume_depth: depth ``D`` of ``v_s`` (16); ``C * D`` is the 2D channel count the
            appearance encoder reshapes and the projection P flattens (1536).
        volume_size: height = width of ``v_s`` (64 at 512 input: the encoder's stride is 8).
        descriptor_channels, descriptor_size: the global descriptor ``e_s`` is
            ``(descriptor_channels, descriptor_size, descriptor_size)`` (512 x 4 x 4).
        expression_dim: length of the expression code ``z`` (512 in MegaPortraits, 128 in
            EMOPortraits).
        appearance_channels: widths of E_app's 2D part: the stem (7x7 conv) and then one per
            stride-2 residual block (128 -> 256 -> 512 -> 512, notes).
        appearance_volume_blocks: 3D residual blocks at ``volume_channels`` after the reshape.
        descriptor_image_size: input side of the ResNet-50 computing ``e_s`` (256, notes).
        descriptor_width, descriptor_layers: base width and blocks per stage of that ResNet-50.
        pose_image_size, pose_width, pose_layers: the head-pose ResNet-18 (128x128 crop).
        expression_image_size, expression_width, expression_layers: the expression ResNet-18
            (128x128 pose-aligned crop); ``expression_dropout`` before its last layer (0.2,
            the authors' code). ``expression_output_dropout`` acts on ``z`` itself, the
            "dropout as a last layer" of EMOPortraits (supplementary 1.1; 0 here).
        warp_channels: widths of the warping generators' adaptive 3D residual blocks
            (512 -> 256 -> 128 -> 64 -> 32); each block after the first up-samples.
        warp_start_depth: depth of the warping generators' start volume; its height and
            width are ``descriptor_size`` (a 4^3 start, notes).
        warp_norm_rank: rank of the low-rank projection predicting the adaptive GroupNorm
            parameters (the code uses a low-rank projection; the rank is our choice).
        g3d_channels: G3D's U-Net widths, the first being ``volume_channels`` (96 -> 192 ->
            384 -> 512, notes).
        g3d_depths: depth of the volume at each G3D encoder level (height and width halve
            from level to level, starting at ``volume_size``); the authors' code lets the
            depth grow towards a cube (16 -> 32, 32, 16 at 512), Fig. 9 (c)'s Sample(z, x, y)
            units. The decoder starts from a learned constant of half the last level's size.
        g2d_channels: width after the projection P's 1x1 conv (512).
        g2d_blocks: residual blocks of G2D at the volume resolution (8 in A.1).
        g2d_up_channels: output widths of G2D's nearest-upsample stages (320, 192, 128); there
            must be ``log2(image_size / volume_size)`` of them.
        g2d_up_blocks: residual blocks per up-sampling stage (2).
        norm_groups: GroupNorm groups (32; A.1 replaces every BatchNorm with GroupNorm).
        weight_standardization: weight standardisation on every generator conv but the first
            and last (A.1).
        spectral_norm: spectral norm on the generator's convs (B.1).
        disc_num_scales, disc_num_layers, disc_base_channels: the multi-scale patch
            discriminator (Sec. 3.1); the layout is our choice, sized to the code's ~3M.
        weight_vgg19: w_IN of Eq. 4 (paper 20; code 18).
        weight_vggface: w_face of Eq. 4 (paper 4; code 10).
        weight_gaze: w_gaze of Eq. 4 (paper 5; code 10).
        weight_adv: w_adv of Eq. 5 (1).
        weight_fm: w_FM of Eq. 5 (40).
        weight_cos: w_cos of Eq. 8 (2); ``cos_scale`` s and ``cos_margin`` m of Eq. 6 (5, 0.2).
        weight_canonical_l1, weight_region_l1, weight_mismatch, mismatch_margin: losses only
            in the authors' code, off by default to follow the paper (code: canonical-volume
            L1 0.5; eye / mouth / ear masked L1 500 each; source-driver expression mismatch
            ``max(0, cos(z_s, z_d) - 0.5)``, weight not recorded).
        lr, lr_min, betas, eps, weight_decay: AdamW with cosine decay from ``lr`` to
            ``lr_min`` (Sec. 4.1, B.1), for generator and discriminator alike.
        num_iterations, batch_size: training length and batch (Sec. 4.1: 300k x 16 at 512,
            200k x 24 at 256).
    """

    image_size: int = 512
    volume_channels: int = 96
    volume_depth: int = 16
    volume_size: int = 64
    descriptor_channels: int = 512
    descriptor_size: int = 4
    expression_dim: int = 512

    appearance_channels: tuple[int, ...] = (128, 256, 512, 512)
    appearance_volume_blocks: int = 3
    descriptor_image_size: int = 256
    descriptor_width: int = 64
    descriptor_layers: tuple[int, ...] = (3, 4, 6, 3)
    pose_image_size: int = 128
    pose_width: int = 64
    pose_layers: tuple[int, ...] = (2, 2, 2, 2)
    expression_image_size: int = 128
    expression_width: int = 64
    expression_layers: tuple[int, ...] = (2, 2, 2, 2)
    expression_dropout: float = 0.2
    expression_output_dropout: float = 0.0

    warp_channels: tuple[int, ...] = (512, 256, 128, 64, 32)
    warp_start_depth: int = 4
    warp_norm_rank: int | None = 16

    g3d_channels: tuple[int, ...] = (96, 192, 384, 512)
    g3d_depths: tuple[int, ...] = (32, 32, 16)

    g2d_channels: int = 512
    g2d_blocks: int = 8
    g2d_up_channels: tuple[int, ...] = (320, 192, 128)
    g2d_up_blocks: int = 2

    norm_groups: int = 32
    weight_standardization: bool = True
    spectral_norm: bool = True

    disc_num_scales: int = 2
    disc_num_layers: int = 4
    disc_base_channels: int = 48

    weight_vgg19: float = 20.0
    weight_vggface: float = 4.0
    weight_gaze: float = 5.0
    weight_adv: float = 1.0
    weight_fm: float = 40.0
    weight_cos: float = 2.0
    cos_scale: float = 5.0
    cos_margin: float = 0.2
    weight_canonical_l1: float = 0.0
    weight_region_l1: float = 0.0
    weight_mismatch: float = 0.0
    mismatch_margin: float = 0.5

    lr: float = 2e-4
    lr_min: float = 1e-6
    betas: tuple[float, float] = (0.5, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    num_iterations: int = 300_000
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.image_size % self.volume_size:
            raise InputError(
                f"image_size {self.image_size} must be a multiple of volume_size {self.volume_size}"
            )
        upsampling = (self.image_size // self.volume_size).bit_length() - 1
        if 2**upsampling * self.volume_size != self.image_size:
            raise InputError("image_size / volume_size must be a power of two")
        if len(self.g2d_up_channels) != upsampling:
            raise InputError(
                f"g2d_up_channels needs {upsampling} entries (log2 of image_size / volume_size), "
                f"got {len(self.g2d_up_channels)}"
            )
        if self.g3d_channels[0] != self.volume_channels:
            raise InputError("g3d_channels must start with volume_channels")
        if len(self.g3d_depths) != len(self.g3d_channels) - 1:
            raise InputError("g3d_depths needs one depth per G3D level (len(g3d_channels) - 1)")
        levels = len(self.g3d_depths)
        if self.volume_size % 2**levels or self.g3d_depths[-1] % 2:
            raise InputError(
                f"G3D halves the volume {levels} times: volume_size must be a multiple of "
                f"{2**levels} and the last of g3d_depths even"
            )

    @property
    def projection_channels(self) -> int:
        """``C * D``: channels of the volume flattened to 2D (1536 at the paper's sizes)."""
        return self.volume_channels * self.volume_depth


PRESETS: dict[str, MegaPortraitsConfig] = {
    "megaportraits-512": MegaPortraitsConfig(),
    "megaportraits-256": MegaPortraitsConfig(
        image_size=256,
        volume_size=32,
        g3d_depths=(16, 16, 8),
        num_iterations=200_000,
        batch_size=24,
    ),
    # A training step well under a second on a 2-core CPU; widths are our choice.
    "megaportraits-tiny": MegaPortraitsConfig(
        image_size=64,
        volume_channels=8,
        volume_depth=4,
        volume_size=8,
        descriptor_channels=32,
        descriptor_size=2,
        expression_dim=16,
        appearance_channels=(16, 16, 32, 32),
        appearance_volume_blocks=1,
        descriptor_image_size=64,
        descriptor_width=8,
        descriptor_layers=(1, 1, 1, 1),
        pose_image_size=64,
        pose_width=8,
        pose_layers=(1, 1, 1, 1),
        expression_image_size=64,
        expression_width=8,
        expression_layers=(1, 1, 1, 1),
        warp_channels=(32, 16, 8),
        warp_start_depth=2,
        warp_norm_rank=8,
        g3d_channels=(8, 16, 32),
        g3d_depths=(4, 4),
        g2d_channels=32,
        g2d_blocks=1,
        g2d_up_channels=(32, 16, 8),
        g2d_up_blocks=1,
        norm_groups=4,
        disc_num_scales=2,
        disc_num_layers=3,
        disc_base_channels=8,
        num_iterations=1000,
        batch_size=2,
    ),
}


def preset(name: str, **overrides) -> MegaPortraitsConfig:
    """The preset ``name`` (see :data:`PRESETS`) with any fields overridden by keyword."""
    if name not in PRESETS:
        raise InputError(
            f"unknown MegaPortraits preset {name!r}; available: {', '.join(sorted(PRESETS))}"
        )
    return replace(PRESETS[name], **overrides)
