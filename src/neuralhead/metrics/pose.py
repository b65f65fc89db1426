"""Pose, gaze and expression errors between driving and generated faces.

Batched over any leading dimensions, differentiable, on the inputs' device. Axes follow
:mod:`neuralhead.geometry.rotation` (camera coordinates as in OpenCV): x points to the
image's right, y down, z away from the camera; a face looking into the camera looks
towards -z.
"""

from __future__ import annotations

import math

import torch

from neuralhead.geometry.rotation import rotation_angle


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
