"""Images for people to look at: tensors to uint8, error maps, labelled grids."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch


def to_uint8(image: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """A ``(3, H, W)`` tensor in ``value_range`` (or an HxWx3 array) → HxWx3 uint8 RGB."""
    if isinstance(image, np.ndarray):
        return image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)
    lo, hi = value_range
    x = (image.detach().float().cpu().clamp(lo, hi) - lo) / (hi - lo)
    return (x.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def error_map(prediction: np.ndarray, target: np.ndarray, max_error: float = 64.0) -> np.ndarray:
    """Per-pixel absolute error (mean over channels, 0-255 scale) as a colour map.

    Black is exact; the colour saturates at ``max_error`` grey levels.
    """
    err = np.abs(prediction.astype(np.float32) - target.astype(np.float32)).mean(-1)
    scaled = np.clip(err / max_error * 255.0, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO)[:, :, ::-1].copy()


def label(image: np.ndarray, text: str) -> np.ndarray:
    """The image with ``text`` written in its top-left corner."""
    out = np.ascontiguousarray(image.copy())
    scale = max(out.shape[1] / 512.0, 0.35)
    org = (4, int(14 * scale) + 4)
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile equally sized HxWx3 uint8 images row by row with a white gap."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img.shape[:2] != (h, w):
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = img
    return out


def comparison_sheet(
    targets: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
    titles: tuple[str, str, str] = ("ground truth", "generated", "error"),
) -> np.ndarray:
    """Rows of (ground truth | generated | error) for held-out frames."""
    rows = []
    for i, (gt, pred) in enumerate(zip(targets, predictions)):
        tag = f" {names[i]}" if names else ""
        rows.append([label(gt, titles[0] + tag), label(pred, titles[1]), label(error_map(pred, gt), titles[2])])
    return grid(rows)
