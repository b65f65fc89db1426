"""Training samples of the MegaPortraits base model from prepared videos (Sec. 3.1, B.1).

"We sample two random frames from our dataset at each step: the source frame x_s and the
driver frame x_d" of one video (Sec. 3), and for the cycle-consistency loss "an additional
source-driving pair x_s* and x_d*, which is sampled from a different video" (Sec. 3.1). A
sample therefore holds four frames: the driver (which is also the target), a source frame
of the same video, and a source and a driver frame of another video.

Each video is one prepared dataset directory (``neuralhead prepare``, docs/dataset.md). Per
frame the sample carries the RGB image, its foreground mask (``masks/``: "these losses are
calculated using only foreground regions", Sec. 3.1) and the tracker's landmarks, scaled to
``image_size`` (the gaze loss places its eye patches with the target's). Frames are those
of one split of each dataset's fixed train / held-out split (meta.json) where a face was
found. The cross pair's video is drawn uniformly among the other videos, so training needs
at least two; frames are drawn uniformly within a video (our choice; so is drawing the
source as any other frame of the driver's video).

Frames and masks are kept in memory as uint8 while the total stays under a limit, and
otherwise read from disk when needed.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from neuralhead.data.dataset import PortraitDataset
from neuralhead.data.format import DatasetFiles
from neuralhead.errors import InputError

#: Names of the four frames of a sample: ``x_d``, ``x_s``, ``x_s*``, ``x_d*`` (Sec. 3.1).
ROLES = ("driver", "source", "other_source", "other_driver")


@dataclass
class _Clip:
    """One video: its split's valid frames, their masks and all landmarks."""

    files: DatasetFiles
    frames: PortraitDataset  # reads (and may cache) the frames at image_size
    landmarks: torch.Tensor  # (N, K, 2) pixels at image_size, every frame of the clip
    mask_cache: dict[int, np.ndarray]  # frame -> (S, S) uint8, empty when not cached

    @property
    def valid_frames(self) -> np.ndarray:
        return self.frames.frames


