"""Head pose from dense landmarks: a similarity fit against the canonical template.

The tracker gives no head pose offline, so pose comes from the landmarks themselves: the
template's rigid points (``topology.RIGID``) are aligned to the observed ones by a weighted
least-squares similarity (Umeyama), under a weak-perspective (scaled orthographic) camera.

The pose vector ``p ∈ R^6`` of DNP (Sec. 3.1: "rotation (Euler angles) and translation") is
``(pitch, yaw, roll, tx, ty, tz)``:
  * Euler angles in radians, convention of :mod:`neuralhead.geometry.rotation`;
  * ``tx, ty``: where the template's origin (the centroid of the rigid points, between the
    eyes and the nose) projects in the frame, in normalised coordinates (-1 left/top, +1
    right/bottom);
  * ``tz = log(scale / frame size)``: under weak perspective the face's apparent size stands
    in for its depth (larger = closer to the camera).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from neuralhead.geometry.rotation import euler_to_matrix, matrix_to_euler, similarity_transform
from neuralhead.tracking.template import load_template
from neuralhead.tracking.topology import RIGID


@dataclass
class HeadPoseFit:
    """Similarity ``landmarks ≈ scale * R @ template + translation`` per frame."""

    scale: np.ndarray  # (N,)
    rotation: np.ndarray  # (N, 3, 3)
    translation: np.ndarray  # (N, 3)

    def canonicalize(self, landmarks: np.ndarray) -> np.ndarray:
        """Landmarks ``(N, P, 3)`` mapped into template space (pose and scale removed)."""
        centred = landmarks - self.translation[:, None, :]
        return np.einsum("nji,npj->npi", self.rotation, centred) / self.scale[:, None, None]


def fit_head_pose(landmarks: np.ndarray) -> HeadPoseFit:
    """Fit the template's rigid points to landmarks ``(N, 478, 3)`` in pixels."""
    template = torch.from_numpy(load_template().vertices[list(RIGID)]).double()
    target = torch.from_numpy(np.asarray(landmarks)[:, list(RIGID)]).double()
    scale, rot, trans = similarity_transform(template.expand_as(target), target)
    return HeadPoseFit(
        scale=scale.numpy().astype(np.float32),
        rotation=rot.numpy().astype(np.float32),
        translation=trans.numpy().astype(np.float32),
    )


def pose_vector(fit: HeadPoseFit, frame_size: int) -> np.ndarray:
    """The 6-d pose ``(pitch, yaw, roll, tx, ty, tz)`` of each frame, ``(N, 6)`` float32."""
    angles = matrix_to_euler(torch.from_numpy(fit.rotation).double()).numpy()
    txy = fit.translation[:, :2] / frame_size * 2.0 - 1.0
    tz = np.log(fit.scale / frame_size)
    return np.concatenate([angles, txy, tz[:, None]], axis=1).astype(np.float32)


def pose_from_vector(pose: np.ndarray, frame_size: int) -> HeadPoseFit:
    """Inverse of :func:`pose_vector` (the translation's depth component is set to zero)."""
    pose = np.asarray(pose, dtype=np.float64).reshape(-1, 6)
    rot = euler_to_matrix(torch.from_numpy(pose[:, :3])).numpy()
    txy = (pose[:, 3:5] + 1.0) / 2.0 * frame_size
    trans = np.concatenate([txy, np.zeros((len(pose), 1))], axis=1)
    scale = np.exp(pose[:, 5]) * frame_size
    return HeadPoseFit(
        scale=scale.astype(np.float32),
        rotation=rot.astype(np.float32),
        translation=trans.astype(np.float32),
    )


def rotation_matrices(pose: np.ndarray) -> np.ndarray:
    """Rotation matrices ``(N, 3, 3)`` of pose vectors ``(N, 6)``."""
    return euler_to_matrix(torch.from_numpy(np.asarray(pose, np.float64)[..., :3])).numpy()
