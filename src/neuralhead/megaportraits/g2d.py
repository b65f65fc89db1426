"""The projection P and the 2D convolutional network G2D of MegaPortraits (Sec. 3.1, Eq. 2;
A.1, Fig. 9 d): the driver volume ``v_s->d`` → the output image ``x_s->d``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.megaportraits.config import MegaPortraitsConfig
from neuralhead.nn.blocks import ResBlock2d, apply_spectral_norm, make_conv, make_norm


class OrthographicProjection(nn.Module):
    """P of Eq. 2: ``(B, C, D, S, S)`` → ``(B, g2d_channels, S, S)`` (A.1).

    "[A] reshape operation and 1x1 convolution": the depth is folded into the channels
    (96 x 16 = 1536) and a 1x1 conv mixes them to 512, an orthographic projection along the
    depth axis that the network learns (as in face-vid2vid). The conv is weight-standardised
    (it is not the network's first or last conv, A.1).
    """

    def __init__(self, config: MegaPortraitsConfig) -> None:
        super().__init__()
        self.volume_shape = (config.volume_channels, config.volume_depth)
        self.conv = make_conv(
            2,
            config.projection_channels,
            config.g2d_channels,
            1,
            weight_standardization=config.weight_standardization,
            spectral_norm=config.spectral_norm,
        )

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        if volume.dim() != 5 or tuple(volume.shape[1:3]) != self.volume_shape:
            channels, depth = self.volume_shape
            raise InputError(
                f"the projection expects a volume of shape (B, {channels}, {depth}, H, W), "
                f"got {tuple(volume.shape)}"
            )
        return self.conv(volume.flatten(1, 2))


class G2D(nn.Module):
    """P followed by the 2D generator: volume ``(B, C, D, S, S)`` → image ``(B, 3, H, W)`` in [0, 1].

    A.1 / Fig. 9 (d): after P, ``g2d_blocks`` residual blocks at the volume's resolution and
    width 512 (8 in the paper), then ``log2(H / S)`` stages that each up-sample by 2 (nearest)
    in their first residual block and have ``g2d_up_blocks`` blocks (2) of falling width
    (320 → 192 → 128, widths from the authors' code); GroupNorm, ReLU, a 1x1 conv to RGB
    (the last conv, without weight standardisation) and a sigmoid.
    """

    def __init__(self, config: MegaPortraitsConfig) -> None:
        super().__init__()
        self.config = config
        block = dict(
            groups=config.norm_groups,
            weight_standardization=config.weight_standardization,
            spectral_norm=config.spectral_norm,
        )
        self.projection = OrthographicProjection(config)
        width = config.g2d_channels
        layers: list[nn.Module] = [
            ResBlock2d(width, width, **block) for _ in range(config.g2d_blocks)
        ]
        for out in config.g2d_up_channels:
            layers.append(ResBlock2d(width, out, upsample=2, **block))
            layers.extend(ResBlock2d(out, out, **block) for _ in range(config.g2d_up_blocks - 1))
            width = out
        self.blocks = nn.Sequential(*layers)
        self.head_norm = make_norm("group", width, dims=2, groups=config.norm_groups)
        self.head = apply_spectral_norm(nn.Conv2d(width, 3, 1), config.spectral_norm)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        config = self.config
        if volume.dim() != 5 or volume.shape[-2:] != (config.volume_size, config.volume_size):
            raise InputError(
                f"G2D expects a volume of shape (B, {config.volume_channels}, "
                f"{config.volume_depth}, {config.volume_size}, {config.volume_size}), "
                f"got {tuple(volume.shape)}"
            )
        x = self.blocks(self.projection(volume))
        return torch.sigmoid(self.head(F.relu(self.head_norm(x))))
