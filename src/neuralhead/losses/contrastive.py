"""Losses that keep appearance out of the motion descriptor z.

- The large margin cosine loss L_cos of MegaPortraits (Sec. 3.1, Eqs. 6-7), used again with more
  positive pairs by EMOPortraits (Sec. 5.1, Eqs. 4-5).
- The source-driver mismatch loss L_sdm of EMOPortraits (Sec. 4.3, Eq. 3).

Descriptors may have any shape ``(B, ...)``; they are flattened per sample before the cosine
similarity is taken.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from neuralhead.errors import InputError

Pair = tuple[torch.Tensor, torch.Tensor]


def large_margin_cosine_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    scale: float = 5.0,
    margin: float = 0.2,
) -> torch.Tensor:
    """CosFace loss of one positive against negatives, averaged over the batch.

    For each sample, ``-log(e^{d_+} / (e^{d_+} + sum_n e^{d_n}))`` with
    ``d_+ = s * (cos(anchor, positive) - m)`` and ``d_n = s * cos(anchor, negative_n)``.

    ``anchor`` and ``positive`` have shape ``(B, ...)``; ``negatives`` has shape ``(B, N, ...)``
    for N negatives per sample, or ``(B, ...)`` for one.

    Eq. 6 of MegaPortraits writes the margin into every distance, but subtracted from all
    logits alike it would cancel in the softmax of Eq. 7 and have no effect; as in CosFace
    (Wang et al. 2018), which Eq. 7 cites, it is subtracted from the positive only.
    Defaults s = 5, m = 0.2 are the papers'.
    """
    _check_batch(anchor, positive, "anchor", "positive")
    if negatives.dim() == anchor.dim():
        negatives = negatives.unsqueeze(1)
    if negatives.dim() != anchor.dim() + 1 or negatives.shape[2:] != anchor.shape[1:]:
        raise InputError(
            f"negatives must have shape (B, N, ...) or (B, ...) matching the anchor "
            f"{tuple(anchor.shape)}, got {tuple(negatives.shape)}"
        )
    if negatives.shape[0] != anchor.shape[0]:
        raise InputError(
            f"negatives hold {negatives.shape[0]} samples, the anchor {anchor.shape[0]}"
        )
    positive_cos = _cosine(anchor, positive).unsqueeze(1)
    negative_cos = F.cosine_similarity(
        anchor.flatten(1).unsqueeze(1), negatives.flatten(2), dim=-1, eps=1e-8
    )
    return _cosface(positive_cos, negative_cos, scale, margin).mean()


def pair_contrastive_loss(
    positive_pairs: Sequence[Pair],
    negative_pairs: Sequence[Pair],
    *,
    scale: float = 5.0,
    margin: float = 0.2,
) -> torch.Tensor:
    """L_cos of MegaPortraits Eq. 7 over explicit pairs of descriptors, averaged over the batch.

    ``-sum_{(k,l) in P} log(e^{d(k,l)} / (e^{d(k,l)} + sum_{(i,j) in N} e^{d(i,j)}))``: every
    positive pair competes against all negative pairs, and the terms of the positive pairs are
    summed, as in the equation. Each pair is two ``(B, ...)`` tensors compared sample by sample.
    The margin is subtracted from positive pairs only (see :func:`large_margin_cosine_loss`).

    MegaPortraits: ``P = [(z_s->d, z_d), (z_s*->d, z_d)]``,
    ``N = [(z_s->d, z_d*), (z_s*->d, z_d*)]``. EMOPortraits (Eq. 5) adds
    ``(z_s*m->d, z_d)`` to P and ``(z_s*m->d, z_d*)`` to N.
    """
    if not positive_pairs or not negative_pairs:
        raise InputError("pair_contrastive_loss needs at least one positive and one negative pair")
    batch = positive_pairs[0][0].shape[0]
    for first, second in (*positive_pairs, *negative_pairs):
        _check_batch(first, second, "first descriptor", "second descriptor")
        if first.shape[0] != batch:
            raise InputError(f"pairs hold {first.shape[0]} and {batch} samples")
    positive_cos = torch.stack([_cosine(a, b) for a, b in positive_pairs], dim=1)
    negative_cos = torch.stack([_cosine(a, b) for a, b in negative_pairs], dim=1)
    return _cosface(positive_cos, negative_cos, scale, margin).mean()


def source_driver_mismatch_loss(
    z_source: torch.Tensor,
    z_driver: torch.Tensor,
    *,
    margin: float | torch.Tensor = 0.5,
    weight: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """L_sdm of EMOPortraits Eq. 3: ``w * max(0, cos(z_s, z_d) - margin)``, averaged over the batch.

    Penalises expression descriptors of the source and the driver (same identity, different
    frames) that are more similar than ``margin``, which would mean they encode identity.
    ``margin`` and ``weight`` are numbers or per-sample tensors of shape ``(B,)``, since a batch
    may mix datasets: the paper uses w = 1, margin = 0.5 for VoxCeleb2 pairs and w = 10,
    margin = 0.25 for FEED pairs.
    """
    _check_batch(z_source, z_driver, "z_source", "z_driver")
    return (weight * F.relu(_cosine(z_source, z_driver) - margin)).mean()


def _cosface(
    positive_cos: torch.Tensor, negative_cos: torch.Tensor, scale: float, margin: float
) -> torch.Tensor:
    """Per-sample sum over positives of ``-log softmax``; inputs ``(B, P)`` and ``(B, N)``."""
    positive_logits = scale * (positive_cos - margin)
    negative_logsumexp = torch.logsumexp(scale * negative_cos, dim=1, keepdim=True)
    # -log(e^p / (e^p + e^L)) = log(1 + e^(L - p)), computed without overflow.
    return F.softplus(negative_logsumexp - positive_logits).sum(dim=1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-8)


def _check_batch(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.dim() < 2:
        raise InputError(f"{name_a} must have shape (B, ...), got {tuple(a.shape)}")
    if a.shape != b.shape:
        raise InputError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} differ in shape")
