"""The 3D convolutional network G3D of MegaPortraits (Sec. 3.1, Eq. 1; A.1, Fig. 9 c).

G3D processes the source volume after the warp to the canonical space; its output is the
canonical volume (EMOPortraits Sec. 3: "first warping and G3D transform V_s into a canonical
volume V_s^C").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.megaportraits.config import MegaPortraitsConfig
from neuralhead.nn.blocks import ResBlock3d, apply_spectral_norm, make_norm


def resize_volume(volume: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Bring ``(B, C, D, H, W)`` to spatial ``size``: average-pool the axes that shrink (by
    whole factors), then trilinearly up-sample the axes that grow (A.1's Sample(z, x, y))."""
    current = tuple(volume.shape[-3:])
    if any(m < n and n % m for n, m in zip(current, size, strict=True)):
        raise InputError(f"cannot pool a volume of size {current} to {tuple(size)}")
    down = tuple(n // m if m < n else 1 for n, m in zip(current, size, strict=True))
    if any(f > 1 for f in down):
        volume = F.avg_pool3d(volume, down)
    if tuple(volume.shape[-3:]) != tuple(size):
        volume = F.interpolate(volume, size=size, mode="trilinear", align_corners=False)
    return volume


class G3D(nn.Module):
    """U-Net on the canonical volume: ``(B, C, D, S, S)`` → the same shape (A.1, Fig. 9 c).

    A.1: "several downsample units [of] 3D residual block and downsample operation, followed by
    the same number of upsample units [of] 3D residual block and upsample operation". Sizes
    follow the authors' code (the notes give ~58M parameters at 512, which this layout has):

    * Encoder: one residual block per level, ``g3d_channels`` 96 → 192 → 384 → 512. Level
      ``l`` runs at depth ``g3d_depths[l]`` and side ``volume_size / 2^l``; the volume is
      average-pooled or trilinearly up-sampled per axis between levels (at 512:
      16x64x64 → 32x64x64, 32x32x32, 16x16x16).
    * Decoder: starts from a learned constant ``(512, D/2, S/2, S/2)`` of half the deepest
      level's size (8^3 at 512), as in the authors' code; at each level it is up-sampled to
      that level's size, the level's encoder features enter through a skip residual block
      (channels kept) and are added, and a residual block lowers the width to the next
      level's (512 → 384 → 192 → 96). The volume's content thus reaches the output only
      through the skips.
    * Back to the input's depth (pooling), then GroupNorm, ReLU and a 1x1 conv (the last
      conv, without weight standardisation).
    """

    def __init__(self, config: MegaPortraitsConfig) -> None:
        super().__init__()
        self.config = config
        channels, depths = config.g3d_channels, config.g3d_depths
        side = config.volume_size
        self.sizes = [(d, side // 2**level, side // 2**level) for level, d in enumerate(depths)]
        block = dict(
            groups=config.norm_groups,
            weight_standardization=config.weight_standardization,
            spectral_norm=config.spectral_norm,
        )
        self.down = nn.ModuleList(
            ResBlock3d(c_in, c_out, **block) for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.skips = nn.ModuleList(ResBlock3d(c, c, **block) for c in channels[1:])
        self.up = nn.ModuleList(
            ResBlock3d(c_in, c_out, **block) for c_in, c_out in zip(channels[1:], channels[:-1])
        )
        deepest = self.sizes[-1]
        self.constant = nn.Parameter(torch.randn(1, channels[-1], *(n // 2 for n in deepest)))
        self.head_norm = make_norm("group", channels[0], dims=3, groups=config.norm_groups)
        self.head = apply_spectral_norm(
            nn.Conv3d(channels[0], channels[0], 1), config.spectral_norm
        )

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        config = self.config
        expected = (
            config.volume_channels,
            config.volume_depth,
            config.volume_size,
            config.volume_size,
        )
        if volume.dim() != 5 or tuple(volume.shape[1:]) != expected:
            raise InputError(
                f"G3D expects a volume of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(volume.shape)}"
            )
        features = []
        x = volume
        for block, size in zip(self.down, self.sizes, strict=True):
            x = block(resize_volume(x, size))
            features.append(x)
        x = self.constant.expand(volume.shape[0], *self.constant.shape[1:])
        for level in reversed(range(len(self.sizes))):
            x = resize_volume(x, self.sizes[level])
            x = self.up[level](x + self.skips[level](features[level]))
        x = resize_volume(x, tuple(volume.shape[-3:]))
        return self.head(F.relu(self.head_norm(x)))
