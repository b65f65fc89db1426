"""The CNN decoder D that turns the MLP's feature map into the frame (DNP Sec. 3.2).

``Ĩ_i = D(F_i)``: a 3x3 convolution lifts n_f to the first stage's width, then each stage
doubles the resolution (bilinear up-sampling followed by two 3x3 convolutions with LeakyReLU)
until ``H x W``; a last 3x3 convolution gives RGB. The layout and widths are our choice (the
paper's supplementary with the exact design is not public). The output is linear (no
squashing), in the [-1, 1] range of the training images, which suits the L2 loss of Eq. 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.act(self.conv2(self.act(self.conv1(x))))


class Decoder(nn.Module):
    """D: ``(B, n_f, H_f, W_f)`` → ``(B, 3, H, W)`` with ``H = H_f * 2^len(channels)``."""

    def __init__(self, feature_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        first = channels[0] if channels else feature_channels
        self.stem = nn.Conv2d(feature_channels, first, 3, padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        widths = (first, *channels)
        self.stages = nn.ModuleList(UpBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(features))
        for stage in self.stages:
            x = stage(x)
        return self.to_rgb(x)
