"""HeadGAN inference: a trained run, the tensor-level reenactor, and video reenactment.

**Run layout** (written by :func:`neuralhead.headgan.trainer.export` when training ends). A
trained HeadGAN is the directory ``headgan/`` of a training run, or that directory on its own
(e.g. copied elsewhere), holding:

* ``config.json`` + ``model.safetensors``: the generator, :meth:`HeadGANGenerator.save_pretrained`;
* ``face_model.npz``: the morphable model the training renders were made with;
* ``audio_stats.npz`` (audio models): the mean and standard deviation of the training clips'
  audio features and the speech recogniser they came from
  (:class:`neuralhead.headgan.dataset.AudioStatistics`).

:func:`load_headgan_run` reads it; :func:`is_headgan_checkpoint` tells a HeadGAN checkpoint
from other models' (``neuralhead reenact`` uses it to pick the pipeline).

**Reenactor** (:class:`HeadGANReenactor`, tensor level). ``prepare_source`` tracks the source
image, crops a square around the head (centred on the face, ``crop_scale`` face sizes wide;
from a training run, the median framing of its first training video, so the source is framed
as the training frames were; else 2, our choice), fits identity, expression and camera
(App. A) and renders the reference ``x_ref`` (Sec. 3.1). ``frames`` renders the driving faces
(Eq. 1: the source's identity with the given expressions, seen by the given cameras), stacks
each with the renders of the two frames before it (Sec. 3.3; the first frame's missing
predecessors repeat it, as training clamps at a clip's start) and runs the generator (Eq. 2).
It keeps the last two renders between calls, so a video is generated chunk by chunk.

**Audio.** Training standardises each clip's features with that clip's own statistics
(:mod:`neuralhead.headgan.dataset`), so :meth:`HeadGANReenactor.standardise_audio` does the
same with the driving clip's; a clip shorter than :data:`MIN_CLIP_FRAMES` frames, whose own
statistics would be noise, takes the training clips' pooled statistics (our choice).

**Video** (:func:`reenact_video`, file level): the driving video is tracked once
(:func:`neuralhead.headgan.driving.track_video`), the audio features come from its sound (or
a given audio file), frames are generated and written a chunk at a time, and the output mp4
is marked as synthetic media and carries the driving sound.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from neuralhead.data.format import DatasetFiles
from neuralhead.errors import InputError, NoFaceError
from neuralhead.headgan.audio_features import audio_features_for_video
from neuralhead.headgan.dataset import AudioStatistics
from neuralhead.headgan.driving import (
    CAMERA_MODES,
    DEFAULT_MOMENTUM,
    driving_parameters,
    track_video,
)
from neuralhead.headgan.face_model import MorphableModel
from neuralhead.headgan.fitting import CAMERA_DIM, driving_shape, fit_frames, project
from neuralhead.headgan.generator import HeadGANGenerator
from neuralhead.headgan.renderer import render_ncc
from neuralhead.inference.common import (
    OUTPUT_AUDIO_RATE,
    PasteBack,
    load_image,
    load_sound,
    to_tensor,
)
from neuralhead.media.video import VideoReader, VideoWriter, probe_video
from neuralhead.nn.pretrained import CONFIG_FILE, WEIGHTS_FILE
from neuralhead.tracking import crop as crops
from neuralhead.tracking.mediapipe_backend import FaceMeshTracker
from neuralhead.visualize import to_uint8

log = logging.getLogger(__name__)

RUN_SUBDIR = "headgan"
FACE_MODEL_FILE = "face_model.npz"
AUDIO_STATS_FILE = "audio_stats.npz"
GENERATOR_CLASS = "HeadGANGenerator"

#: Sample rate of the sound muxed into output videos.

#: Width of the feathered border of the paste-back mask, in crop sides (our choice).

#: Clips with fewer frames are standardised with the training statistics (2 s at 25 fps).
MIN_CLIP_FRAMES = 50

#: Frames of a training video measured for the framing of its crops.
_FRAMING_SAMPLES = 200


# ---------------------------------------------------------------------------------- run


@dataclass
class HeadGANRun:
    """Everything inference needs from a trained run (see the module docstring's layout)."""

    directory: Path
    generator: HeadGANGenerator
    face_model: MorphableModel
    audio_stats: AudioStatistics | None = None
    crop_scale: float = crops.DEFAULT_CROP_SCALE


def _holds_generator(directory: Path) -> bool:
    config = directory / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_class") == GENERATOR_CLASS


def headgan_directory(path: str | os.PathLike) -> Path | None:
    """The directory holding a HeadGAN generator: ``path/headgan`` or ``path``; else None."""
    path = Path(path)
    for candidate in (path / RUN_SUBDIR, path):
        if candidate.is_dir() and _holds_generator(candidate):
            return candidate
    return None


def is_headgan_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a HeadGAN training run or a saved HeadGAN generator directory."""
    return headgan_directory(path) is not None


def _require_directory(checkpoint: str | os.PathLike) -> Path:
    path = Path(checkpoint)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    directory = headgan_directory(path)
    if directory is None:
        raise InputError(
            f"{path} is not a HeadGAN checkpoint: expected {RUN_SUBDIR}/{CONFIG_FILE} (a finished "
            f"training run) or the {CONFIG_FILE} of a {GENERATOR_CLASS} (a saved generator)"
        )
    return directory


def load_face_model(checkpoint: str | os.PathLike) -> MorphableModel:
    """The face model of a HeadGAN run or generator directory, or of a ``.npz`` file."""
    path = Path(checkpoint)
    if path.suffix == ".npz":
        return MorphableModel.load(path)
    directory = _require_directory(path)
    model_path = directory / FACE_MODEL_FILE
    if not model_path.is_file():
        raise InputError(
            f"{directory} has no {FACE_MODEL_FILE}: the face model the generator was trained with "
            "is needed to render its input"
        )
    return MorphableModel.load(model_path)


def training_crop_scale(directory: Path) -> float | None:
    """How wide the training frames of the run around ``directory`` are, in face sizes.

    The median over frames of the first training video of ``crop side / face size``
    (:func:`neuralhead.tracking.crop.face_centres_and_sizes`); None when the run's
    ``config.json`` or that dataset cannot be read (e.g. a generator copied elsewhere).
    """
    try:
        run = json.loads((directory.parent / CONFIG_FILE).read_text())
        if run.get("model") != "headgan":
            return None
        files = DatasetFiles.open(run["data"][0])
        landmarks = files.array("landmarks")
        frames = np.unique(np.linspace(0, len(landmarks) - 1, _FRAMING_SAMPLES).astype(np.int64))
        _, size = crops.face_centres_and_sizes(np.asarray(landmarks[frames]))
    except (OSError, ValueError, KeyError, IndexError, TypeError, InputError):
        return None
    size = size[np.isfinite(size) & (size > 0)]
    return float(files.size / np.median(size)) if len(size) else None


def load_headgan_run(checkpoint: str | os.PathLike, *, map_location: str = "cpu") -> HeadGANRun:
    """Load the generator, face model and audio statistics of a trained HeadGAN."""
    directory = _require_directory(checkpoint)
    if not (directory / WEIGHTS_FILE).is_file():
        raise InputError(f"{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    generator = HeadGANGenerator.from_pretrained(directory, map_location=map_location)
    face_model = load_face_model(directory)
    if face_model.triangles.numel() == 0:
        raise InputError(f"the face model of {directory} has no mesh to render")
    config = generator.config
    audio_stats = None
    if config.use_audio:
        stats_path = directory / AUDIO_STATS_FILE
        if not stats_path.is_file():
            raise InputError(
                f"{directory} has no {AUDIO_STATS_FILE}: an audio model needs the statistics its "
                "audio features were standardised with"
            )
        audio_stats = AudioStatistics.load(stats_path)
        if audio_stats.mean.shape != (config.audio_dim,):
            raise InputError(
                f"{stats_path} holds {audio_stats.mean.shape[0]} features, the generator reads "
                f"{config.audio_dim}"
            )
    crop_scale = training_crop_scale(directory)
    return HeadGANRun(
        directory=directory,
        generator=generator,
        face_model=face_model,
        audio_stats=audio_stats,
        crop_scale=crop_scale if crop_scale is not None else crops.DEFAULT_CROP_SCALE,
    )


# ---------------------------------------------------------------------------------- images


def _tensor(value: torch.Tensor | np.ndarray | list) -> torch.Tensor:
    return value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))


# ---------------------------------------------------------------------------------- reenactor


@dataclass
class SourceFace:
    """The reference of Eq. 2: its crop ``y_ref``, 3D face render ``x_ref`` and fitted parameters.

    ``box`` and ``full_image`` (where the crop came from) are set when the source was tracked
    in a full image; they let outputs be pasted back.
    """

    image: torch.Tensor  # (1, 3, S, S) in [0, 1]
    render: torch.Tensor  # (1, 3, S, S)
    identity: torch.Tensor  # (K_id,)
    expression: torch.Tensor  # (K_exp,)
    camera: torch.Tensor  # (7,)
    box: np.ndarray | None = None
    full_image: np.ndarray | None = None


class HeadGANReenactor:
    """Generator, face model and audio statistics, ready to animate one source image.

    See the module docstring. The generator runs in eval mode, in fp32, on ``device``.
    """

    def __init__(
        self,
        generator: HeadGANGenerator,
        face_model: MorphableModel,
        *,
        audio_stats: AudioStatistics | None = None,
        crop_scale: float = crops.DEFAULT_CROP_SCALE,
        fit_bound: float = 3.0,
        device: str | torch.device = "cpu",
    ) -> None:
        if generator.config.use_audio and audio_stats is None:
            raise InputError("an audio generator needs the audio statistics of its training data")
        self.device = torch.device(device)
        self.generator = generator.to(self.device).eval()
        self.face_model = face_model.to(self.device)
        self.config = generator.config
        self.audio_stats = audio_stats
        self.crop_scale = crop_scale
        self.fit_bound = fit_bound
        self.source: SourceFace | None = None
        self._history: torch.Tensor | None = None

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu"
    ) -> HeadGANReenactor:
        run = load_headgan_run(checkpoint)
        return cls(
            run.generator,
            run.face_model,
            audio_stats=run.audio_stats,
            crop_scale=run.crop_scale,
            device=device,
        )

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def uses_audio(self) -> bool:
        return self.config.use_audio

    @property
    def audio_recognizer(self) -> str | None:
        """The speech recogniser the training features came from (None: the default)."""
        return (self.audio_stats.recognizer or None) if self.audio_stats is not None else None

    # --- the source -------------------------------------------------------------------------

    def prepare_source(
        self, image: str | os.PathLike | np.ndarray, *, what: str = "source image"
    ) -> SourceFace:
        """Track, crop and fit the source image, render ``x_ref``; it becomes the current source.

        Raises :class:`~neuralhead.errors.NoFaceError` when the tracker finds no face.
        """
        name = what if isinstance(image, np.ndarray) else f"{what} {Path(image).name}"
        full = load_image(image, what)
        with FaceMeshTracker(static=True) as tracker:
            landmarks = tracker.process(full)
        if landmarks is None:
            raise NoFaceError(f"no face found in the {name}")
        centre, size = crops.face_centres_and_sizes(landmarks[None])
        # The same box a tracked crop of a one-frame clip gets (no smoothing to do).
        box = crops.tracked_boxes(centre, size, fps=1.0, scale=self.crop_scale)[0]
        s = self.image_size
        crop = crops.crop_frame(full, box, s)
        fit = fit_frames(
            self.face_model,
            crops.landmarks_to_crop(landmarks, box, s)[None],
            s,
            bound=self.fit_bound,
        )
        return self.source_from_parameters(
            crop, fit.identity[0], fit.expression[0], fit.camera[0], box=box, full_image=full
        )

    def source_from_parameters(
        self,
        crop: np.ndarray,
        identity: torch.Tensor | np.ndarray,
        expression: torch.Tensor | np.ndarray,
        camera: torch.Tensor | np.ndarray,
        *,
        box: np.ndarray | None = None,
        full_image: np.ndarray | None = None,
    ) -> SourceFace:
        """A source from a head crop (RGB uint8, resized to the model's size) and its fit.

        It becomes the current source. Used where the parameters are already known (a
        compressed stream's reference) or were fitted elsewhere.
        """
        crop = load_image(crop, "reference crop")
        s = self.image_size
        if crop.shape[:2] != (s, s):
            interp = cv2.INTER_AREA if crop.shape[0] > s else cv2.INTER_LINEAR
            crop = cv2.resize(crop, (s, s), interpolation=interp)
        identity = self._vector("identity", identity, self.face_model.num_identity)
        expression = self._vector("expression", expression, self.face_model.num_expression)
        camera = self._vector("camera", camera, CAMERA_DIM)
        render = self._render(identity, expression[None], camera[None])
        source = SourceFace(
            image=to_tensor(crop).to(self.device),
            render=render,
            identity=identity,
            expression=expression,
            camera=camera,
            box=box,
            full_image=full_image,
        )
        self.use_source(source)
        return source

    def use_source(self, source: SourceFace) -> None:
        """Animate ``source`` from now on (and forget the previous frames' renders)."""
        self.source = source
        self.reset()

    def reset(self) -> None:
        """Start a new clip: the next frame has no predecessors."""
        self._history = None

    def _vector(self, name: str, value: torch.Tensor | np.ndarray, length: int) -> torch.Tensor:
        tensor = _tensor(value).to(self.device, torch.float32).reshape(-1)
        if tensor.numel() != length:
            raise InputError(f"{name} must have {length} values, got {tensor.numel()}")
        return tensor

    def _require_source(self) -> SourceFace:
        if self.source is None:
            raise InputError("no source image: call prepare_source(image) first")
        return self.source

    # --- driving ----------------------------------------------------------------------------

    def _render(
        self, identity: torch.Tensor, expression: torch.Tensor, camera: torch.Tensor
    ) -> torch.Tensor:
        shape = driving_shape(self.face_model, identity, expression)
        vertices = project(shape, camera, self.image_size)
        model = self.face_model
        return render_ncc(vertices, model.triangles, model.vertex_colors, self.image_size)

    def render(
        self, expression: torch.Tensor | np.ndarray, camera: torch.Tensor | np.ndarray
    ) -> torch.Tensor:
        """Driving renders ``(T, 3, S, S)``: the source's identity, these expressions (Eq. 1)."""
        source = self._require_source()
        expression, camera = self._driving_inputs(expression, camera)
        return self._render(source.identity, expression, camera)

    def _driving_inputs(
        self, expression: torch.Tensor | np.ndarray, camera: torch.Tensor | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        expression = _tensor(expression).to(self.device, torch.float32)
        camera = _tensor(camera).to(self.device, torch.float32)
        k = self.face_model.num_expression
        if expression.dim() != 2 or expression.shape[1] != k:
            raise InputError(f"expression must have shape (T, {k}), got {tuple(expression.shape)}")
        if camera.shape != (len(expression), CAMERA_DIM):
            raise InputError(
                f"camera must have shape ({len(expression)}, {CAMERA_DIM}), got {tuple(camera.shape)}"
            )
        return expression, camera

    def standardise_audio(self, features: np.ndarray) -> np.ndarray:
        """A whole clip's raw audio features ``(T, 300)`` standardised as training did.

        With the clip's own statistics, or the training statistics for a clip shorter than
        :data:`MIN_CLIP_FRAMES` frames (module docstring).
        """
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or features.shape[1] != self.config.audio_dim:
            raise InputError(
                f"audio features must have shape (T, {self.config.audio_dim}), got {features.shape}"
            )
        if self.audio_stats is None:
            raise InputError("this generator was trained without audio")
        stats = self.audio_stats
        if len(features) >= MIN_CLIP_FRAMES:
            stats = AudioStatistics.from_features(features, stats.recognizer)
        return stats.standardize(features)

    def neutral_audio(self, num_frames: int) -> np.ndarray:
        """Standardised features ``(T, 300)`` of an average sound: zeros (used for editing)."""
        return np.zeros((num_frames, self.config.audio_dim), np.float32)

    @torch.no_grad()
    def frames(
        self,
        expression: torch.Tensor | np.ndarray,
        camera: torch.Tensor | np.ndarray,
        audio: torch.Tensor | np.ndarray | None = None,
    ) -> torch.Tensor:
        """Generate ``(T, 3, S, S)`` images in [0, 1] for consecutive frames (Eq. 2).

        ``expression`` ``(T, K_exp)`` and ``camera`` ``(T, 7)`` (in the source crop's frame)
        drive the source; ``audio`` ``(T, 300)`` are standardised audio features
        (:meth:`standardise_audio`), required by audio models and refused by the others. The
        renders of the previous frames carry over between calls until :meth:`reset` or a new
        source.
        """
        source = self._require_source()
        expression, camera = self._driving_inputs(expression, camera)
        count = len(expression)
        if self.uses_audio and audio is None:
            raise InputError(
                "this generator uses audio: pass the frames' audio features "
                "(audio_features_for_video, then standardise_audio), or use a -noaudio model"
            )
        if not self.uses_audio and audio is not None:
            raise InputError("this generator was trained without audio: pass audio=None")
        features = None
        if audio is not None:
            features = _tensor(audio).to(self.device, torch.float32)
            if features.shape != (count, self.config.audio_dim):
                raise InputError(
                    f"audio must have shape ({count}, {self.config.audio_dim}), got {tuple(features.shape)}"
                )
        renders = self._render(source.identity, expression, camera)
        before = self.config.driving_frames - 1
        history = (
            self._history if self._history is not None else renders[:1].expand(before, -1, -1, -1)
        )
        sequence = torch.cat([history, renders])
        # Row t stacks the renders of frames t-2, t-1, t on channels (Sec. 3.3).
        driving = torch.cat([sequence[i : i + count] for i in range(before + 1)], dim=1)
        self._history = sequence[len(sequence) - before :] if before else None
        out = self.generator(
            driving,
            source.image.expand(count, -1, -1, -1),
            source.render.expand(count, -1, -1, -1),
            features,
        )
        return out["image"].clamp(0.0, 1.0)

    def frame(
        self,
        expression: torch.Tensor | np.ndarray,
        camera: torch.Tensor | np.ndarray,
        audio: torch.Tensor | np.ndarray | None = None,
    ) -> torch.Tensor:
        """One frame ``(3, S, S)``: :meth:`frames` for one ``expression`` and ``camera``."""
        audio_row = None if audio is None else _tensor(audio).reshape(1, -1)
        return self.frames(
            _tensor(expression).reshape(1, -1), _tensor(camera).reshape(1, -1), audio_row
        )[0]


# ---------------------------------------------------------------------------------- video


@dataclass
class ReenactResult:
    path: Path
    num_frames: int
    fps: float
    camera: str
    has_audio: bool


def _audio_source(driving: Path, audio: str | os.PathLike | None, has_track: bool) -> Path | None:
    if audio is not None:
        audio = Path(audio)
        if not audio.is_file():
            raise InputError(f"audio file not found: {audio}")
        return audio
    return driving if has_track else None


def generate_video(
    reenactor: HeadGANReenactor,
    expression: torch.Tensor,
    camera: torch.Tensor,
    audio_features: np.ndarray | None,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> Iterator[np.ndarray]:
    """RGB ``uint8`` crops, one per row, generated ``batch_size`` frames at a time."""
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    reenactor.reset()
    total = len(expression)
    with tqdm(total=total, desc="generating", unit="frame", disable=not progress) as bar:
        for start in range(0, total, batch_size):
            rows = slice(start, min(start + batch_size, total))
            audio = None if audio_features is None else audio_features[rows]
            images = reenactor.frames(expression[rows], camera[rows], audio)
            for image in images:
                yield to_uint8(image, (0.0, 1.0))
            bar.update(rows.stop - rows.start)


def reenact_video(
    checkpoint: str | os.PathLike,
    source_image: str | os.PathLike | np.ndarray,
    driving_video: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    camera: str = "relative",
    audio: str | os.PathLike | None = None,
    paste_back: bool = False,
    side_by_side: bool = False,
    momentum: float = DEFAULT_MOMENTUM,
    batch_size: int = 8,
    max_frames: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> ReenactResult:
    """Animate ``source_image`` with the head motion, expressions and sound of ``driving_video``.

    ``camera``: ``"relative"`` or ``"absolute"`` head rotation
    (:func:`neuralhead.headgan.driving.driving_parameters`). ``audio``: an audio file to use
    instead of the driving video's sound (features and output sound). ``paste_back`` writes
    the full source image with the generated head blended in (:class:`PasteBack`) instead of
    the crop; ``side_by_side`` puts the driver's head crop left of the output. The output is
    an mp4 marked as synthetic media, with the driving sound when there is one.
    """
    if camera not in CAMERA_MODES:
        raise InputError(f"camera must be 'relative' or 'absolute', got {camera!r}")
    driving_video = Path(driving_video)
    out = Path(out_path)
    reenactor = HeadGANReenactor.from_checkpoint(checkpoint, device=device)
    source = reenactor.prepare_source(source_image)
    info = probe_video(driving_video)
    sound_path = _audio_source(driving_video, audio, info.has_audio)
    if reenactor.uses_audio and sound_path is None:
        raise InputError(
            f"this HeadGAN model uses audio but {driving_video.name} has no sound: pass --audio "
            "FILE, or use a model trained without audio (-noaudio preset)"
        )
    tracked = track_video(
        driving_video,
        reenactor.face_model,
        max_frames=max_frames,
        bound=reenactor.fit_bound,
        progress=progress,
    )
    params = driving_parameters(
        tracked.expression, tracked.camera, source.camera.cpu(), mode=camera, momentum=momentum
    )
    num_frames = len(params)
    features = None
    if reenactor.uses_audio:
        features = reenactor.standardise_audio(
            audio_features_for_video(
                sound_path, tracked.fps, num_frames, recognizer=reenactor.audio_recognizer
            )
        )
    sound = load_sound(sound_path, num_frames, tracked.fps)

    paste = PasteBack(source.full_image, source.box) if paste_back else None
    driver_boxes = tracked.crop_boxes("track", reenactor.crop_scale) if side_by_side else None
    out.parent.mkdir(parents=True, exist_ok=True)
    frames = generate_video(
        reenactor,
        params.expression,
        params.camera,
        features,
        batch_size=batch_size,
        progress=progress,
    )
    source_name = "an image" if isinstance(source_image, np.ndarray) else Path(source_image).name
    description = (
        f"HeadGAN {Path(checkpoint).name}: {source_name} driven by {driving_video.name} "
        f"({camera} camera)"
    )
    with (
        VideoWriter(
            out,
            tracked.fps,
            audio=sound,
            audio_sample_rate=OUTPUT_AUDIO_RATE if sound is not None else None,
            generator="neuralhead headgan",
            description=description,
        ) as writer,
        VideoReader(driving_video) if side_by_side else contextlib.nullcontext() as reader,
    ):
        driver_frames = iter(reader) if reader is not None else None
        for index, image in enumerate(frames):
            if paste is not None:
                image = paste(image)
            if driver_frames is not None:
                driver = crops.crop_frame(next(driver_frames), driver_boxes[index], image.shape[0])
                image = np.concatenate([driver, image], axis=1)
            writer.write(image)
    return ReenactResult(out, num_frames, tracked.fps, camera, sound is not None)
