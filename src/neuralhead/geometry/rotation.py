"""Rotations and similarity transforms.

Conventions used throughout neuralhead (camera coordinates, as in OpenCV and in
mediapipe's landmark output): x points to the image's right, y down, z away from
the camera; a face looking at the camera faces -z.

Euler angles are ``(pitch, yaw, roll)`` in radians, composed as
``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``, applied to a frontal face: pitch is a nod about
x (positive turns the face downwards), yaw a turn about the vertical y axis (positive turns
the face towards the image's left, the subject's right), roll a tilt in the image plane
(positive is clockwise on screen).

Networks that predict a rotation use the continuous 6D representation of Zhou et al. (2019)
instead: the first two *columns* of the matrix, mapped back to a rotation by Gram–Schmidt
(:func:`rotation_6d_to_matrix`, EMOPortraits supplementary Sec. 3.1, Eq. 3-4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neuralhead.errors import InputError


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
        [
            rel[..., 2, 1] - rel[..., 1, 2],
            rel[..., 0, 2] - rel[..., 2, 0],
            rel[..., 1, 0] - rel[..., 0, 1],
        ],
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


def _check_trailing_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tensor.dim() < len(shape) or tuple(tensor.shape[-len(shape) :]) != shape:
        expected = ", ".join(["..."] + [str(n) for n in shape])
        raise InputError(f"{name} must have shape ({expected}), got {tuple(tensor.shape)}")


def rotation_6d_to_matrix(rotation_6d: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` from the 6D representation ``(..., 6)``.

    EMOPortraits supplementary Sec. 3.1, Eq. 3-4 (after Zhou et al., 2019): the network
    outputs a 3x2 matrix whose *columns* are ``a1 = x[..., 0:3]`` and ``a2 = x[..., 3:6]``;
    the Gram–Schmidt map f_GS gives the columns of the rotation,

        b1 = N(a1),   b2 = N(a2 - (b1 · a2) b1),   b3 = b1 × b2,

    with N the normalisation to unit length. So ``b1 = R e_x`` and ``b2 = R e_y``: the first
    two columns of the result, the images of the x and y axes. (pytorch3d's
    ``rotation_6d_to_matrix`` takes rows instead and so returns the transpose of ours.)

    Any input in which ``a1`` and ``a2`` are non-zero and not parallel gives a proper rotation
    (orthonormal, det = +1); ``eps`` only guards the division for degenerate input.
    """
    _check_trailing_shape("rotation_6d", rotation_6d, (6,))
    a1, a2 = rotation_6d[..., :3], rotation_6d[..., 3:]
    b1 = F.normalize(a1, dim=-1, eps=eps)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1, eps=eps)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_rotation_6d(matrix: torch.Tensor) -> torch.Tensor:
    """The 6D representation ``(..., 6)`` of rotation matrices ``(..., 3, 3)``.

    The first two columns, concatenated (the convention of :func:`rotation_6d_to_matrix`, of
    which this is the exact inverse on rotation matrices).
    """
    _check_trailing_shape("matrix", matrix, (3, 3))
    return torch.cat([matrix[..., :, 0], matrix[..., :, 1]], dim=-1)


def euler_to_rotation_6d(angles: torch.Tensor) -> torch.Tensor:
    """6D representation ``(..., 6)`` from Euler angles ``(..., 3)`` = (pitch, yaw, roll)."""
    _check_trailing_shape("angles", angles, (3,))
    return matrix_to_rotation_6d(euler_to_matrix(angles))


def rotation_6d_to_euler(rotation_6d: torch.Tensor) -> torch.Tensor:
    """Euler angles ``(..., 3)`` = (pitch, yaw, roll) from the 6D representation ``(..., 6)``.

    Goes through :func:`rotation_6d_to_matrix`, so it accepts unnormalised network output;
    the gimbal-lock rule of :func:`matrix_to_euler` applies.
    """
    return matrix_to_euler(rotation_6d_to_matrix(rotation_6d))
