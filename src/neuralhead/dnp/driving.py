"""Driving a portrait: turning tracked motion or speech into the portrait's parameters.

* **Self-reenactment** (``motion="absolute"``): the driver is the same person, tracked the
  same way, so its pose and gaze are used as they are and its template-space landmarks are
  projected on the portrait's expression basis.
* **Cross-reenactment** (``motion="relative"``): another person drives. What transfers is the
  driver's *change* relative to its own reference frame, applied to the portrait's reference
  frame (DNP Sec. 4.1, "Reenactment"):

  - rotation: ``R = (R_d R_d,ref^T) R_t,ref``;
  - translation: the driver's image-plane displacement measured in units of its face size,
    re-expressed in the portrait's face size; ``tz`` (log face scale) by its difference;
  - expression: the driver's landmark deformation from its reference frame, in template space
    where both faces share one scale, projected on the portrait's basis
    (:meth:`ExpressionBasis.project_deformation`) and added to the reference coefficients;
  - gaze: the change of the driver's eye angles added to the reference gaze.

  Values are then limited to the range seen in training (``limit=True``), because the MLP
  does not extrapolate well beyond the poses and expressions of its video (Sec. 5).
* **Audio**: windows of speech features (Sec. 3.3); head pose and gaze, which speech does not
  determine, are replayed from the portrait's own training frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from neuralhead.dnp.portrait import PortraitData
from neuralhead.errors import InputError
from neuralhead.geometry.rotation import euler_to_matrix, matrix_to_euler

# Margin, in training standard deviations, allowed beyond the training range when limiting.
_LIMIT_MARGIN = 0.25


@dataclass
class DrivingParameters:
    """Per-frame inputs of the portrait, in its own parameter space."""

    pose: np.ndarray  # (T, 6)
    gaze: np.ndarray  # (T, 2)
    expression: np.ndarray  # (T, K)
    audio: np.ndarray | None = None  # (T, 2u, w, D) for audio-driven portraits

    def __len__(self) -> int:
        return len(self.pose)

    def tensors(self, rows: slice, device: torch.device | str) -> dict[str, torch.Tensor]:
        out = {
            "pose": torch.from_numpy(np.ascontiguousarray(self.pose[rows])).float(),
            "gaze": torch.from_numpy(np.ascontiguousarray(self.gaze[rows])).float(),
            "expression": torch.from_numpy(np.ascontiguousarray(self.expression[rows])).float(),
        }
        if self.audio is not None:
            out["audio"] = torch.from_numpy(np.ascontiguousarray(self.audio[rows])).float()
        return {k: v.to(device) for k, v in out.items()}


def absolute_motion(
    portrait: PortraitData, pose: np.ndarray, gaze: np.ndarray, canonical: np.ndarray
) -> DrivingParameters:
    """The driver's own values (same person): pose and gaze as tracked, expression projected."""
    return DrivingParameters(
        pose=np.asarray(pose, np.float32),
        gaze=np.asarray(gaze, np.float32),
        expression=portrait.basis.project(canonical).astype(np.float32),
    )


def relative_motion(
    portrait: PortraitData,
    pose: np.ndarray,
    gaze: np.ndarray,
    canonical: np.ndarray,
    reference: int = 0,
    limit: bool = True,
) -> DrivingParameters:
    """Map a driver's changes from its frame ``reference`` onto the portrait (see module doc)."""
    pose = np.asarray(pose, np.float64)
    if not 0 <= reference < len(pose):
        raise InputError(f"driver reference frame {reference} is outside the clip (0..{len(pose) - 1})")
    ref_t = portrait.reference
    t_pose = portrait.pose[ref_t].astype(np.float64)

    rot_d = euler_to_matrix(torch.from_numpy(pose[:, :3]))
    rot_d_ref = rot_d[reference]
    rot_t_ref = euler_to_matrix(torch.from_numpy(t_pose[:3]))
    rot = rot_d @ rot_d_ref.T @ rot_t_ref
    angles = matrix_to_euler(rot).numpy()

    # Image-plane motion in face-size units: exp(tz) is the face scale relative to the frame.
    face_d, face_t = np.exp(pose[reference, 5]), np.exp(t_pose[5])
    txy = t_pose[3:5] + (pose[:, 3:5] - pose[reference, 3:5]) * (face_t / face_d)
    tz = t_pose[5] + (pose[:, 5] - pose[reference, 5])
    new_pose = np.concatenate([angles, txy, tz[:, None]], axis=1)

    deformation = np.asarray(canonical) - np.asarray(canonical)[reference]
    expression = portrait.expression[ref_t] + portrait.basis.project_deformation(deformation)
    new_gaze = portrait.gaze[ref_t] + (np.asarray(gaze) - np.asarray(gaze)[reference])

    params = DrivingParameters(
        pose=new_pose.astype(np.float32),
        gaze=new_gaze.astype(np.float32),
        expression=expression.astype(np.float32),
    )
    return limit_to_training_range(portrait, params) if limit else params


def limit_to_training_range(portrait: PortraitData, params: DrivingParameters) -> DrivingParameters:
    """Clip every parameter to the training range widened by a quarter standard deviation."""

    def clip(values: np.ndarray, train: np.ndarray) -> np.ndarray:
        margin = _LIMIT_MARGIN * train.std(0)
        return np.clip(values, train.min(0) - margin, train.max(0) + margin).astype(np.float32)

    return DrivingParameters(
        pose=clip(params.pose, portrait.pose),
        gaze=clip(params.gaze, portrait.gaze),
        expression=clip(params.expression, portrait.expression),
        audio=params.audio,
    )


def replayed_motion(portrait: PortraitData, num_frames: int) -> DrivingParameters:
    """Pose, gaze and expression of the training frames, played forwards then backwards.

    Used where the driver gives no head motion (audio alone): the portrait moves as it did in
    its own video, starting at its reference frame. The back-and-forth keeps it continuous.
    """
    m = len(portrait.frames)
    cycle = np.concatenate([np.arange(m), np.arange(m - 2, 0, -1)]) if m > 2 else np.arange(m)
    rows = cycle[(np.arange(num_frames) + portrait.reference) % len(cycle)]
    return DrivingParameters(
        pose=portrait.pose[rows].astype(np.float32),
        gaze=portrait.gaze[rows].astype(np.float32),
        expression=portrait.expression[rows].astype(np.float32),
    )


def audio_context(windows: np.ndarray, frames: int = 8) -> np.ndarray:
    """``(T, w, D)`` per-frame windows → ``(T, 2u, w, D)`` windows of frames i-u+1 .. i+u."""
    u = frames // 2
    offsets = np.arange(-u + 1, u + 1)
    idx = np.clip(np.arange(len(windows))[:, None] + offsets[None], 0, len(windows) - 1)
    return windows[idx]
