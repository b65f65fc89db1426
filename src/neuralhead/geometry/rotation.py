"""Rotations and similarity transforms.

Conventions used throughout neuralhead (camera coordinates, as in OpenCV and in
mediapipe's landmark output): x points to the image's right, y down, z away from
the camera; a face looking at the camera faces -z.

Euler angles are ``(pitch, yaw, roll)`` in radians, composed as
``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``, applied to a frontal face: pitch is a nod about
x (positive turns the face downwards), yaw a turn about the vertical y axis (positive turns
the face towards the image's left, the subject's right), roll a tilt in the image plane
(positive is clockwise on screen).
"""

from __future__ import annotations

import torch


def euler_to_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` from Euler angles ``(..., 3)`` = (pitch, yaw, roll)."""
    pitch, yaw, roll = angles.unbind(-1)
    cx, sx = torch.cos(pitch), torch.sin(pitch)
    cy, sy = torch.cos(yaw), torch.sin(yaw)
    cz, sz = torch.cos(roll), torch.sin(roll)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1)
    shape = angles.shape[:-1] + (3, 3)
    return rz.reshape(shape) @ ry.reshape(shape) @ rx.reshape(shape)


def matrix_to_euler(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`euler_to_matrix` for yaw in (-90°, 90°); returns ``(..., 3)``.

    At |yaw| = 90° (gimbal lock) pitch and roll are not separable; roll is then set to
    zero and the whole in-plane angle is given to pitch.
    """
    r20 = matrix[..., 2, 0].clamp(-1.0, 1.0)
    yaw = torch.asin(-r20)
    cos_yaw = torch.sqrt(matrix[..., 2, 1] ** 2 + matrix[..., 2, 2] ** 2)
    regular = cos_yaw > 1e-6
    pitch = torch.where(
        regular,
        torch.atan2(matrix[..., 2, 1], matrix[..., 2, 2]),
        torch.atan2(-matrix[..., 1, 2], matrix[..., 1, 1]),
    )
    roll = torch.where(
        regular, torch.atan2(matrix[..., 1, 0], matrix[..., 0, 0]), torch.zeros_like(yaw)
    )
    return torch.stack([pitch, yaw, roll], -1)


def rotation_angle(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Geodesic angle in radians between rotation matrices ``(..., 3, 3)``."""
    rel = r1.transpose(-1, -2) @ r2
    # atan2 of (|skew part|, trace part) stays accurate near 0 and 180 degrees, where acos does not.
    skew = torch.stack(
        [rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0], rel[..., 1, 0] - rel[..., 0, 1]],
        -1,
    )
    trace = rel[..., 0, 0] + rel[..., 1, 1] + rel[..., 2, 2]
    return torch.atan2(skew.norm(dim=-1), trace - 1.0)


def similarity_transform(
    source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares similarity ``target ≈ s * R @ source + t`` (Umeyama, 1991).

    ``source`` and ``target`` are ``(..., N, 3)``; optional per-point ``weights`` ``(..., N)``.
    Returns scale ``(...)``, rotation ``(..., 3, 3)`` (a proper rotation, det = +1) and
    translation ``(..., 3)``.
    """
    if weights is None:
        weights = torch.ones(source.shape[:-1], dtype=source.dtype, device=source.device)
    w = weights / weights.sum(-1, keepdim=True)
    mu_s = (w[..., None] * source).sum(-2)
    mu_t = (w[..., None] * target).sum(-2)
    xs = source - mu_s[..., None, :]
    xt = target - mu_t[..., None, :]
    cov = (w[..., None] * xt).transpose(-1, -2) @ xs
    u, sing, vh = torch.linalg.svd(cov)
    d = torch.sign(torch.det(u @ vh))
    diag = torch.ones_like(sing)
    diag[..., -1] = d
    rot = u @ torch.diag_embed(diag) @ vh
    var_s = (w * (xs**2).sum(-1)).sum(-1)
    scale = (sing * diag).sum(-1) / var_s
    trans = mu_t - scale[..., None] * (rot @ mu_s[..., None])[..., 0]
    return scale, rot, trans
