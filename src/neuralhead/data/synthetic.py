"""A synthetic talking-portrait clip with known ground truth, built from one still image.

``neuralhead demo`` needs a video to train on that every install has and that nobody's
rights are attached to. This module makes one from scikit-image's public-domain astronaut
portrait (:func:`skimage.data.astronaut`): the face is tracked once, its landmark mesh is
animated along a scripted trajectory of head pose, expression and gaze
(:func:`scripted_trajectory`), and the image is warped to follow the mesh
(:class:`SyntheticPortrait`). Because the trajectory is known, models trained on the clip
can be scored against exact ground truth, and a second trajectory (another seed) gives
reenactment targets that were never seen in training.

How a frame is made, in order:

1. **Landmarks.** Each expression control is a displacement field on the source face's
   landmarks in template space (:mod:`neuralhead.tracking.template`, where the outer eye
   corners are one unit apart): the jaw rotates about a hinge in front of the ears, a smile
   pulls the mouth corners out and up and lifts the cheeks, a blink brings each upper lid
   onto the lower one, a brow raise lifts the brows, gaze moves the irises. The deformed
   shape is then rotated, scaled and translated relative to the source face's own pose and
   projected orthographically.
2. **Warp.** A backward thin-plate spline maps every output pixel to the source image. Its
   control points are the face's contours (oval, eyes, brows, lips) and an even spread of
   the other surface points, which follow the animated landmarks; two rings around the
   face, one just outside its edge and a wider one through the hair, which move with the
   head; points on the neck that follow part of the head's motion; and the frame border,
   which stays put so the background does not move.
3. **What a warp cannot show.** The mouth interior between the inner lips (the upper teeth
   of the source, carried with the upper jaw, over a dark cavity); the iris, cut out of the
   source once and pasted where the gaze puts it; and the upper eyelid, painted in skin
   colour from above the eye as it closes.

Every step is continuous in the trajectory's parameters and all masks are anti-aliased, so
smooth trajectories give temporally smooth video.

:func:`synthesize_clip` writes the clip as an mp4 (marked as synthetic media) with a
vowel-like audio track whose loudness and formants follow the mouth
(:func:`synthetic_speech`), and the trajectory beside it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import cv2
import numpy as np
import scipy.linalg
import skimage.data
import torch

from neuralhead.errors import NoFaceError
from neuralhead.geometry.rotation import euler_to_matrix
from neuralhead.media.video import VideoWriter
from neuralhead.tracking import crop as crops
from neuralhead.tracking import topology as T
from neuralhead.tracking.gaze import EYEBALL_RADIUS
from neuralhead.tracking.mediapipe_backend import FaceMeshTracker
from neuralhead.tracking.pose import fit_head_pose

EXPRESSION_NAMES = ("jaw_open", "smile", "blink_left", "blink_right", "brow_raise")
"""The expression controls of a :class:`Trajectory`, in the column order of
:meth:`Trajectory.expression`."""

AUDIO_SAMPLE_RATE = 16000
"""Sample rate of :func:`synthetic_speech` (the rate ``neuralhead prepare`` resamples to)."""

# --- Index sets of the face mesh used here (mediapipe numbering, see topology.py). -----------

# Eye opening polygons, outer corner -> along the upper lid -> inner corner -> back along the
# lower lid (the lower-lid list without its two corners, reversed).
RIGHT_EYE_OPENING = T.RIGHT_EYE_UPPER + T.RIGHT_EYE_LOWER[-2:0:-1]
LEFT_EYE_OPENING = T.LEFT_EYE_UPPER + T.LEFT_EYE_LOWER[-2:0:-1]
# The mouth opening between the inner lips, right corner -> upper lip -> left corner -> lower.
MOUTH_OPENING = T.LIPS_INNER_UPPER + T.LIPS_INNER_LOWER[-2:0:-1]
# Points that carry the upper teeth: both upper-lip contours and the base of the nose.
UPPER_JAW = T.LIPS_OUTER_UPPER + T.LIPS_INNER_UPPER[1:-1] + (2, 98, 327)
LIP_CORNERS = T.MOUTH_CORNERS + (78, 308)

# Eyes as (name, upper lid, lower lid, iris, iris centre, opening polygon); "left" is the
# subject's left, on the image's right.
_EYES = (
    ("right", T.RIGHT_EYE_UPPER, T.RIGHT_EYE_LOWER, T.RIGHT_IRIS, T.RIGHT_IRIS_CENTER,
     RIGHT_EYE_OPENING),
    ("left", T.LEFT_EYE_UPPER, T.LEFT_EYE_LOWER, T.LEFT_IRIS, T.LEFT_IRIS_CENTER,
     LEFT_EYE_OPENING),
)  # fmt: skip

# --- Expression rig, in template units (outer eye corners one unit apart). Our choices. ---
_JAW_MAX_ANGLE = 0.26  # rad: parts the lips by ~0.17 units (~1.5 cm), a wide speaking mouth
_SMILE_CORNER = np.array([0.07, -0.05, 0.03])  # mouth corner shift (x away from the midline)
_SMILE_CORNER_REACH = 0.2  # Gaussian radius of the corner pull
_SMILE_CHEEK = np.array([0.0, -0.035, -0.02])  # cheeks rise and round out
_SMILE_CHEEK_CENTRE = np.array([0.42, 0.38])
_SMILE_CHEEK_REACH = 0.14
_SMILE_LOWER_LID = -0.012  # the lower lids rise a little (a Duchenne smile narrows the eyes)
_BROW_RAISE = -0.08  # y shift of the brows at brow_raise=1 (up is -y)
_BROW_FROWN = 0.035  # y shift at brow_raise=-1: the brows come down ...
_BROW_FROWN_INWARD = 0.03  # ... and their inner ends draw together
_BROW_REACH_ABOVE = 0.1  # falloff of the brow motion into the forehead
_BROW_REACH_BELOW = 0.07  # and towards the eyes
_BROW_UPPER_LID = 0.15  # share of the brow motion the upper lids follow
_GAZE_UPPER_LID = 0.6  # share of the iris's vertical motion the middle of the upper lid follows
_GAZE_LOWER_LID = 0.3  # and of the lower lid

# --- Warp. Our choices. ---
_CONTROL_SPACING = 0.12  # template units between the extra (non-contour) control points
_EDGE_RING_MARGIN = 0.15  # a ring just outside the face oval, relative to its size
_HAIR_RING_SCALE = 1.6  # the ring carrying the hair, relative to the face oval
_NECK_POINTS = np.array([[-0.6, 1.9, 0.3], [0.0, 2.0, 0.2], [0.6, 1.9, 0.3]])
_NECK_FOLLOW = 0.35  # share of the head's motion the neck follows
_BORDER_ANCHORS_PER_SIDE = 8
_WARP_GRID_STEP = 4  # pixels between the points the spline is evaluated at (then bilinear)
# Smoothing of the spline (added to its kernel's diagonal, in squared units of the frame
# side). The face's points are followed loosely, which removes ripples where a head turn
# crowds the far side of the face together, except the contours that painted parts must
# meet (eyes, lips); the rings and the neck closely, so that an expression does not drag
# the hair and background; the frame border exactly.
_TPS_SMOOTHING_FACE = 2e-3
_TPS_SMOOTHING_FACE_PRECISE = 1e-4
_TPS_SMOOTHING_AROUND = 1e-4

# Colours painted where the source has nothing to show (RGB in [0, 1]). Our choice.
_CAVITY_COLOUR = np.array([0.30, 0.10, 0.11], np.float32)
_SCLERA_COLOUR = np.array([0.85, 0.82, 0.80], np.float32)  # when the source shows no sclera


# ---------------------------------------------------------------------------------------------
# Trajectory
# ---------------------------------------------------------------------------------------------


_TRAJECTORY_COLUMNS = {"pose": (3,), "translation": (2,), "gaze": (2,)}


@dataclass
class Trajectory:
    """Ground-truth parameters of a synthetic clip, one row per frame (float32 arrays).

    * ``pose`` ``(N, 3)``: head rotation (pitch, yaw, roll) in radians, conventions of
      :mod:`neuralhead.geometry.rotation`, *relative to the source portrait's own pose*:
      zero is the pose of the face in the source image.
    * ``translation`` ``(N, 2)``: shift of the head in the image (x right, y down) in units
      of the frame's side, so one trajectory renders alike at any resolution.
    * ``scale`` ``(N,)``: size of the head relative to the source face (1 = unchanged).
    * ``jaw_open``, ``smile``, ``blink_left``, ``blink_right`` ``(N,)`` in [0, 1] and
      ``brow_raise`` ``(N,)`` in [-1, 1] (negative is a frown): expression, where zero is the
      source portrait's own expression. Left and right are the subject's sides.
    * ``gaze`` ``(N, 2)``: (yaw, pitch) of the eyes in the head, radians, conventions of
      :mod:`neuralhead.tracking.gaze`, relative to the source portrait's gaze.
    * ``fps``: frame rate.
    """

    pose: np.ndarray
    translation: np.ndarray
    scale: np.ndarray
    jaw_open: np.ndarray
    smile: np.ndarray
    blink_left: np.ndarray
    blink_right: np.ndarray
    brow_raise: np.ndarray
    gaze: np.ndarray
    fps: float

    def __post_init__(self) -> None:
        n = len(np.asarray(self.pose))
        for f in fields(self):
            if f.name == "fps":
                continue
            value = np.asarray(getattr(self, f.name), dtype=np.float32)
            expected = (n, *_TRAJECTORY_COLUMNS.get(f.name, ()))
            if value.shape != expected:
                raise ValueError(
                    f"Trajectory.{f.name} must have shape {expected}, got {value.shape}"
                )
            setattr(self, f.name, value)
        self.fps = float(self.fps)
        if not self.fps > 0:
            raise ValueError(f"Trajectory.fps must be positive, got {self.fps}")

    def __len__(self) -> int:
        return len(self.pose)

    @classmethod
    def neutral(cls, num_frames: int, fps: float = 25.0) -> Trajectory:
        """The source portrait held still: every control at zero, scale one."""
        n = num_frames
        return cls(
            pose=np.zeros((n, 3)),
            translation=np.zeros((n, 2)),
            scale=np.ones(n),
            jaw_open=np.zeros(n),
            smile=np.zeros(n),
            blink_left=np.zeros(n),
            blink_right=np.zeros(n),
            brow_raise=np.zeros(n),
            gaze=np.zeros((n, 2)),
            fps=fps,
        )

    def expression(self) -> np.ndarray:
        """The expression controls as ``(N, 5)``, columns in :data:`EXPRESSION_NAMES` order."""
        return np.stack([getattr(self, name) for name in EXPRESSION_NAMES], axis=1)

    def save(self, path: str | Path) -> None:
        """Write the trajectory to an ``.npz`` file (no pickled objects)."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fps"}
        np.savez(path, fps=np.float64(self.fps), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Trajectory:
        with np.load(path, allow_pickle=False) as data:
            arrays = {f.name: data[f.name] for f in fields(cls) if f.name != "fps"}
            return cls(**arrays, fps=float(data["fps"]))


def _sinusoids(rng: np.random.Generator, t: np.ndarray, freqs: tuple[float, ...]) -> np.ndarray:
    """A smooth signal in [-1, 1]: sinusoids with jittered frequencies and random phases.

    The frequencies are scaled by a random factor each, which makes them incommensurate and
    the combinations of different seeds different. Weights fall with frequency (slow motion
    is larger) and sum to one, so the bound is reached only when all peaks align.
    """
    weights = np.array([1.0 / (k + 1.5) for k in range(len(freqs))])
    weights /= weights.sum()
    out = np.zeros_like(t)
    for w, f in zip(weights, freqs):
        f = f * rng.uniform(0.8, 1.25)
        out += w * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    return out


def _ramp(t: np.ndarray, start: float, duration: float) -> np.ndarray:
    """0 before ``start``, 1 after ``start + duration``, a raised cosine in between."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip((t - start) / duration, 0.0, 1.0))


def _bump(t: np.ndarray, start: float, attack: float, hold: float, release: float) -> np.ndarray:
    """Up over ``attack`` seconds from ``start``, 1 for ``hold``, down over ``release``."""
    return np.minimum(_ramp(t, start, attack), 1.0 - _ramp(t, start + attack + hold, release))


def _speech(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Jaw opening of speech: phrases of syllables at ~4 Hz separated by pauses.

    Phrases last 1.2-3.5 s, pauses 0.3-1.0 s, syllables 0.16-0.32 s, each opening the jaw
    to a random height (our choices, in the range of conversational speech).
    """
    jaw = np.zeros_like(t)
    start = rng.uniform(0.1, 0.6)
    while start < t[-1]:
        end = start + rng.uniform(1.2, 3.5)
        syllable = start
        while syllable < end:
            length = rng.uniform(0.16, 0.32)
            peak = rng.uniform(0.25, 1.0)
            bump = _bump(t, syllable, 0.45 * length, 0.1 * length, 0.55 * length)
            jaw = np.maximum(jaw, peak * bump)
            syllable += length
        start = end + rng.uniform(0.3, 1.0)
    return jaw


def _blinks(rng: np.random.Generator, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blinks every ~3 s (gamma-distributed gaps, at least 1 s), each 150 ms long.

    A blink closes in 40 ms, stays shut 40 ms (so that at 25 fps at least one frame shows
    the eye closed) and opens in 70 ms. One blink in seven is a wink of a single eye, so
    the two eyes' controls are not copies of each other. Our choices.
    """
    left = np.zeros_like(t)
    right = np.zeros_like(t)
    start = rng.uniform(0.5, 2.5)
    while start < t[-1]:
        bump = _bump(t, start, 0.04, 0.04, 0.07)
        wink = rng.uniform() < 1 / 7
        side = rng.uniform() < 0.5
        left = np.maximum(left, bump * (0.0 if wink and side else 1.0))
        right = np.maximum(right, bump * (0.0 if wink and not side else 1.0))
        start += max(1.0, rng.gamma(4.0, 0.75))
    return left, right


def _episodes(
    rng: np.random.Generator,
    t: np.ndarray,
    duration: tuple[float, float],
    gap: tuple[float, float],
    peak: tuple[float, float],
    negative: float = 0.0,
) -> np.ndarray:
    """Expressions that come and go: smooth episodes of random length, height and spacing.

    A share ``negative`` of the episodes goes below zero (with a third of the height).
    """
    out = np.zeros_like(t)
    start = rng.uniform(0.0, gap[1])
    while start < t[-1]:
        length = rng.uniform(*duration)
        height = rng.uniform(*peak)
        if rng.uniform() < negative:
            height = -height / 3
        ramp = min(0.5, length / 3)
        bump = _bump(t, start, ramp, length - 2 * ramp, ramp)
        out = np.where(np.abs(height * bump) > np.abs(out), height * bump, out)
        start += length + rng.uniform(*gap)
    return out


def _gaze(rng: np.random.Generator, t: np.ndarray, yaw_max: float, pitch_max: float) -> np.ndarray:
    """Fixations joined by saccades, with a slow smooth-pursuit drift on top.

    Fixations last 0.3-2 s; two in five return near the camera, the others land anywhere in
    the ellipse of the given half-axes. A saccade takes 50 ms. Our choices.
    """
    drift = np.stack([_sinusoids(rng, t, (0.3, 0.7)), _sinusoids(rng, t, (0.25, 0.6))], axis=1)
    gaze = 0.1 * drift * np.array([yaw_max, pitch_max])
    target = np.zeros(2)
    start = 0.0
    while start < t[-1]:
        if rng.uniform() < 0.4:
            new = rng.normal(0.0, 0.1, size=2)
        else:
            radius, angle = np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            new = radius * np.array([np.cos(angle), np.sin(angle)])
        new = new * np.array([yaw_max, pitch_max])
        gaze += (new - target)[None, :] * _ramp(t, start, 0.05)[:, None]
        target = new
        start += rng.uniform(0.3, 2.0)
    return gaze


def scripted_trajectory(
    num_frames: int, fps: float = 25.0, seed: int = 0, amplitude: float = 1.0
) -> Trajectory:
    """A deterministic, smooth, talking-head-like trajectory of ``num_frames`` frames.

    * Head pose: sums of sinusoids (0.04-0.5 Hz) with seed-dependent frequencies and phases,
      within yaw ±20°, pitch ±12°, roll ±8°; translation within ±3 % (x) and ±2 % (y) of the
      frame; scale within ±4 %.
    * Speech: jaw opening in syllables at ~4 Hz grouped into phrases with pauses.
    * Blinks every ~3 s (150 ms each), smiles and brow raises (sometimes frowns) that come
      and go, gaze saccades between fixations with a slow drift (yaw ±20°, pitch ±12°).

    The ranges are our choice, typical of a person talking to a camera. ``amplitude``
    scales every motion and expression except the blinks (0 gives the still source portrait
    that blinks). The same ``(num_frames, fps, seed, amplitude)`` always gives the same
    trajectory; different seeds give different combinations of motion and expression.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if amplitude < 0:
        raise ValueError(f"amplitude must be non-negative, got {amplitude}")
    # One random stream per component, so that a longer clip of the same seed begins with
    # the shorter one.
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(11)]
    t = np.arange(num_frames) / fps
    a = amplitude
    pose = np.stack(
        [
            np.radians(12.0) * _sinusoids(rngs[0], t, (0.07, 0.17, 0.43)),
            np.radians(20.0) * _sinusoids(rngs[1], t, (0.05, 0.13, 0.31)),
            np.radians(8.0) * _sinusoids(rngs[2], t, (0.04, 0.11, 0.23)),
        ],
        axis=1,
    )
    translation = np.stack(
        [0.03 * _sinusoids(rngs[3], t, (0.03, 0.09)), 0.02 * _sinusoids(rngs[4], t, (0.04, 0.12))],
        axis=1,
    )
    scale = 1.0 + a * 0.04 * _sinusoids(rngs[5], t, (0.03, 0.08))
    jaw = _speech(rngs[6], t)
    blink_left, blink_right = _blinks(rngs[7], t)
    smile = _episodes(rngs[8], t, duration=(1.0, 3.5), gap=(1.0, 4.0), peak=(0.4, 1.0))
    brow = _episodes(
        rngs[9], t, duration=(0.4, 1.5), gap=(1.5, 4.0), peak=(0.4, 1.0), negative=0.25
    )
    gaze = _gaze(rngs[10], t, np.radians(20.0), np.radians(12.0))
    return Trajectory(
        pose=a * pose,
        translation=a * translation,
        scale=scale,
        jaw_open=np.clip(a * jaw, 0.0, 1.0),
        smile=np.clip(a * smile, 0.0, 1.0),
        blink_left=blink_left,
        blink_right=blink_right,
        brow_raise=np.clip(a * brow, -1.0, 1.0),
        gaze=a * gaze,
        fps=fps,
    )


# ---------------------------------------------------------------------------------------------
# Rendering helpers
# ---------------------------------------------------------------------------------------------


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _thin_plate_spline(
    centres: np.ndarray, values: np.ndarray, queries: np.ndarray, regularization: np.ndarray
) -> np.ndarray:
    """Evaluate at ``queries`` the 2-D thin-plate spline fitted to ``values`` at ``centres``.

    ``centres`` ``(K, 2)``, ``values`` ``(K, D)``, ``queries`` ``(Q, 2)``; kernel
    ``U(r) = r² log r²``, plus an affine part (Bookstein, 1989). ``regularization`` ``(K,)``
    is added to the kernel's diagonal: zero interpolates a centre exactly, larger values
    let the spline pass near it, which keeps it smooth where centres crowd together.
    """

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        d2 = np.maximum(d2, np.finfo(a.dtype).tiny)
        return d2 * np.log(d2)

    k = len(centres)
    system = np.zeros((k + 3, k + 3))
    system[:k, :k] = kernel(centres, centres) + np.diag(regularization)
    system[:k, k] = 1.0
    system[:k, k + 1 :] = centres
    system[k, :k] = 1.0
    system[k + 1 :, :k] = centres.T
    rhs = np.zeros((k + 3, values.shape[1]))
    rhs[:k] = values
    # The system is symmetric (indefinite): a symmetric solver is both right and much faster
    # than a general LU, whose multithreaded OpenBLAS path stalls on a busy machine.
    coef = scipy.linalg.solve(system, rhs, assume_a="sym")
    q = queries.astype(np.float32)
    return (
        kernel(q, centres.astype(np.float32)) @ coef[:k].astype(np.float32)
        + coef[k].astype(np.float32)
        + q @ coef[k + 1 :].astype(np.float32)
    )


def _polygon_mask(
    points: np.ndarray, shape: tuple[int, int], origin: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Anti-aliased mask in [0, 1] of a polygon in continuous pixel coordinates.

    The mask covers ``shape`` (height, width) pixels starting at pixel ``origin`` (x, y).
    """
    mask = np.zeros(shape, np.uint8)
    vertices = np.round((points[:, :2] - 0.5 - np.asarray(origin)) * 16).astype(np.int32)
    cv2.fillPoly(mask, [vertices], 255, lineType=cv2.LINE_AA, shift=4)
    return mask.astype(np.float32) / 255.0


@dataclass(frozen=True)
class _Region:
    """The rectangle ``[x0, x1) x [y0, y1)`` of the frame around a painted part.

    Painting inside it only keeps the cost of the mouth, eyes and lids independent of the
    frame size.
    """

    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def around(cls, points: np.ndarray, margin: float, size: int) -> _Region:
        lo = np.clip(np.floor(points[:, :2].min(0) - margin), 0, size).astype(int)
        hi = np.clip(np.ceil(points[:, :2].max(0) + margin), 0, size).astype(int)
        return cls(int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))

    @property
    def empty(self) -> bool:
        return self.x1 <= self.x0 or self.y1 <= self.y0

    def of(self, image: np.ndarray) -> np.ndarray:
        """The region's view of a full-frame image (writes go through to the image)."""
        return image[self.y0 : self.y1, self.x0 : self.x1]

    def polygon(self, points: np.ndarray) -> np.ndarray:
        return _polygon_mask(points, (self.y1 - self.y0, self.x1 - self.x0), (self.x0, self.y0))

    def polyline(self, points: np.ndarray, thickness: int) -> np.ndarray:
        mask = np.zeros((self.y1 - self.y0, self.x1 - self.x0), np.uint8)
        vertices = np.round((points[:, :2] - 0.5 - np.array([self.x0, self.y0])) * 16).astype(
            np.int32
        )
        cv2.polylines(mask, [vertices], False, 255, thickness, lineType=cv2.LINE_AA, shift=4)
        return mask.astype(np.float32) / 255.0

    def warp(
        self, image: np.ndarray, matrix: np.ndarray, border: int = cv2.BORDER_CONSTANT
    ) -> np.ndarray:
        """``image`` resampled in the region; ``matrix`` maps frame to image pixel centres."""
        shifted = matrix.copy()
        shifted[:, 2] += matrix[:, :2] @ np.array([self.x0, self.y0], np.float64)
        return cv2.warpAffine(image, shifted, (self.x1 - self.x0, self.y1 - self.y0),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=border)  # fmt: skip


def _sample(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``image`` at continuous pixel coordinates ``points`` ``(P, 2)``."""
    xy = (points[:, :2] - 0.5).astype(np.float32)
    out = cv2.remap(
        image, xy[:, 0:1], xy[:, 1:2], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    return out.reshape(len(points), -1)


def _affine_inverse_map(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix mapping pixel-centre ``dst`` coordinates to ``src`` (least squares)."""
    design = np.concatenate([dst[:, :2] - 0.5, np.ones((len(dst), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, src[:, :2] - 0.5, rcond=None)
    return solution.T.astype(np.float64)


def _blend(frame: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    """In place: ``frame = frame * (1 - alpha) + colour * alpha``."""
    frame += alpha[..., None] * (colour - frame)


def _farthest_points(
    points: np.ndarray, chosen: list[int], candidates: np.ndarray, spacing: float
) -> list[int]:
    """Greedily add candidates farther than ``spacing`` from every point chosen so far."""
    chosen = list(chosen)
    dist = np.min(
        np.linalg.norm(points[candidates, None, :2] - points[None, chosen, :2], axis=-1), axis=1
    )
    while len(candidates) and dist.max() > spacing:
        best = int(dist.argmax())
        chosen.append(int(candidates[best]))
        dist = np.minimum(
            dist, np.linalg.norm(points[candidates, :2] - points[candidates[best], :2], axis=-1)
        )
    return chosen


# ---------------------------------------------------------------------------------------------
# The portrait
# ---------------------------------------------------------------------------------------------


class SyntheticPortrait:
    """A face image that can be rendered with any head pose, expression and gaze.

    ``image`` is an RGB ``uint8`` portrait with one frontal-ish face (default: the astronaut
    of :func:`skimage.data.astronaut`, public domain). It is tracked once with the face mesh
    tracker and cropped to a ``size`` x ``size`` square around the face, in which the face
    mesh spans ``face_fraction`` of the side (0.4, our choice: the hair, neck and shoulders
    stay in view with room for the head to move). The crop is the neutral frame: rendering a
    :meth:`Trajectory.neutral` frame gives it back.
    """

    def __init__(
        self, image: np.ndarray | None = None, size: int = 256, face_fraction: float = 0.4
    ) -> None:
        if image is None:
            image = skimage.data.astronaut()
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
        if size < 64:
            raise ValueError(f"size must be at least 64 pixels, got {size}")
        if not 0.1 <= face_fraction <= 0.9:
            raise ValueError(f"face_fraction must be in [0.1, 0.9], got {face_fraction}")
        with FaceMeshTracker(static=True) as tracker:
            landmarks = tracker.process(image)
        if landmarks is None:
            raise NoFaceError("no face found in the portrait image")
        centre, face_size = crops.face_centres_and_sizes(landmarks[None])
        x0, y0, side = crops.fixed_box(
            centre, face_size, image.shape[1], image.shape[0], scale=1.0 / face_fraction
        )
        crop = image[y0 : y0 + side, x0 : x0 + side]
        interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
        self.size = size
        self.source = cv2.resize(crop, (size, size), interpolation=interpolation)
        self.source_landmarks = ((landmarks - np.array([x0, y0, 0.0])) * (size / side)).astype(
            np.float32
        )

        fit = fit_head_pose(self.source_landmarks[None])
        self._scale0 = float(fit.scale[0])
        self._rotation0 = fit.rotation[0].astype(np.float64)
        self._translation0 = fit.translation[0].astype(np.float64)
        self.neutral = fit.canonicalize(self.source_landmarks[None])[0].astype(np.float64)
        """The source face's landmarks in template space ``(478, 3)``: the rest shape."""

        self._init_rig()
        self._init_warp()
        self._init_appearance()

    # --- expression rig --------------------------------------------------------------------

    def _init_rig(self) -> None:
        """Per-point weights of each expression control on the rest shape (see module doc)."""
        x0 = self.neutral
        n = len(x0)
        # Jaw: hinge axis parallel to x through the widest points of the face oval, which sit
        # in front of the ears, close to the temporomandibular joints.
        self._jaw_pivot = np.array([0.0, *x0[[234, 454], 1:].mean(0)])
        upper, lower = x0[list(T.LIPS_INNER_UPPER)], x0[list(T.LIPS_INNER_LOWER)]
        order = np.argsort(upper[:, 0])
        mid_x = upper[order, 0]
        mid_y = 0.5 * (
            upper[order, 1]
            + np.interp(mid_x, np.sort(lower[:, 0]), lower[np.argsort(lower[:, 0]), 1])
        )
        corner_x = np.abs(x0[list(T.MOUTH_CORNERS), 0]).mean()
        mouth_line = np.interp(x0[:, 0], mid_x, mid_y)
        # Below the mouth line a point moves with the jaw; the split is sharp between the
        # lips and softens over the cheeks, where skin stretches between jaw and skull.
        band = 0.03 + 0.22 * np.clip((np.abs(x0[:, 0]) - corner_x) / 0.4, 0.0, 1.0)
        jaw = _smoothstep((x0[:, 1] - mouth_line + band) / (2 * band))
        jaw[list(T.JAW)] = 1.0
        jaw[list(T.LIPS_INNER_LOWER + T.LIPS_OUTER_LOWER)] = 1.0
        jaw[list(T.LIPS_INNER_UPPER + T.LIPS_OUTER_UPPER)] = 0.0
        jaw[list(LIP_CORNERS)] = 0.5
        jaw[T.NUM_MESH :] = 0.0
        self._jaw_weight = jaw

        # Smile: each mouth corner pulls its surroundings out, up and back; the cheeks rise.
        smile = np.zeros((n, 3))
        for corner in T.MOUTH_CORNERS:
            side = np.sign(x0[corner, 0])
            d2 = ((x0[:, :2] - x0[corner, :2]) ** 2).sum(-1)
            pull = np.exp(-d2 / (2 * _SMILE_CORNER_REACH**2))[:, None]
            smile += pull * (_SMILE_CORNER * np.array([side, 1.0, 1.0]))
            cheek = _SMILE_CHEEK_CENTRE * np.array([side, 1.0])
            d2 = ((x0[:, :2] - cheek) ** 2).sum(-1)
            smile += np.exp(-d2 / (2 * _SMILE_CHEEK_REACH**2))[:, None] * _SMILE_CHEEK
        for _, _, lower_lid, *_ in _EYES:
            smile[list(lower_lid[1:-1]), 1] += _SMILE_LOWER_LID
        # The outline of the face stays where it is (for the brows too): the warp moves the
        # hair and the background with it, which expressions must not do.
        smile[list(T.FACE_OVAL)] = 0.0
        smile[T.NUM_MESH :] = 0.0
        self._smile_field = smile

        # Brows: full motion on the brows, fading into the forehead above and the lids below.
        brow_weight = np.zeros(n)
        for brow in (T.RIGHT_EYEBROW, T.LEFT_EYEBROW):
            points = x0[list(brow), :2]
            same_side = np.sign(x0[:, 0]) == np.sign(points[0, 0])
            dist = np.linalg.norm(x0[:, None, :2] - points[None], axis=-1)
            nearest = dist.argmin(1)
            above = x0[:, 1] < points[nearest, 1]
            reach = np.where(above, _BROW_REACH_ABOVE, _BROW_REACH_BELOW)
            brow_weight = np.maximum(brow_weight, same_side * np.exp(-((dist.min(1) / reach) ** 2)))
        for _, upper_lid, *_ in _EYES:
            brow_weight[list(upper_lid[1:-1])] = _BROW_UPPER_LID
        brow_weight[list(T.FACE_OVAL)] = 0.0
        brow_weight[T.NUM_MESH :] = 0.0
        inner = np.exp(-(((np.abs(x0[:, 0]) - 0.15) / 0.15) ** 2))
        self._frown_field = brow_weight[:, None] * np.stack(
            [-np.sign(x0[:, 0]) * _BROW_FROWN_INWARD * inner, np.full(n, _BROW_FROWN), np.zeros(n)],
            axis=1,
        )
        self._raise_field = brow_weight[:, None] * np.array([0.0, _BROW_RAISE, 0.0])

        # Along a lid, from corner to corner: how far each point follows the eyeball.
        self._lid_profile = np.sin(np.linspace(0.0, np.pi, len(T.RIGHT_EYE_UPPER)))
        self._eye_width = {
            name: float(np.linalg.norm(x0[upper[0], :2] - x0[upper[-1], :2]))
            for name, upper, *_ in _EYES
        }

    def expression_shape(
        self,
        jaw_open: float = 0.0,
        smile: float = 0.0,
        blink_left: float = 0.0,
        blink_right: float = 0.0,
        brow_raise: float = 0.0,
        gaze: tuple[float, float] = (0.0, 0.0),
    ) -> np.ndarray:
        """The rest shape deformed by the given controls, in template space ``(478, 3)``."""
        x = self.neutral.copy()
        if jaw_open:
            angle = _JAW_MAX_ANGLE * jaw_open
            c, s = np.cos(angle), np.sin(angle)
            rel = x[:, 1:] - self._jaw_pivot[1:]
            rotated = rel @ np.array([[c, s], [-s, c]])
            x[:, 1:] += self._jaw_weight[:, None] * (rotated - rel)
        x += smile * self._smile_field
        x += (
            (brow_raise * self._raise_field)
            if brow_raise >= 0
            else (-brow_raise * self._frown_field)
        )
        for (name, upper, lower, iris, _, _), blink in zip(_EYES, (blink_right, blink_left)):
            if gaze[0] or gaze[1]:
                width = self._eye_width[name]
                shift = EYEBALL_RADIUS * width * np.array([-np.sin(gaze[0]), np.sin(gaze[1])])
                centre = x[iris[0], :2].copy()
                ring = x[list(iris), :2] - centre
                x[list(iris), :2] = (
                    centre + shift + ring * np.array([np.cos(gaze[0]), np.cos(gaze[1])])
                )
                # The lids ride on the eyeball: they follow the gaze up and down.
                x[list(upper), 1] += _GAZE_UPPER_LID * shift[1] * self._lid_profile
                x[list(lower), 1] += _GAZE_LOWER_LID * shift[1] * self._lid_profile
            if blink:
                x[list(upper)] += blink * (x[list(lower)] - x[list(upper)])
        return x

    def _head_transform(self, traj: Trajectory, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Linear part ``(3, 3)`` and offset ``(3,)`` from template space to frame i's pixels."""
        rotation = euler_to_matrix(torch.from_numpy(traj.pose[i].astype(np.float64))).numpy()
        linear = float(traj.scale[i]) * self._scale0 * rotation @ self._rotation0
        offset = self._translation0 + np.array([*traj.translation[i] * self.size, 0.0])
        return linear, offset

    def landmarks(self, traj: Trajectory, i: int) -> np.ndarray:
        """Animated landmarks ``(478, 3)`` of frame ``i``, in the tracker's pixel convention."""
        shape = self.expression_shape(
            float(traj.jaw_open[i]),
            float(traj.smile[i]),
            float(traj.blink_left[i]),
            float(traj.blink_right[i]),
            float(traj.brow_raise[i]),
            (float(traj.gaze[i, 0]), float(traj.gaze[i, 1])),
        )
        linear, offset = self._head_transform(traj, i)
        return (shape @ linear.T + offset).astype(np.float32)

    # --- warp ------------------------------------------------------------------------------

    def _init_warp(self) -> None:
        x0 = self.neutral
        contours = set(T.FACE_OVAL + T.RIGHT_EYE_UPPER + T.RIGHT_EYE_LOWER + T.LEFT_EYE_UPPER
                       + T.LEFT_EYE_LOWER + T.RIGHT_EYEBROW + T.LEFT_EYEBROW + T.LIPS_OUTER_UPPER
                       + T.LIPS_OUTER_LOWER + T.LIPS_INNER_UPPER + T.LIPS_INNER_LOWER)  # fmt: skip
        chosen = sorted(contours)
        others = np.array([i for i in range(T.NUM_MESH) if i not in contours])
        self._control = np.array(_farthest_points(x0, chosen, others, _CONTROL_SPACING))
        precise = set(RIGHT_EYE_OPENING + LEFT_EYE_OPENING + T.LIPS_OUTER_UPPER + T.LIPS_OUTER_LOWER
                      + T.LIPS_INNER_UPPER + T.LIPS_INNER_LOWER)  # fmt: skip
        self._oval = np.array(T.FACE_OVAL)
        self._oval_centre = x0[self._oval, :2].mean(0)
        self._hair_oval = np.array([i for i in T.FACE_OVAL if x0[i, 1] < self._oval_centre[1]])
        self._source_points = (
            self._head_points(x0) @ (self._scale0 * self._rotation0).T + self._translation0
        )
        self._neck_source = _NECK_POINTS @ (self._scale0 * self._rotation0).T + self._translation0

        s = self.size
        ticks = np.linspace(0.0, s, _BORDER_ANCHORS_PER_SIDE + 1)[:-1]
        self._border = np.concatenate([
            np.stack([ticks, np.zeros_like(ticks)], 1),
            np.stack([np.full_like(ticks, s), ticks], 1),
            np.stack([s - ticks, np.full_like(ticks, s)], 1),
            np.stack([np.zeros_like(ticks), s - ticks], 1),
        ])  # fmt: skip
        num_control = len(self._control)
        num_head = len(self._source_points) + len(self._neck_source)
        smoothing = np.zeros(num_head + len(self._border))
        smoothing[:num_control] = _TPS_SMOOTHING_FACE
        smoothing[:num_control][[i in precise for i in self._control]] = _TPS_SMOOTHING_FACE_PRECISE
        smoothing[num_control:num_head] = _TPS_SMOOTHING_AROUND
        self._smoothing = smoothing
        # Grid points sit at the centres of step x step cells, one cell beyond the frame on
        # every side, so that cv2.resize's bilinear upsampling (which clamps at its edges)
        # covers the whole frame; the extra cells are cropped off afterwards.
        self._grid_size = -(-s // _WARP_GRID_STEP) + 2
        centres = (np.arange(self._grid_size) - 0.5) * _WARP_GRID_STEP
        gx, gy = np.meshgrid(centres, centres)
        self._grid = np.stack([gx.ravel(), gy.ravel()], 1)

    def _head_points(self, shape: np.ndarray) -> np.ndarray:
        """Template-space points that move with the head, for a (deformed) shape.

        The mesh's control points; a ring just outside the face oval, so the edge of the face
        and what lies beside it (ears, hair, the side of the neck) move together instead of
        stretching; and a wider ring around the upper face that carries the hair. Both rings
        keep the depth of the oval points they are made from and follow the jaw.
        """
        oval = shape[self._oval]
        edge = oval.copy()
        edge[:, :2] = self._oval_centre + (1.0 + _EDGE_RING_MARGIN) * (
            oval[:, :2] - self._oval_centre
        )
        hair = shape[self._hair_oval].copy()
        hair[:, :2] = self._oval_centre + _HAIR_RING_SCALE * (hair[:, :2] - self._oval_centre)
        return np.concatenate([shape[self._control], edge, hair])

    def _warp_map(self, traj: Trajectory, i: int, shape: np.ndarray) -> np.ndarray:
        """Backward map ``(size, size, 2)``: the source pixel of every output pixel."""
        linear, offset = self._head_transform(traj, i)
        head = self._head_points(shape) @ linear.T + offset
        neck = _NECK_POINTS @ linear.T + offset
        neck = self._neck_source + _NECK_FOLLOW * (neck - self._neck_source)
        dst = np.concatenate([head[:, :2], neck[:, :2], self._border])
        src = np.concatenate([self._source_points[:, :2], self._neck_source[:, :2], self._border])
        s = float(self.size)
        mapped = _thin_plate_spline(dst / s, (src - dst) / s, self._grid / s, self._smoothing)
        g, step = self._grid_size, _WARP_GRID_STEP
        mapped = (mapped * s + self._grid - 0.5).astype(np.float32).reshape(g, g, 2)
        full = cv2.resize(mapped, (g * step, g * step), interpolation=cv2.INTER_LINEAR)
        return full[step : step + self.size, step : step + self.size]

    # --- appearance ------------------------------------------------------------------------

    def _init_appearance(self) -> None:
        """Cut the irises out of the source and measure the colours painted later."""
        src = self.source.astype(np.float32) / 255.0
        lm = self.source_landmarks
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
        plate = src.copy()
        iris_rgba = np.zeros((s, s, 4), np.float32)
        self._lid_colour: dict[str, np.ndarray] = {}
        self._lash_colour: dict[str, np.ndarray] = {}
        linear0 = self._scale0 * self._rotation0
        for name, upper, _, iris, centre, opening in _EYES:
            eye = _polygon_mask(lm[list(opening)], (s, s))
            radius = 0.5 * (np.linalg.norm(lm[iris[1], :2] - lm[iris[3], :2])
                            + np.linalg.norm(lm[iris[2], :2] - lm[iris[4], :2])) / 2  # fmt: skip
            dist = np.hypot(xx - lm[centre, 0], yy - lm[centre, 1])
            # The pasted disc reaches one pixel beyond the cut-out one, so that an iris that
            # has not moved restores the source exactly.
            cut = np.clip(radius + 1.5 - dist, 0.0, 1.0) * eye
            disc = np.clip(radius + 2.5 - dist, 0.0, 1.0)
            # Where the lids hide part of the iris, the pasted disc takes the iris's colour.
            visible_iris = (eye > 0.5) & (dist < radius)
            iris_colour = np.median(
                src[visible_iris if visible_iris.any() else dist < radius], axis=0
            )
            # What the iris uncovers when it moves: the brighter part of the visible sclera.
            sclera_pixels = src[(eye > 0.5) & (dist > radius + 1.5)]
            if len(sclera_pixels):
                bright = sclera_pixels[
                    sclera_pixels.sum(1) >= np.quantile(sclera_pixels.sum(1), 0.6)
                ]
                sclera = np.median(bright, axis=0)
            else:
                sclera = _SCLERA_COLOUR
            _blend(plate, sclera, cut)
            texture = src + (1.0 - eye)[..., None] * (iris_colour - src)
            iris_rgba[..., :3] += disc[..., None] * texture
            iris_rgba[..., 3] += disc

            # Eyelid skin: sampled a little above the upper lid, between lid and brow.
            lid = lm[list(upper[2:-2])]
            up = -linear0[:, 1] / np.linalg.norm(linear0[:, 1])
            samples = np.concatenate([lid + k * up * self._scale0 for k in (0.035, 0.05, 0.065)])
            self._lid_colour[name] = np.median(_sample(src, samples), axis=0)
            self._lash_colour[name] = np.quantile(_sample(src, lid), 0.2, axis=0)
        self._plate = plate
        self._iris_rgba = iris_rgba
        self._source_float = src
        self._mouth_source_mask = _polygon_mask(lm[list(MOUTH_OPENING)], (s, s))

    # --- rendering -------------------------------------------------------------------------

    def render(self, traj: Trajectory, i: int) -> np.ndarray:
        """Frame ``i`` of the trajectory, ``(size, size, 3)`` RGB ``uint8``."""
        # The warp follows the open-eyed shape: closing lids and irises are painted (the
        # irises are not among the warp's points).
        open_shape = self.expression_shape(
            jaw_open=float(traj.jaw_open[i]),
            smile=float(traj.smile[i]),
            brow_raise=float(traj.brow_raise[i]),
            gaze=(float(traj.gaze[i, 0]), float(traj.gaze[i, 1])),
        )
        blinks = {"right": float(traj.blink_right[i]), "left": float(traj.blink_left[i])}
        warp = self._warp_map(traj, i, open_shape)
        frame = cv2.remap(
            self._plate, warp, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )

        lm = self.landmarks(traj, i)
        linear, offset = self._head_transform(traj, i)
        open_lm = open_shape @ linear.T + offset
        self._paint_mouth(frame, lm)
        for name, upper, lower, _, centre, opening in _EYES:
            region = _Region.around(open_lm[list(opening)], 3.0, self.size)
            if region.empty:
                continue
            eye = region.polygon(open_lm[list(opening)])
            self._paint_iris(frame, region, lm[centre], self.source_landmarks[centre], eye, linear)
            if blinks[name] > 0:
                self._paint_lid(frame, region, name, open_lm[list(upper)], open_lm[list(lower)],
                                lm[list(upper)], blinks[name], linear)  # fmt: skip
        return np.clip(frame * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def _paint_mouth(self, frame: np.ndarray, lm: np.ndarray) -> None:
        """The inside of the mouth: the source's upper teeth over a dark cavity.

        The source's own mouth opening (teeth, for the astronaut) is carried by the upper jaw:
        an affine fit of the upper lip and nose base maps it into the frame. Where the mouth
        opens beyond it, a dark cavity shows, darker towards its middle. We leave the tongue
        and lower teeth out: a light or lip-coloured floor of the mouth leads the face
        tracker to put the lower lip there and under-read the opening.
        """
        outline = lm[list(MOUTH_OPENING)]
        region = _Region.around(outline, 3.0, self.size)
        if region.empty:
            return
        opening = region.polygon(outline)
        matrix = _affine_inverse_map(self.source_landmarks[list(UPPER_JAW)], lm[list(UPPER_JAW)])
        teeth = region.warp(self._source_float, matrix, cv2.BORDER_REPLICATE)
        teeth_mask = region.warp(self._mouth_source_mask, matrix)
        gap = float(np.linalg.norm(lm[T.LIPS_INNER_UPPER[5], :2] - lm[T.LIPS_INNER_LOWER[5], :2]))
        depth = cv2.GaussianBlur(opening, (0, 0), max(gap / 3.0, 0.5))
        cavity = _CAVITY_COLOUR * (1.0 - 0.5 * depth)[..., None]
        interior = cavity + teeth_mask[..., None] * (teeth - cavity)
        _blend(region.of(frame), interior, opening)

    def _paint_iris(
        self,
        frame: np.ndarray,
        region: _Region,
        centre: np.ndarray,
        source_centre: np.ndarray,
        eye: np.ndarray,
        linear: np.ndarray,
    ) -> None:
        """Paste the source's iris at ``centre``, turned with the head, inside the eye opening."""
        source_linear = (self._scale0 * self._rotation0)[:2, :2]
        back = source_linear @ np.linalg.inv(linear[:2, :2])
        c_out, c_src = centre[:2] - 0.5, source_centre[:2] - 0.5
        matrix = np.concatenate([back, (c_src - back @ c_out)[:, None]], axis=1)
        rgba = region.warp(self._iris_rgba, matrix)
        colour = rgba[..., :3] / np.maximum(rgba[..., 3:], 1e-6)
        _blend(region.of(frame), colour, rgba[..., 3] * eye)

    def _paint_lid(
        self,
        frame: np.ndarray,
        region: _Region,
        name: str,
        upper: np.ndarray,
        lower: np.ndarray,
        closed: np.ndarray,
        blink: float,
        linear: np.ndarray,
    ) -> None:
        """Cover the eye from the open upper lid down to the closing lid's edge.

        The lid's skin is the skin above the eye, moved down by the eye's height and mixed
        with the lid colour measured on the source; it starts two pixels above the open lid so
        that the source's lash line disappears under it, and fades in over the first 15 % of
        the blink so that the lid appears continuously. A dark lash line marks its edge.
        """
        up = -linear[:2, 1] / np.linalg.norm(linear[:2, 1])
        height = float(np.linalg.norm(lower - upper, axis=1).max())
        lid = np.concatenate([upper + np.array([*(2.0 * up), 0.0]), closed[::-1]])
        mask = cv2.GaussianBlur(region.polygon(lid), (0, 0), 0.7) * min(1.0, blink / 0.15)
        shift = (height + 2.0) * up
        skin = region.warp(
            frame, np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]]), cv2.BORDER_REPLICATE
        )
        view = region.of(frame)
        _blend(view, 0.5 * (skin + self._lid_colour[name]), mask)
        lash = region.polyline(closed, 1) * (0.8 * min(1.0, 2.0 * blink))
        _blend(view, self._lash_colour[name], lash)

    def frames(self, traj: Trajectory) -> Iterator[np.ndarray]:
        """Every frame of the trajectory in order, rendered one at a time."""
        for i in range(len(traj)):
            yield self.render(traj, i)


@functools.lru_cache(maxsize=2)
def default_portrait(size: int = 256) -> SyntheticPortrait:
    """The astronaut portrait at ``size``, built once per process (tracking takes ~1 s)."""
    return SyntheticPortrait(size=size)


# ---------------------------------------------------------------------------------------------
# Audio and the clip
# ---------------------------------------------------------------------------------------------


def synthetic_speech(traj: Trajectory, sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """A vowel-like voice whose loudness and formants follow the mouth, ``float32`` mono.

    Additive synthesis of a glottal buzz (harmonics of a 120-160 Hz pitch with a gentle
    intonation, amplitudes falling as 1/k) shaped by three formant resonances: the first
    formant rises from 350 to 850 Hz as the jaw opens and the second from 1100 to 1800 Hz
    with the smile (spread lips), as in the vowels /u/ -> /a/ -> /i/. Loudness follows the
    jaw opening, so the pauses of the speech are silent. Not intelligible speech, but an
    audio-driven model has a signal that determines the mouth. The numbers are our choice.
    """
    n = round(len(traj) / traj.fps * sample_rate)
    t = np.arange(n) / sample_rate
    frame_t = (np.arange(len(traj)) + 0.5) / traj.fps
    jaw = np.interp(t, frame_t, traj.jaw_open)
    smile = np.interp(t, frame_t, traj.smile)
    f0 = 140.0 * (1.0 + 0.08 * np.sin(2 * np.pi * 0.4 * t) + 0.06 * jaw)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    formants = [
        (350.0 + 500.0 * jaw, 90.0),
        (1100.0 + 700.0 * smile + 200.0 * jaw, 110.0),
        (2600.0, 160.0),
    ]
    voice = np.zeros(n)
    for k in range(1, int(0.45 * sample_rate / 120.0)):
        freq = k * f0
        gain = sum(1.0 / (1.0 + ((freq - f) / b) ** 2) for f, b in formants) / k
        gain *= freq < 0.45 * sample_rate
        voice += gain * np.sin(k * phase)
    loudness = np.clip(jaw, 0.0, 1.0) ** 0.7
    voice *= loudness
    peak = np.abs(voice).max()
    return (0.5 * voice / peak if peak > 0 else voice).astype(np.float32)


def synthesize_clip(
    path: str | Path,
    trajectory: Trajectory,
    portrait: SyntheticPortrait | None = None,
    size: int = 256,
    audio: bool = True,
) -> Path:
    """Write the clip of ``trajectory`` to ``path`` (mp4) and the trajectory beside it.

    Frames are rendered and encoded one at a time. The video is marked as synthetic media
    (:class:`~neuralhead.media.video.VideoWriter`); with ``audio`` it carries
    :func:`synthetic_speech` at 16 kHz. The ground truth is written to
    ``path.with_suffix(".npz")`` (:meth:`Trajectory.save`), whose path is returned, so the
    clip and its parameters travel together. ``portrait`` defaults to the astronaut at
    ``size``; a given portrait must have that size.
    """
    if portrait is None:
        portrait = default_portrait(size)
    elif portrait.size != size:
        raise ValueError(f"the portrait renders {portrait.size}x{portrait.size} frames, not {size}")
    path = Path(path)
    waveform = synthetic_speech(trajectory) if audio else None
    with VideoWriter(
        path,
        trajectory.fps,
        audio=waveform,
        audio_sample_rate=AUDIO_SAMPLE_RATE if audio else None,
        generator="neuralhead.data.synthetic",
        description="a still portrait animated along a scripted head-pose and expression trajectory",
    ) as writer:
        for frame in portrait.frames(trajectory):
            writer.write(frame)
    npz = path.with_suffix(".npz")
    trajectory.save(npz)
    return npz
