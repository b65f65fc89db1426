"""Pose, expression and gaze of generated frames, measured with the project's own tracker.

DNP's Table 2 measures reenactment by re-estimating pose and expression on the output with
DECA and gaze with a learned estimator; we use the tracker that produced the training
parameters instead (mediapipe landmarks → pose fit, expression basis, iris gaze), so the
numbers say how well the output carries the parameters it was asked to show.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from neuralhead.metrics.pose import expression_distance, gaze_angle_deg, rotation_angle_deg
from neuralhead.tracking.expression import ExpressionBasis
from neuralhead.tracking.gaze import gaze_angles
from neuralhead.tracking.mediapipe_backend import FaceMeshTracker
from neuralhead.tracking.pose import fit_head_pose, pose_vector, rotation_matrices


@dataclass
class TrackedFrames:
    pose: np.ndarray  # (T, 6); rows without a face are NaN
    gaze: np.ndarray  # (T, 2)
    expression: np.ndarray  # (T, K) in the given basis
    found: np.ndarray  # (T,) bool


class SequenceTracker:
    """Tracks frames one at a time, in order (as a video), and reads their parameters."""

    def __init__(self, basis: ExpressionBasis) -> None:
        self.basis = basis
        self._tracker = FaceMeshTracker()
        self._landmarks: list[np.ndarray] = []
        self._found: list[bool] = []
        self._size = 0

    def add(self, frame: np.ndarray) -> None:
        self._size = frame.shape[0]
        points = self._tracker.process(frame)
        self._found.append(points is not None)
        self._landmarks.append(points if points is not None else np.full((478, 3), np.nan, np.float32))

    def result(self) -> TrackedFrames:
        self._tracker.close()
        found = np.array(self._found, dtype=bool)
        n, k = len(found), self.basis.num_components
        pose = np.full((n, 6), np.nan, np.float32)
        gaze = np.full((n, 2), np.nan, np.float32)
        expression = np.full((n, k), np.nan, np.float32)
        if found.any():
            marks = np.stack(self._landmarks)[found]
            fit = fit_head_pose(marks)
            canonical = fit.canonicalize(marks)
            pose[found] = pose_vector(fit, self._size)
            gaze[found] = gaze_angles(canonical)
            expression[found] = self.basis.project(canonical)
        return TrackedFrames(pose=pose, gaze=gaze, expression=expression, found=found)


def track_frames(frames: Iterable[np.ndarray], basis: ExpressionBasis) -> TrackedFrames:
    """Track a sequence of RGB uint8 frames (in order, as a video) and read its parameters."""
    tracker = SequenceTracker(basis)
    for frame in frames:
        tracker.add(frame)
    return tracker.result()


def parameter_errors(
    tracked: TrackedFrames, pose: np.ndarray, gaze: np.ndarray, expression: np.ndarray
) -> dict[str, float]:
    """Mean distances between what was tracked and what was asked for, over frames with a face.

    ``pose_deg``: geodesic angle between head rotations; ``gaze_deg``: angle between gaze
    directions; ``expression_l1``: mean absolute difference of expression coefficients;
    ``face_found``: share of frames where the tracker found a face.
    """
    ok = tracked.found
    result = {"face_found": float(ok.mean()) if len(ok) else 0.0}
    if not ok.any():
        return {**result, "pose_deg": float("nan"), "gaze_deg": float("nan"), "expression_l1": float("nan")}
    rot_a = torch.from_numpy(rotation_matrices(tracked.pose[ok]))
    rot_b = torch.from_numpy(rotation_matrices(pose[ok]))
    result["pose_deg"] = float(rotation_angle_deg(rot_a, rot_b).mean())
    result["gaze_deg"] = float(
        gaze_angle_deg(torch.from_numpy(tracked.gaze[ok]), torch.from_numpy(np.asarray(gaze[ok], np.float32))).mean()
    )
    result["expression_l1"] = float(
        expression_distance(
            torch.from_numpy(tracked.expression[ok]), torch.from_numpy(np.asarray(expression[ok], np.float32))
        ).mean()
    )
    return result


def relative_rotation_error(tracked_pose: np.ndarray, driver_pose: np.ndarray, reference: int = 0) -> float:
    """How well the output's head *motion* follows the driver's, in degrees.

    Both rotations are taken relative to their own frame ``reference``; the error is the mean
    geodesic angle between the two relative rotations over frames where a face was found.
    """
    ok = ~np.isnan(tracked_pose[:, 0])
    if not ok[reference] or ok.sum() < 2:
        return float("nan")
    out = rotation_matrices(tracked_pose)
    drv = rotation_matrices(driver_pose)
    rel_out = out @ out[reference].T
    rel_drv = drv @ drv[reference].T
    err = rotation_angle_deg(torch.from_numpy(rel_out[ok]), torch.from_numpy(rel_drv[ok]))
    return float(err.mean())
