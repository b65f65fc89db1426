"""Temporal smoothness of a predicted sequence.

EMOPortraits regularises its audio-to-rotation generator with
L_smooth = sum_{i=2..T} |X_i - X_{i-1}| (appendix Sec. 10.4, Eq. 20) on the predicted head-pose
sequence. HeadGAN has no temporal loss: it gets temporal coherence from conditioning on the
driving renders of the current and two previous frames (Sec. 3.3, Eq. 2). MegaPortraits names
its residual flicker as a limitation (Sec. 5).
"""

from __future__ import annotations

import torch

from neuralhead.errors import InputError


def temporal_smoothness(sequence: torch.Tensor, order: int = 1) -> torch.Tensor:
    """Mean absolute ``order``-th finite difference along time of ``sequence`` ``(B, T, ...)``.

    ``order=1`` penalises velocity, ``|X_t - X_{t-1}|`` (EMOPortraits Eq. 20); ``order=2``
    penalises acceleration, ``|X_{t+1} - 2 X_t + X_{t-1}|``, which leaves constant-speed motion
    free. The mean over batch, frames and features, instead of the paper's sum over frames, is
    our choice: it keeps the loss weight independent of the sequence length (the paper gives
    no weight).
    """
    if order not in (1, 2):
        raise InputError(f"order must be 1 or 2, got {order}")
    if sequence.dim() < 2 or sequence.shape[1] <= order:
        raise InputError(
            f"expected a sequence (B, T, ...) with more than {order} frames, "
            f"got shape {tuple(sequence.shape)}"
        )
    return torch.diff(sequence, n=order, dim=1).abs().mean()
