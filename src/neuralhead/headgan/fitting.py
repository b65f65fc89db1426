"""Fitting HeadGAN's face model to dense landmarks (Appendix A, Algorithm 1) and the camera.

**Camera** ``c = (scale, pitch, yaw, roll, tx, ty, tz)``: an orthographic similarity in
normalised image coordinates (our parameterisation; the paper's c has 7 numbers too,
Sec. 3.4). A model point ``v`` goes to ``X = scale * R v + t`` with
``R = euler_to_matrix(pitch, yaw, roll)`` (:mod:`neuralhead.geometry.rotation`), then to pixels
``(x, y) = (X_xy + 1) * size / 2`` (-1 / +1 are the image's left/top and right/bottom edges,
pixel centres at ``j + 0.5``) and depth ``z = X_z * size / 2`` (larger = farther, in x's pixel
scale, like the tracker's landmarks). So ``tx, ty`` is where the model origin projects,
``scale`` is the image half-widths per model unit (the template's outer eye corners are one unit
apart) and ``tz`` only shifts depth. The same camera serves any image size.

**Fitting** (:func:`fit_frames`), per frame and batched over frames:

1. Procrustes: the least-squares similarity (Umeyama) from the current shape (the mean at
   first, as in Algorithm 1) to the landmarks, over all the model's points (the tracker's 468
   surface points: ``landmarks[:, :V]``) in x, y and z.
2. The landmarks are mapped into model space with the inverse similarity and the coefficients
   solve the bounded least squares ``min ||U p - (l' - mean)||^2`` with
   ``-bound * std <= p <= bound * std`` (or a blendshape model's hard limits). Algorithm 1 uses
   the plain pseudo-inverse; bounds are the authors' (IMPLEMENTATION_NOTES), ``bound = 3`` our
   choice. With orthonormal, mutually orthogonal bases (:func:`build_face_model`) the solution is
   the clipped projection; otherwise accelerated projected gradient (FISTA), batched.
3. Steps 1-2 repeat ``iterations`` times with the fitted shape in place of the mean (our
   addition: the expression no longer biases the rotation), and the camera is the final
   Procrustes similarity, so rendering the fitted parameters reproduces the landmarks up to
   what the model cannot express (:attr:`FitResult.residual`).

With ``share_identity`` one identity is fitted to the whole clip (from the mean of its
model-space landmarks) and only expression and camera vary per frame: the reference and
driving faces of one person then share their geometry.

**Reenactment** (Sec. 3.1): :func:`driving_shape` is Eq. 1 with the source's identity and the
driver's expression; :func:`adapt_camera` moves the driver's camera to the reference image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from neuralhead.errors import InputError
from neuralhead.geometry.rotation import euler_to_matrix, matrix_to_euler, similarity_transform
from neuralhead.headgan.face_model import MorphableModel

CAMERA_DIM = 7


@dataclass
class FitResult:
    """Per-frame fit: coefficients, cameras and the RMS landmark error in pixels."""

    identity: torch.Tensor  # (N, K_id)
    expression: torch.Tensor  # (N, K_exp)
    camera: torch.Tensor  # (N, 7) (scale, pitch, yaw, roll, tx, ty, tz)
    residual: torch.Tensor  # (N,) RMS 3D distance, pixels, between landmarks and fitted points


def _check_size(image_size: int) -> float:
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, (int, np.integer))
        or image_size <= 0
    ):
        raise InputError(f"image_size must be a positive int (square images), got {image_size!r}")
    return image_size / 2.0


def _camera_batch(camera: torch.Tensor | np.ndarray) -> torch.Tensor:
    camera = torch.as_tensor(camera)
    if camera.dim() == 1:
        camera = camera[None]
    if camera.dim() != 2 or camera.shape[1] != CAMERA_DIM:
        raise InputError(f"camera must have shape (B, 7) or (7,), got {tuple(camera.shape)}")
    return camera


def camera_from_similarity(
    scale: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor
) -> torch.Tensor:
    """Cameras ``(N, 7)`` from a similarity in normalised image coordinates."""
    return torch.cat([scale[:, None], matrix_to_euler(rotation), translation], dim=1)


def project(
    vertices: torch.Tensor | np.ndarray, camera: torch.Tensor | np.ndarray, image_size: int
) -> torch.Tensor:
    """Model-space vertices ``(B, V, 3)`` (or ``(V, 3)``) to pixels ``(B, V, 3)``: x, y, depth."""
    half = _check_size(image_size)
    vertices = torch.as_tensor(vertices)
    if vertices.dim() == 2:
        vertices = vertices[None]
    if vertices.dim() != 3 or vertices.shape[-1] != 3:
        raise InputError(f"vertices must have shape (B, V, 3), got {tuple(vertices.shape)}")
    camera = _camera_batch(camera).to(vertices)
    if camera.shape[0] not in (1, vertices.shape[0]) and vertices.shape[0] != 1:
        raise InputError(f"{camera.shape[0]} cameras for {vertices.shape[0]} shapes")
    rot = euler_to_matrix(camera[:, 1:4])
    points = camera[:, None, :1] * vertices @ rot.transpose(-1, -2) + camera[:, None, 4:]
    offset = points.new_tensor([1.0, 1.0, 0.0])
    return (points + offset) * half


def _unproject(landmarks_px: torch.Tensor, half: float) -> torch.Tensor:
    return landmarks_px / half - landmarks_px.new_tensor([1.0, 1.0, 0.0])


def bounded_least_squares(
    gram: torch.Tensor,
    rhs: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    *,
    max_iter: int = 2000,
    tol: float = 1e-10,
) -> torch.Tensor:
    """Batched ``min_p 1/2 p^T G p - b^T p`` subject to ``lower <= p <= upper`` (FISTA).

    ``gram`` ``(K, K)`` = ``U^T U``, ``rhs`` ``(N, K)`` = ``U^T d`` per problem. Starts from the
    box-projected zero; with ``G = I`` the first step is exact (the clipped projection).
    """
    if gram.shape[0] == 0:
        return rhs.new_zeros(rhs.shape)
    lipschitz = float(torch.linalg.eigvalsh(gram).max().clamp_min(1e-12))
    x = torch.zeros_like(rhs).clamp(lower, upper)
    y, t = x, 1.0
    for _ in range(max_iter):
        x_next = (y - (y @ gram - rhs) / lipschitz).clamp(lower, upper)
        change = float((x_next - x).abs().max())
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = x_next + ((t - 1.0) / t_next) * (x_next - x)
        x, t = x_next, t_next
        if change <= tol:
            break
    return x


def fit_frames(
    model: MorphableModel,
    landmarks: torch.Tensor | np.ndarray,
    image_size: int,
    *,
    bound: float = 3.0,
    share_identity: bool = False,
    iterations: int = 3,
    weights: torch.Tensor | np.ndarray | None = None,
) -> FitResult:
    """Fit identity, expression and camera to landmarks ``(N, P >= V, 3)`` in pixels.

    The first ``V`` landmarks correspond to the model's vertices (the tracker's 468 surface
    points for the models of :mod:`neuralhead.headgan.face_model`; iris points are ignored).
    ``weights`` ``(V,)`` optionally weight the points in the Procrustes step. See the module
    docstring for the algorithm. Runs in float64 on the model's device; memory grows with N
    (about 12 KB per frame), so fit long videos in chunks (frames are independent, except that
    ``share_identity`` shares one identity within a call).
    """
    half = _check_size(image_size)
    if iterations < 1:
        raise InputError(f"iterations must be >= 1, got {iterations}")
    landmarks = torch.as_tensor(landmarks)
    v = model.num_vertices
    if (
        landmarks.dim() != 3
        or landmarks.shape[-1] != 3
        or landmarks.shape[1] < v
        or landmarks.shape[0] == 0
    ):
        raise InputError(
            f"landmarks must have shape (N, P, 3) with N >= 1 and P >= {v}, got {tuple(landmarks.shape)}"
        )
    if not bool(torch.isfinite(landmarks).all()):
        raise InputError("landmarks hold NaN or infinite values")
    device, dtype = model.mean.device, torch.float64
    target = _unproject(landmarks[:, :v].to(device, dtype), half)
    n = target.shape[0]
    if weights is not None:
        weights = torch.as_tensor(weights, device=device, dtype=dtype)
        if weights.shape != (v,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise InputError(f"weights must be ({v},) non-negative with a positive sum")
        weights = weights.expand(n, v)

    mean = model.mean.to(dtype)
    k_id = model.num_identity
    basis = torch.cat([model.identity_basis, model.expression_basis]).to(dtype)
    basis = basis.reshape(-1, 3 * v)  # (K, 3V), identity rows first
    gram = basis @ basis.T
    lower, upper = (b.to(dtype) for b in model.coefficient_bounds(bound))

    shape = mean.expand(n, v, 3)
    coefficients = target.new_zeros(n, basis.shape[0])
    for _ in range(iterations):
        scale, rot, trans = similarity_transform(shape, target, weights)
        aligned = (target - trans[:, None]) @ rot / scale[:, None, None]
        deviation = (aligned - mean).reshape(n, 3 * v)
        if share_identity:
            joint = bounded_least_squares(
                gram, deviation.mean(0, keepdim=True) @ basis.T, lower, upper
            )
            identity = joint[:, :k_id]
            rest = deviation - identity @ basis[:k_id]
            expression = bounded_least_squares(
                gram[k_id:, k_id:], rest @ basis[k_id:].T, lower[k_id:], upper[k_id:]
            )
            coefficients = torch.cat([identity.expand(n, k_id), expression], 1)
        else:
            coefficients = bounded_least_squares(gram, deviation @ basis.T, lower, upper)
        shape = mean + (coefficients @ basis).reshape(n, v, 3)
    scale, rot, trans = similarity_transform(shape, target, weights)
    camera = camera_from_similarity(scale, rot, trans)
    fitted = project(shape, camera, image_size)
    residual = (fitted - landmarks[:, :v].to(device, dtype)).pow(2).sum(-1).mean(-1).sqrt()
    return FitResult(
        identity=coefficients[:, :k_id].float(),
        expression=coefficients[:, k_id:].float(),
        camera=camera.float(),
        residual=residual.float(),
    )


def driving_shape(
    model: MorphableModel,
    source_identity: torch.Tensor | np.ndarray,
    driver_expression: torch.Tensor | np.ndarray,
) -> torch.Tensor:
    """Eq. 1 for reenactment: the source's identity with the driver's expressions, ``(T, V, 3)``.

    ``source_identity`` is ``(K_id,)`` (or ``(1, K_id)``), ``driver_expression`` ``(T, K_exp)``.
    """
    identity = torch.as_tensor(source_identity)
    if identity.dim() == 2 and identity.shape[0] == 1:
        identity = identity[0]
    if identity.dim() != 1:
        raise InputError(f"source_identity must have shape (K_id,), got {tuple(identity.shape)}")
    return model.shape(identity, driver_expression)


def adapt_camera(
    driver_cameras: torch.Tensor | np.ndarray,
    reference_camera: torch.Tensor | np.ndarray,
    *,
    relative: bool = False,
    momentum: float = 0.95,
) -> torch.Tensor:
    """The driver's cameras ``(T, 7)`` moved onto the reference image's face, ``(T, 7)``.

    In the authors' code the driver's camera scale and translation are adapted to the reference
    with a moving average (IMPLEMENTATION_NOTES; the paper's Sec. 3.1 only says the driver's
    camera is used); the exact rule is ours:

    * ``m_s[t], m_t[t]``: exponential moving averages of the driver's log-scale and translation,
      ``m[t] = momentum * m[t-1] + (1 - momentum) * value[t]``, starting at frame 0's values
      (causal: frame t needs only frames <= t, so it streams).
    * ``scale[t] = ref_scale * exp(log s[t] - m_s[t])``: the driver's size changes relative to
      its running average, around the reference's size.
    * ``t[t] = ref_t + (t_driver[t] - m_t[t]) * ref_scale / exp(m_s[t])``: the driver's
      movement relative to its running average, rescaled by the ratio of the faces' sizes,
      around the reference's position (``tz`` likewise).
    * rotation: the driver's absolute angles (``relative=False``: reenactment transfers the head
      pose, Sec. 4.2), or its rotation since its first frame applied to the reference's,
      ``R[t] = R_d[t] R_d[0]^T R_ref`` (``relative=True``).

    Frame 0 lands exactly on the reference's scale and position. ``momentum = 1`` keeps the
    driver's motion relative to its first frame; ``momentum = 0`` pins the face to the
    reference; in between (0.95 by default, about 20 frames, our choice) slow drifts of the
    driver are removed and quick moves kept.
    """
    if not 0.0 <= momentum <= 1.0:
        raise InputError(f"momentum must be in [0, 1], got {momentum}")
    driver = _camera_batch(driver_cameras)
    device = driver.device
    # A sequential filter over a few numbers per frame: done on the CPU.
    driver = driver.to("cpu", torch.float64)
    reference = _camera_batch(reference_camera).to("cpu", torch.float64)
    if reference.shape[0] != 1 or driver.shape[0] == 0:
        raise InputError(
            "adapt_camera needs one reference camera (7,) and at least one driver frame"
        )
    if bool((driver[:, 0] <= 0).any()) or float(reference[0, 0]) <= 0:
        raise InputError("camera scales must be positive")
    log_scale = driver[:, 0].log().numpy()
    translation = driver[:, 4:].numpy()
    avg_scale = np.empty_like(log_scale)
    avg_translation = np.empty_like(translation)
    avg_scale[0], avg_translation[0] = log_scale[0], translation[0]
    for t in range(1, len(driver)):
        avg_scale[t] = momentum * avg_scale[t - 1] + (1.0 - momentum) * log_scale[t]
        avg_translation[t] = momentum * avg_translation[t - 1] + (1.0 - momentum) * translation[t]
    ref_scale = float(reference[0, 0])
    ratio = ref_scale / np.exp(avg_scale)
    out = driver.clone()
    out[:, 0] = torch.from_numpy(ref_scale * np.exp(log_scale - avg_scale))
    out[:, 4:] = reference[:, 4:] + torch.from_numpy(
        (translation - avg_translation) * ratio[:, None]
    )
    if relative:
        rot = euler_to_matrix(driver[:, 1:4])
        rot = rot @ rot[:1].transpose(-1, -2) @ euler_to_matrix(reference[:, 1:4])
        out[:, 1:4] = matrix_to_euler(rot)
    return out.to(device, torch.float32)
