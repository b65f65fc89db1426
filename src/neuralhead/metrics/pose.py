"""Pose, gaze and expression errors between driving and generated faces.

HeadGAN's rotation metrics (Appendix E) are here too: ARD, the average L1 distance of Euler
angles between driving and generated heads, and ARE, their distance from the frontal pose.

Batched over any leading dimensions, differentiable, on the inputs' device. Axes follow
:mod:`neuralhead.geometry.rotation` (camera coordinates as in OpenCV): x points to the
image's right, y down, z away from the camera; a face looking into the camera looks
towards -z.
"""

from __future__ import annotations

import math

import torch

from neuralhead.geometry.rotation import euler_to_matrix, rotation_angle


def _same_shape(a: torch.Tensor, b: torch.Tensor, names: str, trailing: tuple[int, ...]) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if trailing and tuple(a.shape[a.ndim - len(trailing) :]) != trailing:
        expected = ", ".join(["..."] + [str(t) for t in trailing])
        raise ValueError(f"{names} must be shaped ({expected}), got {tuple(a.shape)}")


def rotation_angle_deg(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Geodesic distance in degrees between rotation matrices ``(..., 3, 3)``: the angle of
    the rotation ``r1^T r2`` (the geodesic metric in Huynh, "Metrics for 3D rotations:
    comparison and analysis", JMIV 2009).

    Computed from both the sine and the cosine of the angle (atan2), so it stays accurate
    near 0° and 180° where ``acos((trace - 1) / 2)`` loses precision. Returns ``(...)``.
    """
    _same_shape(r1, r2, "r1 and r2", (3, 3))
    return torch.rad2deg(rotation_angle(r1, r2))


def gaze_vector(gaze: torch.Tensor) -> torch.Tensor:
    """Unit gaze directions ``(..., 3)`` from ``(..., 2)`` = (yaw, pitch) in radians.

    The convention of the tracker (:mod:`neuralhead.tracking.gaze`), which uses the signs of
    head rotations: ``(0, 0)`` looks straight into the camera, towards -z; positive yaw
    looks towards the image's left (-x), positive pitch looks down (+y):
    ``(-sin y cos p, sin p, -cos y cos p)``, i.e. ``Ry(yaw) Rx(pitch)`` applied to (0, 0, -1).
    Gaze data sets differ in their signs, so convert labels before comparing.
    """
    yaw, pitch = gaze.unbind(-1)
    return torch.stack(
        [-torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch), -torch.cos(yaw) * torch.cos(pitch)],
        dim=-1,
    )


def gaze_angle_deg(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between gaze directions given as ``(..., 2)`` = (yaw, pitch) in
    radians (convention of :func:`gaze_vector`). Returns ``(...)``.

    ``atan2(|u x v|, u . v)`` rather than ``acos(u . v)``: accurate for nearly equal and
    nearly opposite directions.
    """
    _same_shape(g1, g2, "g1 and g2", (2,))
    u, v = gaze_vector(g1), gaze_vector(g2)
    sine = torch.linalg.vector_norm(torch.linalg.cross(u, v), dim=-1)
    cosine = (u * v).sum(-1)
    return torch.atan2(sine, cosine) * (180.0 / math.pi)


def expression_distance(e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference over the last dimension of expression coefficients
    ``(..., K)`` (blendshape weights, 3DMM expression parameters, ...). Returns ``(...)``.

    Only meaningful between coefficients of the same model and the same estimator.
    """
    _same_shape(e1, e2, "e1 and e2", ())
    if e1.ndim == 0:
        raise ValueError("expression coefficients must have a last dimension (..., K)")
    return (e1 - e2).abs().mean(dim=-1)


def _check_euler(e1: torch.Tensor, e2: torch.Tensor | None = None) -> None:
    if e2 is not None:
        _same_shape(e1, e2, "euler1 and euler2", (3,))
    elif e1.ndim == 0 or e1.shape[-1] != 3:
        raise ValueError(f"Euler angles must be shaped (..., 3), got {tuple(e1.shape)}")


def _wrapped_deg(radians: torch.Tensor) -> torch.Tensor:
    """Angles in degrees wrapped to ``[-180, 180)``: 179° and -179° are 2° apart, not 358°."""
    degrees = torch.rad2deg(radians)
    return torch.remainder(degrees + 180.0, 360.0) - 180.0


def ard_deg(euler1: torch.Tensor, euler2: torch.Tensor) -> torch.Tensor:
    """Per-frame term of the average rotation distance, ARD (HeadGAN, Appendix E).

    ARD is "the average L1-distance of Euler angles across all frames, in degrees" between
    the driving and the generated head poses: this function returns the L1 distance of each
    frame, ``sum_i |a_i - b_i|`` over (pitch, yaw, roll), and ARD is its mean over frames.
    Inputs are Euler angles ``(..., 3)`` in radians, convention of
    :mod:`neuralhead.geometry.rotation` (the first three entries of the tracker's pose
    vector); each difference is wrapped to ``[-180°, 180°)`` (our choice; the paper's poses
    never come near the wrap-around). Returns ``(...)`` in degrees.

    Euler-angle distances depend on the convention and are not a metric on rotations (near
    |yaw| = 90° two close rotations can have far-apart angles); :func:`pose_distance_deg`
    is the convention-free geodesic alternative.
    """
    _check_euler(euler1, euler2)
    return _wrapped_deg(euler1 - euler2).abs().sum(dim=-1)


def are_deg(euler: torch.Tensor) -> torch.Tensor:
    """Per-frame term of the average rotation error, ARE (HeadGAN, Appendix E).

    ARE measures frontalisation (HeadGAN Sec. 4.2): "the average L1-distance of Euler
    angles from the frontal pose (zero degrees)". This is :func:`ard_deg` against zero
    angles, ``(...)`` in degrees for Euler angles ``(..., 3)`` in radians; ARE is its mean
    over images. Zero angles are the tracker's frontal pose: the face looks straight into
    the camera, upright.
    """
    _check_euler(euler)
    return _wrapped_deg(euler).abs().sum(dim=-1)


def pose_distance_deg(euler1: torch.Tensor, euler2: torch.Tensor) -> torch.Tensor:
    """Geodesic angle in degrees between head rotations given as Euler angles ``(..., 3)``
    in radians (convention of :mod:`neuralhead.geometry.rotation`): the angle of the one
    rotation that turns one head pose into the other (:func:`rotation_angle_deg`).

    Unlike :func:`ard_deg` it does not depend on the Euler convention: a yaw of 10° and a
    roll of 10° are both 10° away from the frontal pose, and their combination is less than
    the 20° ARD would count. Returns ``(...)``.
    """
    _check_euler(euler1, euler2)
    return rotation_angle_deg(euler_to_matrix(euler1), euler_to_matrix(euler2))