class MegaPortraitsPairs(torch.utils.data.Dataset):
    """Source / driver pairs of one video plus a pair from another video.

    Args:
        dataset_dirs: prepared dataset directories, one video each.
        image_size: side the frames, masks and landmarks are brought to.
        split: ``"train"`` or ``"heldout"`` of each dataset's fixed split.
        cross_pairs: draw the second pair (x_s*, x_d*) from another video; needs two or more
            videos (``False``: samples hold the first pair only).
        cache_limit_gb: frames and masks are kept in memory while they fit in this.
        progress: show a bar while frames are loaded.

    Indices run over every valid frame of every video as a driver (``len`` is their
    number). :meth:`batch` draws the rest of each sample from a :class:`torch.Generator`, so
    a batch is a function of the indices and the generator's seed. A batch is a dict with,
    for each role ``r`` in :data:`ROLES` (``driver``, ``source``, then with cross pairs
    ``other_source``, ``other_driver``): ``r`` ``(B, 3, S, S)`` in [0, 1], ``r + "_mask"``
    ``(B, 1, S, S)`` in [0, 1], ``r + "_landmarks"`` ``(B, K, 2)`` pixels and
    ``r + "_frame"`` ``(B,)`` frame numbers; and ``video`` / ``other_video`` ``(B,)``.
    """

    def __init__(
        self,
        dataset_dirs: Iterable[str | Path],
        image_size: int,
        split: str = "train",
        *,
        cross_pairs: bool = True,
        cache_limit_gb: float = 4.0,
        progress: bool = False,
    ) -> None:
        if split not in ("train", "heldout"):
            raise InputError(f"split must be 'train' or 'heldout', got {split!r}")
        dirs = [Path(d) for d in dataset_dirs]
        if not dirs:
            raise InputError("MegaPortraits training needs at least one prepared dataset directory")
        if cross_pairs and len(dirs) < 2:
            raise InputError(
                "the cycle-consistency loss of MegaPortraits (Sec. 3.1) pairs each sample with "
                f"frames of another video: give at least two prepared videos (got {len(dirs)})"
            )
        if image_size < 8:
            raise InputError(f"image_size must be at least 8, got {image_size}")
        self.image_size, self.split, self.cross_pairs = image_size, split, cross_pairs
        self._cache_left = cache_limit_gb * 2**30
        self.clips: list[_Clip] = []
        self._add_clips(dirs, progress)
        self._starts = np.cumsum([0] + [len(c.valid_frames) for c in self.clips]).tolist()

    def _add_clips(self, dirs: Iterable[Path], progress: bool) -> None:
        """Load ``dirs`` as further clips, caching them while the memory budget lasts."""
        for root in dirs:
            clip = self._load(root, self._cache_left, progress)
            if clip.mask_cache:
                self._cache_left -= 4 * len(clip.valid_frames) * self.image_size**2
            self.clips.append(clip)

    def _load(self, root: Path, budget: float, progress: bool) -> _Clip:
        files = DatasetFiles.open(root)
        if not files.meta.get("masks_written", False):
            raise InputError(
                f"{root} has no foreground masks, which MegaPortraits' losses need (Sec. 3.1); "
                "prepare it again without --no-masks"
            )
        size = self.image_size
        probe = PortraitDataset(root, self.split, size, progress=False)
        # Frames (3 bytes a pixel) and masks (1 byte) are cached together or not at all.
        cache = 0 < 4 * len(probe) * size**2 <= budget
        frames = PortraitDataset(root, self.split, size, cache=cache, progress=progress)
        landmarks = files.array("landmarks", mmap=False)[..., :2] * (size / files.size)
        clip = _Clip(files, frames, torch.from_numpy(np.ascontiguousarray(landmarks)).float(), {})
        if cache:
            clip.mask_cache = {int(f): self._read_mask(clip, int(f)) for f in clip.valid_frames}
        return clip

    def _read_mask(self, clip: _Clip, frame: int) -> np.ndarray:
        cached = clip.mask_cache.get(frame)
        if cached is not None:
            return cached
        path = clip.files.mask_path(frame)
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise InputError(f"cannot read the mask {path}")
        if mask.shape[0] != self.image_size:
            interp = cv2.INTER_AREA if mask.shape[0] > self.image_size else cv2.INTER_LINEAR
            mask = cv2.resize(mask, (self.image_size, self.image_size), interpolation=interp)
        return mask

    # ------------------------------------------------------------------ indexing
    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def num_videos(self) -> int:
        return len(self.clips)

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES if self.cross_pairs else ROLES[:2]

    def locate(self, index: int) -> tuple[int, int]:
        """``(video, frame)`` of the driver at ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} frames")
        video = bisect.bisect_right(self._starts, index) - 1
        return video, int(self.clips[video].valid_frames[index - self._starts[video]])

    def valid_frames(self, video: int) -> np.ndarray:
        """The frames of ``video`` in this split where a face was found."""
        return self.clips[video].valid_frames

    def _other_frame(self, video: int, frame: int, generator: torch.Generator | None) -> int:
        """A frame of ``video`` other than ``frame`` (``frame`` itself if it is the only one)."""
        frames = self.clips[video].valid_frames
        if len(frames) == 1:
            return int(frames[0])
        pick = int(torch.randint(len(frames) - 1, (1,), generator=generator))
        position = int(np.searchsorted(frames, frame))
        return int(frames[pick + (pick >= position)])

    def _random_frame(self, video: int, generator: torch.Generator | None) -> int:
        frames = self.clips[video].valid_frames
        return int(frames[int(torch.randint(len(frames), (1,), generator=generator))])

    def draw(
        self, indices: Sequence[int], generator: torch.Generator | None = None
    ) -> list[dict[str, tuple[int, int]]]:
        """Sample descriptions: for each index, ``{role: (video, frame)}``."""
        return [self.draw_sample(*self.locate(int(index)), generator) for index in indices]

    def draw_sample(
        self, video: int, driver: int, generator: torch.Generator | None = None
    ) -> dict[str, tuple[int, int]]:
        """The description of the sample whose driver is frame ``driver`` of ``video``."""
        sample = {
            "driver": (video, driver),
            "source": (video, self._other_frame(video, driver, generator)),
        }
        if self.cross_pairs:
            other = self._another_video(video, generator)
            other_driver = self._random_frame(other, generator)
            sample["other_driver"] = (other, other_driver)
            sample["other_source"] = (other, self._other_frame(other, other_driver, generator))
        return sample

    def _another_video(self, video: int, generator: torch.Generator | None) -> int:
        """A video other than ``video``, drawn uniformly."""
        pick = int(torch.randint(self.num_videos - 1, (1,), generator=generator))
        return pick + (pick >= video)

    # ------------------------------------------------------------------ loading
    def frame(self, video: int, frame: int) -> dict[str, torch.Tensor]:
        """One frame: ``image`` ``(3, S, S)``, ``mask`` ``(1, S, S)`` in [0, 1], ``landmarks``."""
        clip = self.clips[video]
        image = clip.frames.image_uint8(frame).float() / 255.0
        mask = torch.from_numpy(self._read_mask(clip, frame)).float()[None] / 255.0
        return {"image": image, "mask": mask, "landmarks": clip.landmarks[frame]}

    def collate(self, samples: Sequence[dict[str, tuple[int, int]]]) -> dict[str, torch.Tensor]:
        """The batch (see the class docstring) of explicit sample descriptions."""
        if not samples:
            raise InputError("a batch needs at least one sample")
        batch: dict[str, torch.Tensor] = {}
        for role in samples[0]:
            frames = [self.frame(*sample[role]) for sample in samples]
            batch[role] = torch.stack([f["image"] for f in frames])
            batch[f"{role}_mask"] = torch.stack([f["mask"] for f in frames])
            batch[f"{role}_landmarks"] = torch.stack([f["landmarks"] for f in frames])
            batch[f"{role}_frame"] = torch.tensor([sample[role][1] for sample in samples])
        batch["video"] = torch.tensor([sample["driver"][0] for sample in samples])
        if "other_driver" in samples[0]:
            batch["other_video"] = torch.tensor([sample["other_driver"][0] for sample in samples])
        return batch

    def batch(
        self, indices: Sequence[int], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The batch whose drivers are ``indices``, the other frames drawn from ``generator``."""
        return self.collate(self.draw(indices, generator))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.batch([index])
        return {key: value[0] for key, value in batch.items()}
