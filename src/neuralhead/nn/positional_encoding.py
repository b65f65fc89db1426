"""Sinusoidal positional encoding (DNP Eq. 3, after NeRF).

``γ(x) = [x, sin(2^0 πx), cos(2^0 πx), ..., sin(2^{N-1} πx), cos(2^{N-1} πx)]`` applied to
every component of the input, mapping each number to ``2N + 1`` numbers. The paper's printed
Eq. 3 starts its series at ``sin(2πx)`` but ends at ``2^{N-1}``; we follow NeRF's series, which
starts at ``2^0 π``, so that the lowest frequency spans the whole [0, 1] coordinate range.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionalEncoding(nn.Module):
    """γ of Eq. 3 with ``num_frequencies`` = N octaves; ``include_input`` keeps the raw x."""

    def __init__(self, in_features: int, num_frequencies: int, include_input: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_frequencies = num_frequencies
        self.include_input = include_input
        bands = math.pi * (2.0 ** torch.arange(num_frequencies, dtype=torch.float32))
        self.register_buffer("bands", bands, persistent=False)

    @property
    def out_features(self) -> int:
        return self.in_features * (2 * self.num_frequencies + int(self.include_input))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features)`` → ``(..., out_features)``.

        Component by component, each as ``[x, sin(2^0 πx) .. sin(2^{N-1} πx), cos(2^0 πx) ..
        cos(2^{N-1} πx)]``: all sines, then all cosines, not interleaved as Eq. 3 is written.
        """
        angles = x[..., None] * self.bands.to(x.dtype)  # (..., in, N)
        parts = [torch.sin(angles), torch.cos(angles)]
        if self.include_input:
            parts.insert(0, x[..., None])
        return torch.cat(parts, dim=-1).flatten(-2)
