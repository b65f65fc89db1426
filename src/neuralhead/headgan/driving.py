"""HeadGAN's driving parameters from a video (Sec. 3.1, Eq. 1).

The face model is fitted to every frame of the driving video ``y_1:T`` (App. A;
:func:`neuralhead.headgan.fitting.fit_frames` on the tracker's dense landmarks), giving an
identity, an expression ``p_exp_t`` and a camera ``c_t`` per frame. Reenactment keeps the
source's identity and takes the driver's expression (Eq. 1,
:func:`neuralhead.headgan.fitting.driving_shape`, applied by the reenactor), and moves the
driver's camera onto the reference image (:func:`neuralhead.headgan.fitting.adapt_camera`:
scale and translation relative to a moving average of the driver's; rotation absolute or
relative to the driver's first frame).

**Streaming.** :func:`track_video` decodes the video once; it keeps a chunk of landmarks
(``chunk_frames`` frames) for the batched fit and, per frame, only the fitted numbers and the
face's centre and size (a few hundred bytes), never the frames. Frames without a face take
values interpolated from their neighbours, as ``neuralhead prepare`` does.

**Canvas coordinates** (our choice). Frames are fitted in their own pixel frame, seen as a
square canvas of side ``C = max(W, H)`` sharing the frame's top-left corner, so a camera says
where the face is in the whole frame, independently of any crop. :func:`camera_to_crop`
re-expresses it for a square crop box ``(x0, y0, side)`` of the frame: with ``k = C / side``,
``scale' = k scale``, ``tx' = k tx + (C - 2 x0) / side - 1``,
``ty' = k ty + (C - 2 y0) / side - 1``, ``tz' = k tz`` and the angles unchanged. Fitting is invariant to that change (a similarity of
the landmarks), so this is what fitting the crop's landmarks would give.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from neuralhead.errors import InputError, NoFaceError
from neuralhead.headgan.face_model import MorphableModel
from neuralhead.headgan.fitting import CAMERA_DIM, adapt_camera, fit_frames
from neuralhead.inference.common import interpolate_missing
from neuralhead.media.video import VideoReader, probe_video
from neuralhead.tracking import crop as crops
from neuralhead.tracking.mediapipe_backend import FaceMeshTracker

CAMERA_MODES = ("relative", "absolute")

#: Weight of the past in the moving average of the driver's camera scale and translation
#: (:func:`~neuralhead.headgan.fitting.adapt_camera`; about 20 frames, our choice).
DEFAULT_MOMENTUM = 0.95


@dataclass
class TrackedVideo:
    """The face model fitted to every frame of a video, in canvas coordinates.

    Attributes:
        fps, width, height: the video's frame rate and frame size.
        identity: ``(N, K_id)`` per-frame identity coefficients.
        expression: ``(N, K_exp)`` per-frame expression coefficients.
        camera: ``(N, 7)`` cameras ``(scale, pitch, yaw, roll, tx, ty, tz)`` in the canvas of
            side :attr:`canvas_size` (module docstring).
        centre: ``(N, 2)`` face centre in pixels and ``size``: ``(N,)`` face size in pixels
            (:func:`neuralhead.tracking.crop.face_centres_and_sizes`), for crop boxes.
        valid: ``(N,)`` whether the tracker found a face (others are interpolated).
    """

    fps: float
    width: int
    height: int
    identity: np.ndarray
    expression: np.ndarray
    camera: np.ndarray
    centre: np.ndarray
    size: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.camera)

    @property
    def canvas_size(self) -> int:
        return max(self.width, self.height)

    def crop_boxes(
        self, mode: str = "track", scale: float = crops.DEFAULT_CROP_SCALE
    ) -> np.ndarray:
        """Crop boxes ``(N, 3)`` around the face: ``"track"`` follows it, ``"fixed"`` is one box."""
        if mode == "track":
            return crops.tracked_boxes(self.centre, self.size, self.fps, scale)
        if mode == "fixed":
            box = crops.fixed_box(self.centre, self.size, self.width, self.height, scale)
            return np.repeat(box[None], len(self), axis=0)
        raise InputError(f"crop mode must be 'track' or 'fixed', got {mode!r}")


def camera_to_crop(camera: np.ndarray, box: np.ndarray, canvas_size: int) -> np.ndarray:
    """Canvas cameras ``(N, 7)`` re-expressed in square crop boxes ``(3,)`` or ``(N, 3)``.

    The formula is in the module docstring; the result does not depend on the crop's size in
    pixels, since cameras are in normalised image coordinates.
    """
    camera = np.asarray(camera, np.float64)
    box = np.asarray(box, np.float64)
    if camera.ndim != 2 or camera.shape[1] != CAMERA_DIM:
        raise InputError(f"camera must have shape (N, 7), got {camera.shape}")
    if box.shape not in ((3,), (len(camera), 3)):
        raise InputError(f"box must be (x0, y0, side) or one per frame, got shape {box.shape}")
    box = np.broadcast_to(box, (len(camera), 3))
    side = box[:, 2]
    if bool((side <= 0).any()):
        raise InputError("crop boxes must have a positive side")
    k = canvas_size / side
    out = camera.copy()
    out[:, 0] *= k
    out[:, 4] = k * camera[:, 4] + (canvas_size - 2.0 * box[:, 0]) / side - 1.0
    out[:, 5] = k * camera[:, 5] + (canvas_size - 2.0 * box[:, 1]) / side - 1.0
    out[:, 6] *= k
    return out


def track_video(
    video: str | os.PathLike,
    model: MorphableModel,
    *,
    max_frames: int | None = None,
    min_face_fraction: float = 0.5,
    bound: float = 3.0,
    chunk_frames: int = 64,
    progress: bool = True,
) -> TrackedVideo:
    """Track and fit every frame of ``video`` (one decoding pass; module docstring).

    Raises :class:`~neuralhead.errors.NoFaceError` when fewer than ``min_face_fraction`` of
    the frames show a face. ``bound`` is the coefficient bound of the fit, in standard
    deviations (:func:`~neuralhead.headgan.fitting.fit_frames`).
    """
    if chunk_frames < 1:
        raise InputError(f"chunk_frames must be positive, got {chunk_frames}")
    info = probe_video(video)
    name = os.path.basename(os.fspath(video))
    canvas = max(info.width, info.height)
    k_id, k_exp = model.num_identity, model.num_expression
    fitted: list[np.ndarray] = []  # (n, K_id + K_exp + 7) per chunk
    centres: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    valid: list[bool] = []
    pending: list[np.ndarray] = []

    def fit_pending() -> None:
        if not pending:
            return
        landmarks = np.stack(pending)
        fit = fit_frames(model, landmarks, canvas, bound=bound)
        fitted.append(torch.cat([fit.identity, fit.expression, fit.camera], 1).numpy())
        centre, size = crops.face_centres_and_sizes(landmarks)
        centres.append(centre)
        sizes.append(size)
        pending.clear()

    empty = np.full((k_id + k_exp + CAMERA_DIM,), np.nan, np.float32)
    total = min(info.num_frames or 0, max_frames or info.num_frames or 0) or None
    bar = tqdm(total=total, desc="tracking", unit="frame", disable=not progress)
    with bar, VideoReader(video) as reader, FaceMeshTracker() as tracker:
        for frame in reader:
            points = tracker.process(frame)
            valid.append(points is not None)
            if points is None:
                # Keep the frame order: flush the chunk, then a placeholder row.
                fit_pending()
                fitted.append(empty[None])
                centres.append(np.full((1, 2), np.nan, np.float32))
                sizes.append(np.full(1, np.nan, np.float32))
            else:
                pending.append(points)
                if len(pending) >= chunk_frames:
                    fit_pending()
            bar.update()
            if max_frames and len(valid) >= max_frames:
                break
        fit_pending()
    if not valid:
        raise InputError(f"video {name} has no frames")
    mask = np.array(valid, bool)
    found = int(mask.sum())
    if found == 0:
        raise NoFaceError(f"no face found in any of the {len(mask)} frames of {name}")
    if found < min_face_fraction * len(mask):
        raise NoFaceError(
            f"no face found in {100 * (1 - found / len(mask)):.0f}% of the frames of {name} "
            f"(at least {100 * min_face_fraction:.0f}% need one)"
        )
    values = interpolate_missing(np.concatenate(fitted).astype(np.float32), mask)
    return TrackedVideo(
        fps=info.fps,
        width=info.width,
        height=info.height,
        identity=values[:, :k_id],
        expression=values[:, k_id : k_id + k_exp],
        camera=values[:, k_id + k_exp :],
        centre=interpolate_missing(np.concatenate(centres), mask),
        size=interpolate_missing(np.concatenate(sizes), mask),
        valid=mask,
    )


@dataclass
class DrivingParameters:
    """What drives the generator frame by frame: the driver's expression and adapted camera."""

    expression: torch.Tensor  # (T, K_exp)
    camera: torch.Tensor  # (T, 7), in the reference image's crop

    def __len__(self) -> int:
        return len(self.camera)


