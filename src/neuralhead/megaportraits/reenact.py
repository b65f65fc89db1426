"""MegaPortraits inference: checkpoints, the tensor-level reenactor, and video reenactment.

**Checkpoints.** A trained base model G_base (Sec. 3.1) is the directory ``megaportraits/``
of a training run (``config.json`` + ``model.safetensors``, head-pose network included,
written by :mod:`neuralhead.megaportraits.trainer`) or that directory on its own;
:func:`is_megaportraits_checkpoint` tells it from other models' (``neuralhead reenact`` picks
the pipeline with it). The optional high-resolution model G_enh (Sec. 3.2) is a saved
:class:`~neuralhead.megaportraits.enhancer.Enhancer` or an enhancer run holding
``enhancer/``; the optional student G_DT (Sec. 3.3) a saved
:class:`~neuralhead.megaportraits.student.Student` or a distillation run holding
``student/``.

**Framing.** Sources and drivers are framed as the prepared training frames are: a square
centred on the face, ``crop_scale`` face sizes wide (:mod:`neuralhead.tracking.crop`; 2 by
default, as ``neuralhead prepare``). The driver's boxes follow its face, smoothed over time
(:func:`~neuralhead.tracking.crop.tracked_boxes`); frames without a face take boxes
interpolated from their neighbours, so one missed frame does not stop a video.

**Motion** (Sec. 3.1, B.6; :class:`PoseControl`, :func:`driving_pose`). The driver's
expression code z_d is used as it is, its head pose as asked:

* rotation: ``"relative"`` (default) applies the driver's rotation since its first frame to
  the source's, ``R = R_d R_d0^T R_s``, so the head keeps the source's orientation while the
  driver holds still (our choice of default for cross-reenactment, as FOMM's relative
  mode); ``"absolute"`` takes the driver's rotation ``R_d`` as it is (the training setting).
* scale and translation (B.6, Fig. 13): ``"source"`` (default) keeps the source's, e.g. for
  video conferencing; ``"driver"`` takes the driver's, to mimic the driver fully.
* explicit ``pitch``, ``yaw``, ``roll`` (degrees) replace that angle of the rotation after
  the mode: all three zero frontalise the head (Fig. 14). B.6 finds turns away from frontal
  work for moderate angles, "at least for 15°" (Fig. 15).

The student renders its avatar in the driver's motion as it is: it has no pose input (A.3),
so none of these controls apply to it; nor does the enhancer, which it was distilled with.

**Output.** The model generates the foreground only (Sec. 3.1); it is composited onto a
background plate of the source (:mod:`neuralhead.megaportraits.background`) and, with
``paste_back``, the composited crop is blended into the whole source image through a
feathered square (:class:`neuralhead.headgan.reenact.PasteBack`).

**Video** (:func:`reenact_video`): two streaming passes over the driving video. The first
tracks the face, keeping a few numbers per frame; the second crops, generates, composites
and writes ``batch_size`` frames at a time, so memory does not grow with the video's length.
The mp4 is marked as synthetic media and carries the driver's sound.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from neuralhead.errors import InputError, NoFaceError
from neuralhead.geometry import euler_to_matrix, matrix_to_euler
from neuralhead.inference.common import (
    OUTPUT_AUDIO_RATE,
    PasteBack,
    interpolate_missing,
    load_image,
    load_sound,
    to_tensor,
)
from neuralhead.media.video import VideoReader, VideoWriter, probe_video
from neuralhead.megaportraits.background import (
    BackgroundCompositor,
    background_plate,
    foreground_mask,
)
from neuralhead.megaportraits.base_model import DriverMotion, MegaPortraitsBase, Pose, SourceState
from neuralhead.megaportraits.enhancer import Enhancer
from neuralhead.megaportraits.export import load_student
from neuralhead.megaportraits.student import Student
from neuralhead.nn.pretrained import CONFIG_FILE, WEIGHTS_FILE
from neuralhead.tracking import crop as crops
from neuralhead.tracking.mediapipe_backend import FaceMeshTracker
from neuralhead.visualize import to_uint8

#: Subdirectories of training runs holding the trained models (the trainers' export dirs).
RUN_SUBDIR = "megaportraits"
ENHANCER_SUBDIR = "enhancer"

MOTION_MODES = ("relative", "absolute")
SCALE_MODES = ("source", "driver")
#: Index of each angle in the (pitch, yaw, roll) Euler vectors of the pose dicts.
ANGLES = {"pitch": 0, "yaw": 1, "roll": 2}

#: Fewest frames of the driving video that must show a face.
MIN_FACE_FRACTION = 0.5

_STUDENT_WITH_ENHANCER = (
    "a student renders at the resolution it was distilled at: the enhancer only applies to the "
    "base model"
)


# ---------------------------------------------------------------------------------- checkpoints


def _model_class(directory: Path) -> str | None:
    try:
        data = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data.get("model_class") if isinstance(data, dict) else None


def _saved_model_directory(path: Path, subdir: str, model_class: str) -> Path | None:
    for candidate in (path / subdir, path):
        if candidate.is_dir() and _model_class(candidate) == model_class:
            return candidate
    return None


def megaportraits_directory(path: str | os.PathLike) -> Path | None:
    """The directory holding a saved base model: ``path/megaportraits`` or ``path``; else None."""
    return _saved_model_directory(Path(path), RUN_SUBDIR, MegaPortraitsBase.__name__)


def is_megaportraits_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a MegaPortraits training run or a saved base model directory."""
    return megaportraits_directory(path) is not None


