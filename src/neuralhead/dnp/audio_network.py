"""Audio-driven conditioning of DNP (Sec. 3.3): N_aud and the attention filter N_att.

Each frame i has a window ``A_i`` of w = 16 speech feature vectors. ``N_aud`` turns it into
a code ``a_i ∈ R^{n_a}``; ``N_att`` mixes the 2u = 8 codes ``a_{i-u+1..i+u}`` with predicted
weights into ``α_i = Σ_j w_j a_j``, which replaces the expression e_i as MLP input.

Layer shapes follow AD-NeRF, which the paper cites for both networks: N_aud is four
stride-2 Conv1d layers (feature channels 32-32-64-64, kernel 3, LeakyReLU 0.02) over the 16
steps, then Linear 64-64, LeakyReLU, Linear 64-n_a. N_att is Conv1d layers n_a-16-8-4-2-1
(kernel 3) along the 8 codes, a Linear 8-8 and a softmax over the codes.
"""

from __future__ import annotations

import torch
from torch import nn


class AudioNetwork(nn.Module):
    """N_aud: ``(B, w, D)`` feature windows → codes ``(B, n_a)``."""

    def __init__(self, feature_dim: int, window: int, code_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = (feature_dim, 32, 32, 64, 64)
        length = window
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv1d(c_in, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.02, True)]
            length = (length + 1) // 2
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(64 * length, 64), nn.LeakyReLU(0.02, True), nn.Linear(64, code_dim)
        )

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        x = self.conv(windows.transpose(1, 2))
        return self.fc(x.flatten(1))


class AudioAttention(nn.Module):
    """N_att: codes of 2u consecutive frames ``(B, 2u, n_a)`` → α ``(B, n_a)``."""

    def __init__(self, code_dim: int, frames: int) -> None:
        super().__init__()
        channels = (code_dim, 16, 8, 4, 2, 1)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv1d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.02, True)]
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(frames, frames)

    def weights(self, codes: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(B, 2u)`` summing to one."""
        scores = self.conv(codes.transpose(1, 2))[:, 0]
        return torch.softmax(self.fc(scores), dim=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return (self.weights(codes)[..., None] * codes).sum(1)
