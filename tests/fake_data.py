"""A small prepared dataset written directly in the dataset format, without a tracker.

Frames show a coloured disc whose position follows the head pose (yaw, pitch), whose size
follows the first expression coefficient and whose brightness follows the gaze, on a
gradient background, so that a model can learn the mapping in a few hundred steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from neuralhead.data.format import FORMAT_NAME, FORMAT_VERSION, FRAME_PATTERN, MASK_PATTERN
from neuralhead.tracking.expression import ExpressionBasis
from neuralhead.tracking.template import load_template


def make_dataset(
    root: Path,
    num_frames: int = 40,
    size: int = 32,
    num_expression: int = 4,
    audio: bool = True,
    heldout_fraction: float = 0.1,
    seed: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "frames").mkdir()
    (root / "masks").mkdir()
    t = np.arange(num_frames) / 25.0
    pose = np.zeros((num_frames, 6), np.float32)
    pose[:, 0] = 0.15 * np.sin(2 * np.pi * 0.37 * t)
    pose[:, 1] = 0.25 * np.sin(2 * np.pi * 0.23 * t + 1.0)
    pose[:, 2] = 0.05 * np.sin(2 * np.pi * 0.11 * t)
    pose[:, 5] = -1.2
    gaze = (0.2 * rng.standard_normal((num_frames, 2))).astype(np.float32)

    template = load_template().vertices
    modes = rng.standard_normal((num_expression, *template.shape)).astype(np.float32) * 0.02
    weights = np.stack([np.sin(2 * np.pi * (0.5 + 0.3 * k) * t + k) for k in range(num_expression)], 1)
    canonical = (template[None] + np.einsum("nk,kpc->npc", weights, modes)).astype(np.float32)
    num_train = num_frames - int(round(heldout_fraction * num_frames))
    basis = ExpressionBasis.fit(canonical[:num_train], num_expression)
    basis.save(root / "expression_basis.npz")
    expression = basis.project(canonical).astype(np.float32)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(num_frames):
        cx = 0.5 - 0.8 * pose[i, 1]
        cy = 0.5 + 0.8 * pose[i, 0]
        radius = 0.22 + 0.04 * np.tanh(expression[i, 0])
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < radius**2).astype(np.float32)
        image = np.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 * np.ones_like(xx)], -1)
        colour = np.array([0.9, 0.6 + 0.3 * np.tanh(gaze[i, 0]), 0.3], np.float32)
        image = image * (1 - disc[..., None]) + colour * disc[..., None]
        cv2.imwrite(str(root / FRAME_PATTERN.format(i)), (image[:, :, ::-1] * 255).astype(np.uint8))
        cv2.imwrite(str(root / MASK_PATTERN.format(i)), (disc * 255).astype(np.uint8))

    landmarks = canonical * (size / 3) + size / 2
    np.save(root / "landmarks.npy", landmarks.astype(np.float32))
    np.save(root / "canonical.npy", canonical)
    np.save(root / "pose.npy", pose)
    np.save(root / "expression.npy", expression)
    np.save(root / "gaze.npy", gaze)
    np.save(root / "valid.npy", np.ones(num_frames, bool))
    np.save(root / "crop_boxes.npy", np.tile(np.array([0, 0, size], np.int64), (num_frames, 1)))
    audio_meta = None
    if audio:
        windows = rng.standard_normal((num_frames, 16, 29)).astype(np.float32)
        windows[:, :, 0] += 3 * weights[:, :1]  # the audio carries the first expression mode
        np.save(root / "audio_windows.npy", windows)
        audio_meta = {
            "file": "audio.wav", "sample_rate": 16000, "extractor": "logmel", "feature_dim": 29,
            "feature_rate": 50.0, "window": 16, "windows": "audio_windows.npy",
        }  # fmt: skip
        from neuralhead.media.audio import write_wav

        write_wav(root / "audio.wav", 0.1 * np.sin(np.arange(int(16000 * num_frames / 25)) * 0.05), 16000)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tracker": "synthetic",
        "source": {"path": "synthetic", "width": size, "height": size, "fps": 25.0},
        "num_frames": num_frames,
        "fps": 25.0,
        "size": size,
        "frames_written": True,
        "masks_written": True,
        "faces": {"found": num_frames, "missing": 0},
        "expression": {"num_components": num_expression, "basis": "expression_basis.npz"},
        "audio": audio_meta,
        "split": {
            "heldout_fraction": heldout_fraction,
            "num_train": num_train,
            "num_heldout": num_frames - num_train,
        },
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    return root
