"""Reading a prepared dataset for training and evaluation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from neuralhead.data.format import DatasetFiles
from neuralhead.errors import InputError


class PortraitDataset(torch.utils.data.Dataset):
    """Frames and per-frame parameters of one split of a prepared dataset.

    Indexing returns a dict with the frame ``image`` (``(3, S, S)`` float in [-1, 1] at
    ``image_size``), ``index`` (frame number in the clip), ``pose``, ``gaze``, ``expression``
    and, when the clip has audio, ``audio`` (``(2u, w, D)``: the windows of the 2u frames
    ``i-u+1 .. i+u``, clamped at the clip's ends, as the attention filter of DNP Sec. 3.3
    needs). Frames where the tracker found no face are left out unless ``only_valid=False``.

    With ``cache=True`` the split's frames are decoded once into memory as uint8.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: int | None = None,
        only_valid: bool = True,
        cache: bool = False,
        audio_frames: int = 8,
        progress: bool = True,
    ) -> None:
        self.files = DatasetFiles.open(root)
        self.split = split
        self.image_size = image_size or self.files.size
        self.audio_frames = audio_frames
        valid = self.files.array("valid", mmap=False)
        frames = np.array(self.files.split_range(split))
        if only_valid:
            frames = frames[valid[frames]]
        if len(frames) == 0:
            raise InputError(f"the {split} split of {self.files.root} has no frames with a face")
        self.frames = frames
        self.pose = torch.from_numpy(self.files.array("pose", mmap=False))
        self.gaze = torch.from_numpy(self.files.array("gaze", mmap=False))
        self.expression = torch.from_numpy(self.files.array("expression", mmap=False))
        self.audio_windows = None
        if self.files.has_audio:
            self.audio_windows = torch.from_numpy(self.files.array("audio_windows", mmap=False))
        self._cache: torch.Tensor | None = None
        self._cache_pos: dict[int, int] = {}
        if cache:
            self._fill_cache(progress)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def num_frames(self) -> int:
        return self.files.num_frames

    @property
    def cache_bytes(self) -> int:
        return len(self.frames) * 3 * self.image_size**2

    def _fill_cache(self, progress: bool) -> None:
        cache = torch.empty((len(self.frames), 3, self.image_size, self.image_size), dtype=torch.uint8)
        for pos, frame in enumerate(tqdm(self.frames, desc=f"loading {self.split} frames", disable=not progress)):
            cache[pos] = torch.from_numpy(self._read(int(frame))).permute(2, 0, 1)
        self._cache = cache
        self._cache_pos = {int(f): i for i, f in enumerate(self.frames)}

    def _read(self, frame: int) -> np.ndarray:
        if not self.files.has_frames:
            raise InputError(f"dataset {self.files.root} was prepared without frames")
        path = self.files.frame_path(frame)
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise InputError(f"cannot read frame {path}")
        if image.shape[0] != self.image_size:
            interp = cv2.INTER_AREA if image.shape[0] > self.image_size else cv2.INTER_LINEAR
            image = cv2.resize(image, (self.image_size, self.image_size), interpolation=interp)
        return np.ascontiguousarray(image[:, :, ::-1])

    def image_uint8(self, frame: int) -> torch.Tensor:
        """Frame ``frame`` of the clip as ``(3, S, S)`` uint8."""
        if self._cache is not None and frame in self._cache_pos:
            return self._cache[self._cache_pos[frame]]
        return torch.from_numpy(self._read(frame)).permute(2, 0, 1)

    def audio_context(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, 2u, w, D)`` audio windows of frames ``i-u+1 .. i+u`` for each frame i."""
        if self.audio_windows is None:
            raise InputError(f"dataset {self.files.root} has no audio")
        u = self.audio_frames // 2
        offsets = torch.arange(-u + 1, u + 1)
        idx = (frames[:, None] + offsets[None]).clamp(0, self.num_frames - 1)
        return self.audio_windows[idx]

    def parameters(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {
            "index": frames,
            "pose": self.pose[frames],
            "gaze": self.gaze[frames],
            "expression": self.expression[frames],
        }
        if self.audio_windows is not None:
            out["audio"] = self.audio_context(frames)
        return out

    def __getitem__(self, pos: int) -> dict[str, torch.Tensor]:
        frame = int(self.frames[pos])
        item = {k: v[0] for k, v in self.parameters(torch.tensor([frame])).items()}
        item["image"] = self.image_uint8(frame).float() / 127.5 - 1.0
        return item

    def batch(self, positions: list[int]) -> dict[str, torch.Tensor]:
        """Collate the items at ``positions`` (indices into this split)."""
        frames = torch.as_tensor(self.frames[positions], dtype=torch.long)
        out = self.parameters(frames)
        images = torch.stack([self.image_uint8(int(f)) for f in frames])
        out["image"] = images.float() / 127.5 - 1.0
        return out
