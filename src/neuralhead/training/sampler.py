"""Deterministic batches as a pure function of the step, for exact resumption.

The sample order is a fresh permutation of the training set every epoch, drawn from a
generator seeded with ``(seed, epoch)``. The batch of step ``s`` is the slice
``[s * B, (s + 1) * B)`` of that endless sequence, where ``B`` is the global batch; rank r of
a world of size W takes every W-th sample of it. Nothing about the data order has to be
saved in a checkpoint: the step alone determines it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class StepSampler:
    """Yields each rank's index lists for steps ``start_step, start_step + 1, ...``."""

    def __init__(
        self,
        indices: list[int] | torch.Tensor,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        if len(self.indices) == 0:
            raise ValueError("no samples to train on")
        self.batch_size = batch_size  # per rank
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._epoch, self._perm = -1, self.indices

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = self.indices[torch.randperm(len(self.indices), generator=g)]
            self._epoch = epoch
        return self._perm

    def batch(self, step: int) -> list[int]:
        n, global_batch = len(self.indices), self.batch_size * self.world_size
        out = []
        for position in range(step * global_batch, (step + 1) * global_batch):
            epoch, offset = divmod(position, n)
            out.append(int(self._permutation(epoch)[offset]))
        return out[self.rank :: self.world_size]

    def iterate(self, start_step: int) -> Iterator[list[int]]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1
