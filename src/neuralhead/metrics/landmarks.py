"""Mouth-landmark errors between generated and reference faces.

Both take face-mesh landmarks ``(..., P, C)`` with ``P >= 468`` points in the topology of
:mod:`neuralhead.tracking.topology` (mediapipe's face mesh) and ``C >= 2`` coordinates, of
which only x and y are used. The mouth is the 40 points of the outer and inner lip contours
(:data:`MOUTH`).

* :func:`mouth_landmark_distance` measures where the mouth points are in the image: the
  mean Euclidean distance between corresponding points divided by the reference face's
  inter-ocular distance (outer eye corners), the "normalised mean error" of face alignment
  benchmarks (Sagonas et al., 300-W, 2016). It counts head-pose and placement errors too.
* :func:`mouth_shape_error` measures the mouth's shape alone, as EmoPortraits (Sec. 6.2)
  does, following the protocol of Gururani et al. (SPACE, 2022): landmarks frontalised,
  then normalised so that the mouth corners lie at (-1, 0) and (1, 0), and compared by mean
  absolute error (their M_P). Frontalisation is the caller's step (e.g. the tracker's
  :meth:`~neuralhead.tracking.pose.HeadPoseFit.canonicalize`); the normalisation here is a
  2-d similarity and removes only in-plane rotation, scale and position.

Both return ``(...)``, are differentiable, and work on the inputs' device.
"""

from __future__ import annotations

import torch

from neuralhead.tracking import topology as T

#: The lip contours' points, outer then inner, each once (the corners are shared).
MOUTH: tuple[int, ...] = tuple(
    dict.fromkeys(T.LIPS_OUTER_UPPER + T.LIPS_OUTER_LOWER + T.LIPS_INNER_UPPER + T.LIPS_INNER_LOWER)
)
#: Outer eye corners (subject's right, left): the inter-ocular distance of 300-W.
OUTER_EYE_CORNERS = (T.RIGHT_EYE_CORNERS[0], T.LEFT_EYE_CORNERS[0])


def _check(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target landmarks must have the same shape, got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if pred.ndim < 2 or pred.shape[-2] < T.NUM_MESH or pred.shape[-1] < 2:
        raise ValueError(
            f"expected face-mesh landmarks shaped (..., {T.NUM_MESH} or more points, 2 or 3), "
            f"got {tuple(pred.shape)}"
        )


def inter_ocular_distance(landmarks: torch.Tensor) -> torch.Tensor:
    """Distance in the image plane between the outer eye corners, ``(...)``."""
    right, left = OUTER_EYE_CORNERS
    return torch.linalg.vector_norm(landmarks[..., right, :2] - landmarks[..., left, :2], dim=-1)


def mouth_landmark_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean distance between the mouth points of ``pred`` and ``target`` in units of the
    target's inter-ocular distance (see the module docstring), ``(...)``.

    For a face 256 pixels wide the eyes' outer corners are about 100 pixels apart, so 0.01
    is about one pixel.
    """
    _check(pred, target)
    mouth = list(MOUTH)
    distance = torch.linalg.vector_norm(pred[..., mouth, :2] - target[..., mouth, :2], dim=-1)
    return distance.mean(dim=-1) / inter_ocular_distance(target)


def normalize_mouth(landmarks: torch.Tensor) -> torch.Tensor:
    """The :data:`MOUTH` points ``(..., 40, 2)`` after the 2-d similarity that puts the
    subject's right mouth corner at (-1, 0) and the left one at (1, 0) (EmoPortraits Sec. 6.2).

    As complex numbers the map is ``z -> (z - m) / h`` with ``m`` the corners' midpoint and
    ``h`` half the vector from the right to the left corner.
    """
    right, left = T.MOUTH_CORNERS
    xy = landmarks[..., :2]
    middle = 0.5 * (xy[..., right, :] + xy[..., left, :])
    half = 0.5 * (xy[..., left, :] - xy[..., right, :])
    d = xy[..., list(MOUTH), :] - middle[..., None, :]
    hx, hy = half[..., None, 0], half[..., None, 1]
    norm2 = hx * hx + hy * hy
    # (dx + i dy) / (hx + i hy) = (dx + i dy)(hx - i hy) / |h|^2
    return torch.stack(
        [(d[..., 0] * hx + d[..., 1] * hy) / norm2, (d[..., 1] * hx - d[..., 0] * hy) / norm2], -1
    )


def mouth_shape_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error between the mouth shapes of ``pred`` and ``target`` after
    :func:`normalize_mouth`, over the 40 points and both coordinates (EmoPortraits' M_P on
    frontalised landmarks), ``(...)``. The unit is half the mouth's width."""
    _check(pred, target)
    return (normalize_mouth(pred) - normalize_mouth(target)).abs().mean(dim=(-1, -2))
