"""Crops around the head that are smoothed over time and consistent across frames.

Two modes:

* ``fixed`` (default, for person-specific models such as DNP): one square box for the whole
  clip, centred on the median face position and large enough for the head's whole range of
  motion. The camera of a video portrait is static (DNP Sec. 3.1), so a fixed crop keeps the
  background and torso still and leaves head motion in the frame, where pose describes it.
* ``track`` (for one-shot models that expect a centred head): a box per frame whose centre
  and log-size follow the face through a zero-phase Gaussian filter over time, removing the
  tracker's jitter without lag.

Boxes are ``(x0, y0, side)`` in source pixels, rounded to integers so that the crop and the
landmark transform agree exactly. Parts of a box outside the frame are filled by repeating
the border pixels.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from neuralhead.tracking.topology import NUM_MESH

# Side of the crop in units of the face's size (the bounding box of the face mesh, which
# stops at the hairline): 2.0 takes in the hair, the neck and the top of the shoulders.
# Our choice; the paper's crops look similar.
DEFAULT_CROP_SCALE = 2.0
# The face mesh stops at the hairline; shifting the centre up by this fraction of the face
# size balances the margin above the head with the one below the chin.
_CENTER_SHIFT_UP = 0.12


def face_centres_and_sizes(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre ``(N, 2)`` and size ``(N,)`` of each frame's face mesh in pixels."""
    xy = np.asarray(landmarks)[:, :NUM_MESH, :2]
    lo, hi = xy.min(1), xy.max(1)
    size = (hi - lo).max(1)
    centre = 0.5 * (lo + hi)
    centre[:, 1] -= _CENTER_SHIFT_UP * size
    return centre, size


def fixed_box(
    centre: np.ndarray,
    size: np.ndarray,
    frame_width: int,
    frame_height: int,
    scale: float = DEFAULT_CROP_SCALE,
) -> np.ndarray:
    """One box ``(x0, y0, side)`` covering the head in every frame, kept inside the frame.

    ``centre`` and ``size`` are per-frame, from :func:`face_centres_and_sizes`.
    """
    mid = np.median(centre, 0)
    reach = np.abs(centre - mid).max(0).max() if len(centre) else 0.0
    side = max(scale * float(np.median(size)), 2.0 * reach + 1.2 * float(np.percentile(size, 95)))
    # Round the side before placing the box, so that rounding cannot push it past an edge.
    side = round(min(side, float(min(frame_width, frame_height))))
    x0 = float(np.clip(mid[0] - side / 2, 0, frame_width - side))
    y0 = float(np.clip(mid[1] - side / 2, 0, frame_height - side))
    return np.round([x0, y0, side]).astype(np.int64)


def tracked_boxes(
    centre: np.ndarray,
    size: np.ndarray,
    fps: float,
    scale: float = DEFAULT_CROP_SCALE,
    smoothing_s: float = 0.3,
) -> np.ndarray:
    """Boxes ``(N, 3)`` following the face, smoothed over ``smoothing_s`` seconds."""
    sigma = max(smoothing_s * fps, 1e-3)
    centre = gaussian_filter1d(centre, sigma, axis=0, mode="nearest")
    log_side = gaussian_filter1d(np.log(scale * size), sigma, mode="nearest")
    side = np.exp(log_side)
    boxes = np.stack([centre[:, 0] - side / 2, centre[:, 1] - side / 2, side], axis=1)
    return np.round(boxes).astype(np.int64)


def crop_frame(frame: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """The square ``box`` of ``frame`` resized to ``size`` x ``size``."""
    x0, y0, side = (int(v) for v in box)
    height, width = frame.shape[:2]
    pad_l, pad_t = max(0, -x0), max(0, -y0)
    pad_r, pad_b = max(0, x0 + side - width), max(0, y0 + side - height)
    if pad_l or pad_t or pad_r or pad_b:
        frame = cv2.copyMakeBorder(frame, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_REPLICATE)
    roi = frame[y0 + pad_t : y0 + pad_t + side, x0 + pad_l : x0 + pad_l + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(roi, (size, size), interpolation=interp)


def landmarks_to_crop(landmarks: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Pixel landmarks ``(..., P, 3)`` expressed in the coordinates of the resized crop.

    ``box`` is one ``(x0, y0, side)`` for all frames or one per frame ``(N, 3)``.
    """
    box = np.asarray(box, dtype=np.float32)[..., None, :]
    factor = size / box[..., 2]
    out = np.array(landmarks, dtype=np.float32, copy=True)
    out[..., 0] = (out[..., 0] - box[..., 0]) * factor
    out[..., 1] = (out[..., 1] - box[..., 1]) * factor
    out[..., 2] *= factor
    return out