def driving_parameters(
    expression: np.ndarray | torch.Tensor,
    camera: np.ndarray | torch.Tensor,
    reference_camera: np.ndarray | torch.Tensor,
    *,
    mode: str = "relative",
    momentum: float = DEFAULT_MOMENTUM,
) -> DrivingParameters:
    """Eq. 1's driving inputs: the driver's expressions and its cameras moved onto the reference.

    ``expression`` ``(T, K_exp)`` and ``camera`` ``(T, 7)`` are the driver's fit (any fixed
    frame of reference, e.g. :attr:`TrackedVideo.camera`), ``reference_camera`` ``(7,)`` the
    reference image's. ``mode``: ``"relative"`` applies the driver's head rotation since its
    first frame to the reference's pose (the face keeps the reference's orientation when the
    driver holds still; suits drivers that start facing the camera, as FOMM's relative mode);
    ``"absolute"`` transfers the driver's head pose as it is (Sec. 4.2). In both, scale and
    translation follow the driver's motion around the reference's position with a moving
    average of weight ``momentum`` (:func:`~neuralhead.headgan.fitting.adapt_camera`).
    """
    if mode not in CAMERA_MODES:
        raise InputError(f"camera mode must be 'relative' or 'absolute', got {mode!r}")
    expression = torch.as_tensor(np.asarray(expression), dtype=torch.float32)
    cameras = adapt_camera(
        torch.as_tensor(np.asarray(camera), dtype=torch.float32),
        torch.as_tensor(np.asarray(reference_camera), dtype=torch.float32),
        relative=mode == "relative",
        momentum=momentum,
    )
    if expression.dim() != 2 or len(expression) != len(cameras):
        raise InputError(
            f"expression must be (T, K_exp) with T = {len(cameras)}, got {tuple(expression.shape)}"
        )
    return DrivingParameters(expression=expression, camera=cameras)
