"""The warping generators W_s-> and W_->d of MegaPortraits (Sec. 3.1, Eq. 1; A.1, Fig. 9 b).

Both have this design with separate weights: W_s-> turns the source tuple ``(z_s, e_s)``
into the expression part of the warp to the canonical space, W_->d turns ``(z_d, e_s)`` into
the expression part of the warp to the driver. The rigid part (rotation, translation, scale)
is not predicted: :class:`~neuralhead.megaportraits.base_model.MegaPortraitsBase` composes it
with these offsets (A.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.megaportraits.config import MegaPortraitsConfig
from neuralhead.nn.blocks import AdaptiveResBlock3d, apply_spectral_norm, make_norm


class WarpingGenerator(nn.Module):
    """Expression code and global descriptor → 3D offset field ``(B, D, S, S, 3)`` (A.1).

    * The expression code ``z`` ``(B, expression_dim)`` is mapped by a linear layer to the
      shape of ``e_s`` ``(B, 512, 4, 4)`` and added to it: "as inputs we use sums z + e_s"
      (A.1; the authors' code averages the two, which differs by a factor the layers absorb).
    * A 1x1 conv (no bias, as in the authors' code) maps the sum to ``warp_channels[0] *
      warp_start_depth`` channels, read as a start volume ``(warp_channels[0],
      warp_start_depth, 4, 4)``: a 4^3 start at the paper's sizes.
    * Adaptive 3D residual blocks (ResBlock3D*) run down ``warp_channels`` (512 → 256 → 128 →
      64 → 32). Each up-samples (trilinear) the depth and the side by 2 while they are below
      the volume's, reaching its grid (16 x 64 x 64 at 512; at 256 the last block keeps
      32 x 32). Their GroupNorms take scale and shift from the same sum, flattened (512 x 16
      values), through low-rank projections of rank ``warp_norm_rank`` ("we multiply the
      foregoing sums and additionally learned matrices for each pair of parameters").
    * GroupNorm, ReLU, 3x3x3 conv to 3 channels, tanh: the offset from the identity grid, in
      grid_sample's normalised units, channel-last ``(x, y, z)`` as :mod:`neuralhead.geometry`
      expects (:func:`~neuralhead.geometry.offset_to_grid` turns it into a grid).

    The depth schedule is our simplification: the authors' code over-shoots the depth to 32
    and pools it back to 16 in its last block. Weight standardisation is off on the first
    (1x1) and the last conv (A.1); spectral norm follows ``config.spectral_norm`` on all convs.
    """

    def __init__(self, config: MegaPortraitsConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.warp_channels
        if len(channels) < 2:
            raise InputError("warp_channels needs at least two widths (one adaptive block)")
        blocks = len(channels) - 1
        # Each block doubles the depth and the side while they are below the volume's.
        depth, side, factors = config.warp_start_depth, config.descriptor_size, []
        for _ in range(blocks):
            factors.append(
                (2 if depth < config.volume_depth else 1, 2 if side < config.volume_size else 1)
            )
            depth, side = depth * factors[-1][0], side * factors[-1][1]
        if (depth, side) != (config.volume_depth, config.volume_size):
            raise InputError(
                f"the warping generator's {blocks} blocks double its start volume "
                f"({config.warp_start_depth} x {config.descriptor_size}^2) at most {blocks} "
                f"times, which cannot give the volume's {config.volume_depth} x "
                f"{config.volume_size}^2; adjust warp_channels or warp_start_depth"
            )

        embedding_shape = (
            config.descriptor_channels,
            config.descriptor_size,
            config.descriptor_size,
        )
        self.embedding_shape = embedding_shape
        embedding_dim = embedding_shape[0] * embedding_shape[1] * embedding_shape[2]
        self.expression_projection = nn.Linear(config.expression_dim, embedding_dim)
        self.start = apply_spectral_norm(
            nn.Conv2d(
                config.descriptor_channels, channels[0] * config.warp_start_depth, 1, bias=False
            ),
            config.spectral_norm,
        )
        self.blocks = nn.ModuleList(
            AdaptiveResBlock3d(
                c_in,
                c_out,
                embedding_dim,
                groups=config.norm_groups,
                rank=config.warp_norm_rank,
                upsample=(d, h, h),
                weight_standardization=config.weight_standardization,
                spectral_norm=config.spectral_norm,
            )
            for c_in, c_out, (d, h) in zip(channels[:-1], channels[1:], factors, strict=True)
        )
        self.head_norm = make_norm("group", channels[-1], dims=3, groups=config.norm_groups)
        self.head = apply_spectral_norm(
            nn.Conv3d(channels[-1], 3, 3, padding=1), config.spectral_norm
        )

    def forward(self, z: torch.Tensor, e_s: torch.Tensor) -> torch.Tensor:
        """``z`` ``(B, expression_dim)``, ``e_s`` ``(B, 512, 4, 4)`` → offsets ``(B, D, S, S, 3)``."""
        config = self.config
        if z.dim() != 2 or z.shape[1] != config.expression_dim:
            raise InputError(
                f"WarpingGenerator expects z of shape (B, {config.expression_dim}), got {tuple(z.shape)}"
            )
        if e_s.shape[1:] != self.embedding_shape or e_s.shape[0] != z.shape[0]:
            raise InputError(
                f"WarpingGenerator expects e_s of shape ({z.shape[0]}, "
                f"{', '.join(map(str, self.embedding_shape))}) for z's batch, got {tuple(e_s.shape)}"
            )
        embedding = self.expression_projection(z).view_as(e_s) + e_s
        x = self.start(embedding)
        x = x.view(x.shape[0], config.warp_channels[0], config.warp_start_depth, *x.shape[-2:])
        for block in self.blocks:
            x = block(x, embedding)
        offset = torch.tanh(self.head(F.relu(self.head_norm(x))))
        return offset.permute(0, 2, 3, 4, 1)
