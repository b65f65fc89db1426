"""The prepared-dataset directory: file names, metadata and readers for its arrays.

A dataset written by ``neuralhead prepare VIDEO OUT_DIR`` (see docs/dataset.md) holds::

    meta.json                 what the dataset is (written last: no meta.json, no dataset)
    frames/000000.png ...     RGB crops, size x size
    masks/000000.png ...      foreground masks, 8-bit
    landmarks.npy             (N, 478, 3) float32 landmarks in crop pixels (x, y, z)
    canonical.npy             (N, 478, 3) float32 landmarks in template space (pose removed)
    pose.npy                  (N, 6) float32 (pitch, yaw, roll, tx, ty, tz)
    expression.npy            (N, K) float32 expression coefficients
    gaze.npy                  (N, 2) float32 (yaw, pitch) of the eyes, radians
    valid.npy                 (N,) bool: False where no face was found (values interpolated)
    crop_boxes.npy            (N, 3) int64 (x0, y0, side) in source pixels
    expression_basis.npz      the basis ``expression.npy`` is expressed in
    audio.wav                 16 kHz mono audio (when the video has sound)
    audio_windows.npy         (N, 16, D) float32 per-frame audio feature windows
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuralhead.errors import InputError
from neuralhead.tracking.expression import ExpressionBasis

FORMAT_NAME = "neuralhead-portrait-dataset"
FORMAT_VERSION = 1
META = "meta.json"
FRAME_PATTERN = "frames/{:06d}.png"
MASK_PATTERN = "masks/{:06d}.png"
ARRAYS = ("landmarks", "canonical", "pose", "expression", "gaze", "valid", "crop_boxes")


@dataclass
class DatasetFiles:
    """Read access to a prepared dataset directory."""

    root: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> DatasetFiles:
        root = Path(root)
        meta_path = root / META
        if not root.is_dir():
            raise InputError(f"dataset directory {root} does not exist")
        if not meta_path.is_file():
            raise InputError(
                f"{root} is not a prepared dataset (no {META}; run `neuralhead prepare VIDEO {root}`)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_NAME:
            raise InputError(f"{meta_path} is not a {FORMAT_NAME} file")
        if meta.get("version", 0) > FORMAT_VERSION:
            raise InputError(
                f"{root} was written by a newer neuralhead (dataset format {meta['version']})"
            )
        return cls(root=root, meta=meta)

    @property
    def num_frames(self) -> int:
        return int(self.meta["num_frames"])

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    @property
    def fps(self) -> float:
        return float(self.meta["fps"])

    @property
    def has_frames(self) -> bool:
        return bool(self.meta.get("frames_written", True))

    @property
    def has_audio(self) -> bool:
        return self.meta.get("audio") is not None

    def array(self, name: str, mmap: bool = True) -> np.ndarray:
        path = self.root / f"{name}.npy"
        if not path.is_file():
            raise InputError(f"dataset {self.root} is missing {path.name}")
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)

    def expression_basis(self) -> ExpressionBasis:
        return ExpressionBasis.load(self.root / "expression_basis.npz")

    def frame_path(self, index: int) -> Path:
        return self.root / FRAME_PATTERN.format(index)

    def mask_path(self, index: int) -> Path:
        return self.root / MASK_PATTERN.format(index)

    def split_range(self, split: str) -> range:
        """Frame indices of ``train``, ``heldout`` (the clip's last part) or ``all``."""
        n_train = int(self.meta["split"]["num_train"])
        if split == "train":
            return range(0, n_train)
        if split == "heldout":
            return range(n_train, self.num_frames)
        if split == "all":
            return range(self.num_frames)
        raise ValueError(f"unknown split {split!r}: use train, heldout or all")
