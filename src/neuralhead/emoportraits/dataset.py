"""Training samples of the EMOPortraits main model (main paper Sec. 5.1; supplementary 1.2).

A sample holds MegaPortraits' four frames (:mod:`neuralhead.megaportraits.dataset`): the
driver x_d, a source x_s of the same video, and x_s*, x_d* of another video, plus a fifth,
``moved_source`` x_s^m: "for each x_s, x_d pair, we sample one more random additional pair"
(Sec. 5.1), whose head pose is imposed on the cross-reenactment x_s*m->d. Only the pose of
x_s^m is used, so we draw a single frame (the paper's x_d^m plays no part in any equation): a
uniformly drawn frame of a uniformly drawn video other than the driver's (our choice; it may
be the video of x_s*, which is the only one when there are two videos).

Mixed-dataset sampling (supplementary 1.2: "every second iteration involved a batch
comprising one image pair from VC2 and one from the FEED dataset"): next to the main videos a
second set of videos may be given (FEED in the paper: few identities, intense expressions).
On every second step (the odd ones, :class:`MixedStepSampler`) the last sample of the batch
is a source / driver pair of a second-set video; its x_s*, x_d* and x_s^m come from the main
videos, so the contrastive pairs span both sets. With the paper's batch of 2 per GPU that is
25 % second-set pairs, as in the paper; a batch of one makes every second batch a second-set
pair. Each batch carries a ``secondary`` flag per sample, by which the trainer weighs the
source-driver mismatch loss (Eq. 3).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from neuralhead.errors import InputError
from neuralhead.megaportraits.dataset import ROLES as MEGAPORTRAITS_ROLES
from neuralhead.megaportraits.dataset import MegaPortraitsPairs
from neuralhead.training.sampler import StepSampler

#: The frames of a sample: x_d, x_s, x_s*, x_d* (MegaPortraits) and x_s^m (Sec. 5.1).
ROLES = (*MEGAPORTRAITS_ROLES, "moved_source")


class EMOPortraitsPairs(MegaPortraitsPairs):
    """MegaPortraits' source / driver pairs with the moved source x_s^m and a second set of videos.

    Args:
        dataset_dirs: the main prepared videos (at least two with ``cross_pairs``).
        image_size, split, cross_pairs, cache_limit_gb, progress: as for
            :class:`~neuralhead.megaportraits.dataset.MegaPortraitsPairs`; ``cross_pairs``
            also switches the moved source.
        secondary_dirs: the second set of prepared videos (may be empty). Their frames are
            not indexed with the main ones: :meth:`draw` takes them through ``secondary``.

    Videos are numbered main first, then second-set (``num_main_videos`` onwards); indices
    (``len``) run over the main videos' valid frames, and ``secondary`` indices over the
    second set's (:attr:`num_secondary_frames`). A batch holds what a MegaPortraits batch
    holds, the role ``moved_source`` (with cross pairs), and ``secondary`` ``(B,)`` bool.
    """

    def __init__(
        self,
        dataset_dirs: Iterable[str | Path],
        image_size: int,
        split: str = "train",
        *,
        secondary_dirs: Iterable[str | Path] = (),
        cross_pairs: bool = True,
        cache_limit_gb: float = 4.0,
        progress: bool = False,
    ) -> None:
        super().__init__(
            dataset_dirs,
            image_size,
            split,
            cross_pairs=cross_pairs,
            cache_limit_gb=cache_limit_gb,
            progress=progress,
        )
        self.num_main_videos = len(self.clips)
        self._add_clips([Path(d) for d in secondary_dirs], progress)
        counts = [len(clip.valid_frames) for clip in self.clips[self.num_main_videos :]]
        self._secondary_starts = np.cumsum([0, *counts]).tolist()

    @property
    def num_secondary_videos(self) -> int:
        return len(self.clips) - self.num_main_videos

    @property
    def num_secondary_frames(self) -> int:
        """The number of second-set driver indices (valid frames of the second set)."""
        return self._secondary_starts[-1]

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES if self.cross_pairs else ROLES[:2]

    def locate_secondary(self, index: int) -> tuple[int, int]:
        """``(video, frame)`` of the second-set driver at ``index``."""
        if not 0 <= index < self.num_secondary_frames:
            raise IndexError(
                f"secondary index {index} out of range for {self.num_secondary_frames} frames"
            )
        position = bisect.bisect_right(self._secondary_starts, index) - 1
        video = self.num_main_videos + position
        return video, int(self.clips[video].valid_frames[index - self._secondary_starts[position]])

    def _another_video(self, video: int, generator: torch.Generator | None) -> int:
        """A main video other than ``video`` (any main video for a second-set one)."""
        count = self.num_main_videos
        if video >= count:
            return int(torch.randint(count, (1,), generator=generator))
        pick = int(torch.randint(count - 1, (1,), generator=generator))
        return pick + (pick >= video)

    def draw_sample(
        self, video: int, driver: int, generator: torch.Generator | None = None
    ) -> dict[str, tuple[int, int]]:
        sample = super().draw_sample(video, driver, generator)
        if self.cross_pairs:
            moved = self._another_video(video, generator)
            sample["moved_source"] = (moved, self._random_frame(moved, generator))
        return sample

    def draw(
        self,
        indices: Sequence[int],
        generator: torch.Generator | None = None,
        *,
        secondary: Sequence[int] = (),
    ) -> list[dict[str, tuple[int, int]]]:
        """Sample descriptions ``{role: (video, frame)}``: one per main index, then one per
        ``secondary`` index (a second-set driver)."""
        samples = super().draw(indices, generator)
        samples += [self.draw_sample(*self.locate_secondary(int(i)), generator) for i in secondary]
        return samples

    def collate(self, samples: Sequence[dict[str, tuple[int, int]]]) -> dict[str, torch.Tensor]:
        batch = super().collate(samples)
        batch["secondary"] = torch.tensor(
            [sample["driver"][0] >= self.num_main_videos for sample in samples], dtype=torch.bool
        )
        return batch

    def batch(
        self,
        indices: Sequence[int],
        generator: torch.Generator | None = None,
        *,
        secondary: Sequence[int] = (),
    ) -> dict[str, torch.Tensor]:
        """The batch of main drivers ``indices`` followed by second-set drivers ``secondary``."""
        return self.collate(self.draw(indices, generator, secondary=secondary))


class MixedStepSampler:
    """The main and second-set driver indices of every step (supplementary 1.2).

    Main indices follow a :class:`~neuralhead.training.sampler.StepSampler` of
    ``batch_size`` per rank. When there is a second set, on every odd step the last main
    index of each rank's batch is replaced by a second-set index, taken from a second
    ``StepSampler`` (one index per rank) at position ``step // 2``, so every second-set frame
    is visited once per epoch of that set. Both are functions of the step alone (exact
    resumption).
    """

    def __init__(
        self,
        num_main: int,
        num_secondary: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        self.main = StepSampler(list(range(num_main)), batch_size, seed, rank, world_size)
        self.secondary = (
            StepSampler(list(range(num_secondary)), 1, seed, rank, world_size)
            if num_secondary
            else None
        )

    def is_mixed(self, step: int) -> bool:
        """Whether the batch of ``step`` ends with a second-set sample."""
        return self.secondary is not None and step % 2 == 1

    def batch(self, step: int) -> tuple[list[int], list[int]]:
        """``(main indices, second-set indices)`` of this rank at ``step``."""
        main = self.main.batch(step)
        if not self.is_mixed(step):
            return main, []
        return main[:-1], self.secondary.batch(step // 2)