def _require_saved(path: str | os.PathLike, subdir: str, cls: type, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    directory = _saved_model_directory(path, subdir, cls.__name__)
    if directory is None:
        raise InputError(
            f"{path} is not a {what}: expected {subdir}/{CONFIG_FILE} (a finished training run) "
            f"or the {CONFIG_FILE} of a saved {cls.__name__}"
        )
    if not (directory / WEIGHTS_FILE).is_file():
        raise InputError(f"{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    return directory


def load_base(checkpoint: str | os.PathLike, *, map_location: str = "cpu") -> MegaPortraitsBase:
    """The base model G_base of a training run or a saved model directory."""
    directory = _require_saved(
        checkpoint, RUN_SUBDIR, MegaPortraitsBase, "MegaPortraits checkpoint"
    )
    return MegaPortraitsBase.from_pretrained(directory, map_location=map_location)


def load_enhancer(path: str | os.PathLike, *, map_location: str = "cpu") -> Enhancer:
    """The high-resolution model G_enh of an enhancer run or a saved enhancer directory."""
    directory = _require_saved(path, ENHANCER_SUBDIR, Enhancer, "MegaPortraits enhancer")
    return Enhancer.from_pretrained(directory, map_location=map_location)


# ---------------------------------------------------------------------------------- motion


@dataclass(frozen=True)
class PoseControl:
    """How the driver's head pose is imposed on the source (module docstring; B.6).

    ``motion``: ``"relative"`` or ``"absolute"`` rotation; ``scale``: ``"source"`` or
    ``"driver"`` scale and translation; ``pitch``, ``yaw``, ``roll``: angles in degrees that
    replace the rotation's (None keeps it).
    """

    motion: str = "relative"
    scale: str = "source"
    pitch: float | None = None
    yaw: float | None = None
    roll: float | None = None

    def __post_init__(self) -> None:
        if self.motion not in MOTION_MODES:
            raise InputError(f"motion must be 'relative' or 'absolute', got {self.motion!r}")
        if self.scale not in SCALE_MODES:
            raise InputError(f"scale must be 'source' or 'driver', got {self.scale!r}")
        for name, value in self.angles().items():
            if not math.isfinite(value):
                raise InputError(f"{name} must be a finite angle in degrees, got {value}")

    def angles(self) -> dict[str, float]:
        """The given angle overrides, in degrees."""
        values = {"pitch": self.pitch, "yaw": self.yaw, "roll": self.roll}
        return {name: float(value) for name, value in values.items() if value is not None}

    @property
    def is_default(self) -> bool:
        return self == PoseControl()


def driving_pose(
    source: Pose, driver: Pose, control: PoseControl, *, reference: torch.Tensor | None = None
) -> Pose:
    """The pose to render for each driver frame (module docstring; B.6).

    ``source`` and ``driver`` are head-pose dicts (``rotation`` ``(B, 3)`` Euler (pitch, yaw,
    roll) radians, ``translation`` ``(B, 3)``, ``scale`` ``(B, 1)``); the source has batch 1
    or the driver's. ``reference`` ``(3,)`` or ``(1, 3)`` is the rotation of the driver frame
    that relative motion is measured from (default: the first of ``driver``). Returns
    ``rotation``, ``translation`` and ``scale`` with the driver's batch.
    """
    rotation = driver["rotation"]
    batch = rotation.shape[0]
    if control.motion == "relative":
        start = rotation[:1] if reference is None else reference.reshape(1, 3).to(rotation)
        since_start = euler_to_matrix(rotation) @ euler_to_matrix(start).transpose(-1, -2)
        rotation = matrix_to_euler(since_start @ euler_to_matrix(source["rotation"].to(rotation)))
    rotation = rotation.clone()
    for name, degrees in control.angles().items():
        rotation[:, ANGLES[name]] = math.radians(degrees)
    rigid = source if control.scale == "source" else driver
    return {
        "rotation": rotation,
        "translation": rigid["translation"].to(rotation).expand(batch, 3),
        "scale": rigid["scale"].to(rotation).reshape(-1, 1).expand(batch, 1),
    }


# ---------------------------------------------------------------------------------- reenactor


@dataclass
class MegaPortraitsSource:
    """A source ready to animate: its crop, foreground mask and, for G_base, its encoding.

    ``box`` and ``full_image`` (where the crop came from) are set when the source was found
    in a full image; they place the background plate and the paste-back.
    """

    image: torch.Tensor  # (1, 3, S, S) in [0, 1]
    mask: torch.Tensor  # (1, 1, S, S)
    state: SourceState | None = None  # None for a student
    box: np.ndarray | None = None
    full_image: np.ndarray | None = None


class MegaPortraitsReenactor:
    """G_base (with an optional G_enh), or a student G_DT locked to ``avatar``, on ``device``.

    Models run in eval mode and fp32. ``frames(driver, control)`` turns driver crops into
    generated foregrounds; with G_base a source must be set first (:meth:`prepare_source` or
    :meth:`use_source`). In relative motion the first driver frame after :meth:`reset` (or a
    new source) is the reference the driver's rotation is measured from.
    """

    def __init__(
        self,
        base: MegaPortraitsBase | None = None,
        *,
        enhancer: Enhancer | None = None,
        student: Student | None = None,
        avatar: int | None = None,
        crop_scale: float = crops.DEFAULT_CROP_SCALE,
        device: str | torch.device = "cpu",
    ) -> None:
        if (base is None) == (student is None):
            raise InputError("give a base model or a student (not both)")
        if student is not None and enhancer is not None:
            raise InputError(_STUDENT_WITH_ENHANCER)
        if student is None and avatar is not None:
            raise InputError(
                "an avatar index selects one of a student's avatars: give the student too"
            )
        if student is not None and avatar is None:
            raise InputError(
                f"a student renders one of its avatars: choose one (0 .. {student.num_avatars - 1})"
            )
        size = base.config.image_size if base is not None else None
        if enhancer is not None and enhancer.config.input_size != size:
            raise InputError(
                f"the enhancer takes {enhancer.config.input_size}x{enhancer.config.input_size} "
                f"images, the base model renders {base.config.image_size}x{base.config.image_size}"
            )
        if not crop_scale > 0:
            raise InputError(f"crop_scale must be positive, got {crop_scale}")
        self.device = torch.device(device)
        self.base = base.to(self.device).eval() if base is not None else None
        self.enhancer = enhancer.to(self.device).eval() if enhancer is not None else None
        self.student = student.to(self.device).eval() if student is not None else None
        if student is not None:
            self.avatar = int(student.check_avatar_index(avatar, 1)[0])
        else:
            self.avatar = None
        self.crop_scale = crop_scale
        self.source: MegaPortraitsSource | None = None
        self._reference: torch.Tensor | None = None

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike | None,
        *,
        enhancer: str | os.PathLike | None = None,
        student: str | os.PathLike | None = None,
        avatar: int | None = None,
        crop_scale: float = crops.DEFAULT_CROP_SCALE,
        device: str | torch.device = "cpu",
    ) -> MegaPortraitsReenactor:
        """Load G_base from ``checkpoint`` (+ G_enh from ``enhancer``), or only the ``student``.

        With a student the base model is not loaded: the student renders on its own.
        """
        if student is not None:
            if enhancer is not None:
                raise InputError(_STUDENT_WITH_ENHANCER)
            return cls(
                student=load_student(student), avatar=avatar, crop_scale=crop_scale, device=device
            )
        if checkpoint is None:
            raise InputError("give a MegaPortraits checkpoint or a student")
        return cls(
            load_base(checkpoint),
            enhancer=load_enhancer(enhancer) if enhancer is not None else None,
            crop_scale=crop_scale,
            device=device,
        )

    @property
    def input_size(self) -> int:
        """Side of the source and driver crops the model takes."""
        model = self.base if self.base is not None else self.student
        return model.config.image_size

    @property
    def output_size(self) -> int:
        if self.enhancer is not None:
            return self.input_size * self.enhancer.config.scale
        return self.input_size

    # --- the source -------------------------------------------------------------------------

    def prepare_source(
        self, image: str | os.PathLike | np.ndarray, *, what: str = "source image"
    ) -> MegaPortraitsSource:
        """Find the face in ``image`` (a file or RGB uint8 array), crop and encode it.

        The crop is a square ``crop_scale`` face sizes wide around the face, as the
        training frames (module docstring). Raises :class:`~neuralhead.errors.NoFaceError`
        when there is no face. It becomes the current source.
        """
        name = what if isinstance(image, np.ndarray) else f"{what} {Path(image).name}"
        full = load_image(image, what)
        with FaceMeshTracker(static=True) as tracker:
            landmarks = tracker.process(full)
        if landmarks is None:
            raise NoFaceError(f"no face found in the {name}")
        centre, size = crops.face_centres_and_sizes(landmarks[None])
        # The box a tracked crop of a one-frame clip gets (nothing to smooth).
        box = crops.tracked_boxes(centre, size, fps=1.0, scale=self.crop_scale)[0]
        crop = crops.crop_frame(full, box, self.input_size)
        return self.use_source(to_tensor(crop), box=box, full_image=full)

    @torch.no_grad()
    def use_source(
        self,
        image: torch.Tensor,
        *,
        box: np.ndarray | None = None,
        full_image: np.ndarray | None = None,
    ) -> MegaPortraitsSource:
        """Animate the head crop ``image`` ``(1, 3, S, S)`` in [0, 1] from now on.

        Its foreground mask is computed as training's (selfie segmentation) and, for G_base,
        given to the appearance encoder with it (E_app reads the masked source for e_s).
        """
        s = self.input_size
        if not torch.is_tensor(image) or tuple(image.shape) != (1, 3, s, s):
            shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
            raise InputError(f"the source crop must have shape (1, 3, {s}, {s}), got {shape}")
        image = image.to(self.device, torch.float32)
        mask = foreground_mask(image)
        state = self.base.encode_source(image, mask) if self.base is not None else None
        self.source = MegaPortraitsSource(image, mask, state, box=box, full_image=full_image)
        self.reset()
        return self.source

    def reset(self) -> None:
        """Start a new clip: the next driver frame is the reference of relative motion."""
        self._reference = None

    # --- driving ----------------------------------------------------------------------------

    def _check_driver(self, driver: torch.Tensor) -> torch.Tensor:
        s = self.input_size
        if not torch.is_tensor(driver) or driver.dim() != 4 or tuple(driver.shape[1:]) != (3, s, s):
            shape = tuple(driver.shape) if torch.is_tensor(driver) else type(driver).__name__
            raise InputError(f"driver crops must have shape (T, 3, {s}, {s}), got {shape}")
        return driver.to(self.device, torch.float32)

    def motion(self, driver: torch.Tensor, control: PoseControl | None = None) -> DriverMotion:
        """The driver crops' motion for G_base with ``control``'s pose (B.6)."""
        if self.base is None:
            raise InputError(
                "a student reads the driver's motion itself: there is no pose to control"
            )
        if self.source is None:
            raise InputError("no source image: call prepare_source(image) first")
        control = control or PoseControl()
        with torch.no_grad():
            motion = self.base.encode_driver(self._check_driver(driver))
        if self._reference is None:
            self._reference = motion.pose["rotation"][:1]
        pose = driving_pose(self.source.state.pose, motion.pose, control, reference=self._reference)
        return motion.with_pose(**pose)

    @torch.no_grad()
    def frames(self, driver: torch.Tensor, control: PoseControl | None = None) -> torch.Tensor:
        """Generated foregrounds ``(T, 3, O, O)`` in [0, 1] for driver crops ``(T, 3, S, S)``.

        ``S`` is :attr:`input_size`, ``O`` :attr:`output_size`. A student takes no
        ``control`` (module docstring).
        """
        if self.student is not None:
            if control is not None and not control.is_default:
                raise InputError(
                    "a student follows the driver's pose as it is (A.3): motion, scale and "
                    "angle controls apply to the base model"
                )
            return self.student(self._check_driver(driver), self.avatar).clamp(0.0, 1.0)
        motion = self.motion(driver, control)
        image = self.base.render(self.source.state, motion)["image"]
        if self.enhancer is not None:
            image = self.enhancer(image)
        return image.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------- video


@dataclass
class DriverTrack:
    """Where the face is in each frame of a driving video: crop boxes ``(N, 3)``."""

    fps: float
    boxes: np.ndarray
    valid: np.ndarray  # (N,) whether the tracker found a face (else interpolated)

    def __len__(self) -> int:
        return len(self.boxes)


def track_driver(
    video: str | os.PathLike,
    *,
    crop_scale: float = crops.DEFAULT_CROP_SCALE,
    max_frames: int | None = None,
    min_face_fraction: float = MIN_FACE_FRACTION,
    progress: bool = True,
) -> DriverTrack:
    """Track the face through ``video`` (one decoding pass) and place a crop box per frame.

    Raises :class:`~neuralhead.errors.NoFaceError` when fewer than ``min_face_fraction`` of
    the frames show a face; the others take boxes interpolated from their neighbours.
    """
    info = probe_video(video)
    name = os.path.basename(os.fspath(video))
    centres, sizes, valid = [], [], []
    total = min(info.num_frames or 0, max_frames or info.num_frames or 0) or None
    bar = tqdm(total=total, desc="tracking", unit="frame", disable=not progress)
    with bar, VideoReader(video) as reader, FaceMeshTracker() as tracker:
        for frame in reader:
            points = tracker.process(frame)
            valid.append(points is not None)
            if points is None:
                centres.append(np.full((1, 2), np.nan, np.float32))
                sizes.append(np.full(1, np.nan, np.float32))
            else:
                centre, size = crops.face_centres_and_sizes(points[None])
                centres.append(centre.astype(np.float32))
                sizes.append(size.astype(np.float32))
            bar.update()
            if max_frames and len(valid) >= max_frames:
                break
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
    centre = interpolate_missing(np.concatenate(centres), mask)
    size = interpolate_missing(np.concatenate(sizes), mask)
    boxes = crops.tracked_boxes(centre, size, info.fps, crop_scale)
    return DriverTrack(fps=info.fps, boxes=boxes, valid=mask)


def driver_crops(
    video: str | os.PathLike, boxes: np.ndarray, size: int, *, batch_size: int
) -> Iterator[np.ndarray]:
    """Batches ``(n, size, size, 3)`` uint8 of the video's frames cropped to ``boxes``."""
    batch: list[np.ndarray] = []
    count = 0
    with VideoReader(video) as reader:
        for frame in reader:
            if count == len(boxes):
                break
            batch.append(crops.crop_frame(frame, boxes[count], size))
            count += 1
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
    if batch:
        yield np.stack(batch)
    if count < len(boxes):
        raise InputError(
            f"video {os.path.basename(os.fspath(video))} gave {count} frames on the second pass, "
            f"{len(boxes)} on the first"
        )


@dataclass
class ReenactResult:
    """What :func:`reenact_video` wrote."""

    path: Path
    num_frames: int
    fps: float
    size: tuple[int, int]  # (width, height) of the written frames
    motion: str  # how the motion was imposed, in words
    has_audio: bool


def _source_plate(source: MegaPortraitsSource, size: int) -> torch.Tensor:
    """The background plate of the source crop at ``size``: inpainted over the whole image.

    Inpainting the whole image, not the crop, lets the fill draw on the background around
    the crop and keeps the plate the same under the paste-back.
    """
    full = to_tensor(source.full_image)
    plate = background_plate(full, foreground_mask(full))
    crop = crops.crop_frame(to_uint8(plate[0], (0.0, 1.0)), source.box, size)
    return to_tensor(crop)


def _describe(control: PoseControl | None, student: bool, avatar: int | None) -> str:
    if student:
        return f"student avatar {avatar}, driver's pose"
    angles = ", ".join(f"{name} {value:g}°" for name, value in control.angles().items())
    text = f"{control.motion} rotation, {control.scale} scale and translation"
    return f"{text}, {angles}" if angles else text


def reenact_video(
    checkpoint: str | os.PathLike,
    source_image: str | os.PathLike | np.ndarray,
    driving_video: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    motion: str | None = None,
    scale: str | None = None,
    yaw: float | None = None,
    pitch: float | None = None,
    roll: float | None = None,
    enhancer: str | os.PathLike | None = None,
    student: str | os.PathLike | None = None,
    avatar: int | None = None,
    paste_back: bool = False,
    background: bool = True,
    side_by_side: bool = False,
    crop_scale: float = crops.DEFAULT_CROP_SCALE,
    batch_size: int = 4,
    max_frames: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> ReenactResult:
    """Animate ``source_image`` with the head motion and expressions of ``driving_video``.

    ``checkpoint`` is a MegaPortraits run or saved base model. Pose (module docstring, B.6):
    ``motion`` ``"relative"`` (default) or ``"absolute"``; ``scale`` ``"source"`` (default)
    or ``"driver"``; ``yaw``, ``pitch``, ``roll`` in degrees replace the driven angles.
    ``enhancer``: a G_enh (run or saved model) for twice the resolution (Sec. 3.2).
    ``student`` and ``avatar``: render avatar ``avatar`` of a distilled student instead of
    G_base (Sec. 3.3; no pose controls, no enhancer); ``source_image`` is then that avatar's
    source photo, used only for the background and the paste-back. ``background``
    composites the generated foreground onto the source's background plate (else the
    model's flat background stays); ``paste_back`` writes the whole source image with the
    generated head blended in; ``side_by_side`` puts the driver's crop on the left. The
    output is an mp4 marked as synthetic media, with the driver's sound when it has one.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    if paste_back and not background:
        raise InputError("paste_back needs the background: the generated crop has none of its own")
    uses_pose = any(v is not None for v in (motion, scale, yaw, pitch, roll))
    if student is not None and uses_pose:
        raise InputError(
            "a student follows the driver's pose as it is (A.3): motion, scale, yaw, pitch and "
            "roll apply to the base model"
        )
    control = None
    if student is None:
        control = PoseControl(
            motion=motion or "relative", scale=scale or "source", pitch=pitch, yaw=yaw, roll=roll
        )
    checkpoint, driving_video, out = Path(checkpoint), Path(driving_video), Path(out_path)
    # Checked with a student too, which is not loaded from it: it names the teacher.
    _require_saved(checkpoint, RUN_SUBDIR, MegaPortraitsBase, "MegaPortraits checkpoint")
    info = probe_video(driving_video)
    reenactor = MegaPortraitsReenactor.from_checkpoint(
        checkpoint,
        enhancer=enhancer,
        student=student,
        avatar=avatar,
        crop_scale=crop_scale,
        device=device,
    )
    source = reenactor.prepare_source(source_image)
    track = track_driver(
        driving_video, crop_scale=crop_scale, max_frames=max_frames, progress=progress
    )
    num_frames = len(track)
    sound = load_sound(driving_video if info.has_audio else None, num_frames, track.fps)

    size = reenactor.output_size
    paste = PasteBack(source.full_image, source.box) if paste_back else None
    source_name = "an image" if isinstance(source_image, np.ndarray) else Path(source_image).name
    described = _describe(control, student is not None, reenactor.avatar)
    description = (
        f"MegaPortraits {checkpoint.name}: {source_name} driven by {driving_video.name} "
        f"({described})"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    compositor = BackgroundCompositor(_source_plate(source, size)) if background else None
    written = (0, 0)
    with (
        compositor if compositor is not None else contextlib.nullcontext(),
        VideoWriter(
            out,
            track.fps,
            audio=sound,
            audio_sample_rate=OUTPUT_AUDIO_RATE if sound is not None else None,
            generator="neuralhead megaportraits",
            description=description,
        ) as writer,
        tqdm(total=num_frames, desc="generating", unit="frame", disable=not progress) as bar,
    ):
        batches = driver_crops(
            driving_video, track.boxes, reenactor.input_size, batch_size=batch_size
        )
        for batch in batches:
            driver = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
            images = reenactor.frames(driver, control)
            if compositor is not None:
                images = compositor(images)
            for crop, image in zip(batch, images):
                frame = to_uint8(image, (0.0, 1.0))
                if paste is not None:
                    frame = paste(frame)
                if side_by_side:
                    height = frame.shape[0]
                    interp = cv2.INTER_AREA if len(crop) > height else cv2.INTER_LINEAR
                    side = cv2.resize(crop, (height, height), interpolation=interp)
                    frame = np.concatenate([side, frame], axis=1)
                writer.write(frame)
                written = (frame.shape[1], frame.shape[0])
            bar.update(len(batch))
    return ReenactResult(out, num_frames, track.fps, written, described, sound is not None)
