"""Pieces every model's inference pipeline shares: reading a source image, turning it into a
tensor, pasting a generated crop back into the full image, filling frames where the tracker
found no face, and the sound carried into an output video.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch

from neuralhead.errors import InputError
from neuralhead.media.audio import load_audio

#: Sample rate of the sound muxed into generated videos.
OUTPUT_AUDIO_RATE = 48000
#: Width of the soft border of a pasted-back crop, as a fraction of the crop's side.
PASTE_FEATHER = 0.1


def load_image(image: str | os.PathLike | np.ndarray, what: str = "image") -> np.ndarray:
    """An RGB ``uint8`` ``(H, W, 3)`` image from a file or an array (checked)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(
                f"{what} must be an RGB uint8 array of shape (H, W, 3), got {image.dtype} {image.shape}"
            )
        return np.ascontiguousarray(image)
    path = Path(image)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"cannot read {what} {path}: not an image file OpenCV can decode")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB ``uint8`` ``(H, W, 3)`` -> ``(1, 3, H, W)`` float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


class PasteBack:
    """Blends generated crops back into a full image through a feathered square mask.

    ``box`` ``(x0, y0, side)`` is where the crop was taken from ``image`` (it may reach past
    the image's edges; only the part inside is pasted). The mask is 1 inside the box and falls
    smoothly to 0 over a border of ``feather`` box sides, so the crop's edge does not show.
    """

    def __init__(self, image: np.ndarray, box: np.ndarray, *, feather: float = PASTE_FEATHER):
        x0, y0, side = (int(v) for v in box)
        height, width = image.shape[:2]
        self.image = image
        self.side = side
        self.x0, self.y0 = max(x0, 0), max(y0, 0)
        self.x1, self.y1 = min(x0 + side, width), min(y0 + side, height)
        if side <= 0 or self.x1 <= self.x0 or self.y1 <= self.y0:
            raise InputError(f"crop box {tuple(box)} does not overlap the {width}x{height} image")
        self.rows = slice(self.y0 - y0, self.y1 - y0)
        self.cols = slice(self.x0 - x0, self.x1 - x0)
        edge = np.minimum(np.arange(side) + 0.5, side - 0.5 - np.arange(side))
        ramp = np.clip(edge / max(feather * side, 1.0), 0.0, 1.0)
        ramp = ramp * ramp * (3.0 - 2.0 * ramp)
        self.mask = np.outer(ramp, ramp)[self.rows, self.cols, None].astype(np.float32)

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        interp = cv2.INTER_AREA if crop.shape[0] > self.side else cv2.INTER_LINEAR
        patch = cv2.resize(crop, (self.side, self.side), interpolation=interp)[self.rows, self.cols]
        out = self.image.copy()
        under = out[self.y0 : self.y1, self.x0 : self.x1].astype(np.float32)
        blended = self.mask * patch.astype(np.float32) + (1.0 - self.mask) * under
        out[self.y0 : self.y1, self.x0 : self.x1] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        return out


def interpolate_missing(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rows of frames without a face, linearly interpolated per column (held at the ends)."""
    if valid.all():
        return values
    frames = np.arange(len(valid))
    good = np.flatnonzero(valid)
    flat = values.reshape(len(values), -1)
    filled = np.stack([np.interp(frames, good, column[good]) for column in flat.T], axis=1)
    return filled.reshape(values.shape).astype(values.dtype)


def load_sound(path: Path | None, num_frames: int, fps: float) -> np.ndarray | None:
    """The sound of the frames (mono, :data:`OUTPUT_AUDIO_RATE`), or None."""
    if path is None:
        return None
    wave = load_audio(path, OUTPUT_AUDIO_RATE)
    return wave[: int(round(num_frames / fps * OUTPUT_AUDIO_RATE)) + 1]
