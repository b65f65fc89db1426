"""The 2D coordinate MLP F with controllable dynamics (DNP Sec. 3.1-3.2, Eq. 2).

``f, c = F(γ(x), γ(p_i), γ(g_i), e_i, v_i)`` is evaluated at every position x of an
``H_f x W_f`` grid with the frame's conditioning held fixed. Concatenating the conditioning
to every position and applying a linear layer is the same as adding one projection of the
conditioning (computed once per frame) to a projection of γ(x) (computed once for the grid),
which is how the first layer, and any skip layer, is evaluated here; the result is identical
to the concatenated form and costs ``H_f W_f`` times less for the conditioning part.
"""

from __future__ import annotations

import torch
from torch import nn

from neuralhead.nn.positional_encoding import PositionalEncoding


class ConditionedLinear(nn.Module):
    """``Linear([γ(x), cond])`` evaluated as ``W_x γ(x) + W_c cond + b`` with broadcasting."""

    def __init__(self, coord_features: int, cond_features: int, hidden: int, out_features: int):
        super().__init__()
        self.coord = nn.Linear(coord_features, out_features, bias=True)
        self.cond = nn.Linear(cond_features, out_features, bias=False)
        self.hidden = nn.Linear(hidden, out_features, bias=False) if hidden else None

    def forward(
        self, coords: torch.Tensor, cond: torch.Tensor, h: torch.Tensor | None = None
    ) -> torch.Tensor:
        # coords (P, Cx) shared by the batch; cond (B, Cc); h (B, P, hidden) or None.
        out = self.coord(coords)[None] + self.cond(cond)[:, None]
        if self.hidden is not None and h is not None:
            out = out + self.hidden(h)
        return out


class CoordinateMLP(nn.Module):
    """F of Eq. 2: per-position feature vectors f (n_f) and colours c (3) on a grid.

    Args:
        grid_size: H_f (= W_f).
        cond_features: length of the encoded per-frame conditioning [γ(p), γ(g), e, v].
        coord_frequencies: N of Eq. 3 for the coordinates x ∈ [0, 1]^2.
        width, depth, skips: hidden sizes; ``skips`` lists hidden layers that see the input again.
        feature_channels: n_f. ``rgb_head`` adds the colour output of Eq. 4.
    """

    def __init__(
        self,
        grid_size: int,
        cond_features: int,
        coord_frequencies: int,
        width: int,
        depth: int,
        skips: tuple[int, ...],
        feature_channels: int,
        rgb_head: bool,
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.coord_encoding = PositionalEncoding(2, coord_frequencies)
        ys, xs = torch.meshgrid(
            (torch.arange(grid_size, dtype=torch.float32) + 0.5) / grid_size,
            (torch.arange(grid_size, dtype=torch.float32) + 0.5) / grid_size,
            indexing="ij",
        )
        self.register_buffer("coords", torch.stack([xs, ys], -1).reshape(-1, 2), persistent=False)
        cx = self.coord_encoding.out_features
        self.skips = tuple(skips)
        self.layers = nn.ModuleList()
        for i in range(depth):
            if i == 0:
                self.layers.append(ConditionedLinear(cx, cond_features, 0, width))
            elif i in self.skips:
                self.layers.append(ConditionedLinear(cx, cond_features, width, width))
            else:
                self.layers.append(nn.Linear(width, width))
        self.activation = nn.ReLU(inplace=True)
        self.feature_head = nn.Linear(width, feature_channels)
        self.rgb_head = nn.Linear(width, 3) if rgb_head else None

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``cond (B, C)`` → feature map ``(B, n_f, H_f, W_f)`` and colours ``(B, 3, H_f, W_f)``."""
        coords = self.coord_encoding(self.coords.to(cond.dtype))
        h = None
        for layer in self.layers:
            if isinstance(layer, ConditionedLinear):
                h = layer(coords, cond, h)
            else:
                h = layer(h)
            h = self.activation(h)
        b, g = cond.shape[0], self.grid_size
        features = self.feature_head(h).transpose(1, 2).reshape(b, -1, g, g)
        rgb = None
        if self.rgb_head is not None:
            rgb = self.rgb_head(h).transpose(1, 2).reshape(b, 3, g, g)
        return features, rgb
