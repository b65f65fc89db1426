"""Eye gaze angles ``g ∈ R^2`` from the iris landmarks (DNP Sec. 3.2).

The paper regresses gaze with a learned estimator; offline we derive it geometrically. In
template space (head pose removed) each iris centre is compared with the midpoint of its
eye's two corners (which, unlike the lids, do not move when the eye closes). The offset,
divided by the eye's width and measured relative to the template's own resting offset, is
the sine of the eye's rotation on a sphere whose radius is ``EYEBALL_RADIUS`` eye widths
(about 12 mm for a 29 mm eye opening in adults; our choice). The two eyes are averaged.

``g = (yaw, pitch)`` in radians, eye-in-head, with the signs of head rotations
(:mod:`neuralhead.geometry.rotation`): positive yaw looks towards the image's left, positive
pitch looks down (the direction vector is :func:`neuralhead.metrics.pose.gaze_vector`).
"""

from __future__ import annotations

import functools

import numpy as np

from neuralhead.tracking import topology as T
from neuralhead.tracking.template import load_template

EYEBALL_RADIUS = 0.42

_EYES = (
    (T.RIGHT_IRIS_CENTER, T.RIGHT_EYE_CORNERS),
    (T.LEFT_IRIS_CENTER, T.LEFT_EYE_CORNERS),
)


def _iris_offsets(canonical: np.ndarray) -> np.ndarray:
    """(N, 2 eyes, 2) iris offsets from the eye-corner midpoint in eye widths."""
    offsets = []
    for iris, (outer, inner) in _EYES:
        corner_mid = 0.5 * (canonical[:, outer, :2] + canonical[:, inner, :2])
        width = np.linalg.norm(canonical[:, outer, :2] - canonical[:, inner, :2], axis=-1)
        offsets.append((canonical[:, iris, :2] - corner_mid) / np.maximum(width, 1e-6)[:, None])
    return np.stack(offsets, axis=1)


@functools.lru_cache(maxsize=1)
def _rest_offsets() -> np.ndarray:
    return _iris_offsets(load_template().vertices[None])[0]


def gaze_angles(canonical: np.ndarray) -> np.ndarray:
    """Gaze ``(N, 2)`` = (yaw, pitch) from template-space landmarks ``(N, 478, 3)``."""
    offsets = (_iris_offsets(np.asarray(canonical)) - _rest_offsets()).mean(axis=1)
    sines = np.clip(offsets / EYEBALL_RADIUS, -0.99, 0.99)
    yaw = np.arcsin(-sines[:, 0])
    pitch = np.arcsin(sines[:, 1])
    return np.stack([yaw, pitch], axis=1).astype(np.float32)
