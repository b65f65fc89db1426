"""EMOPortraits inference: a photo driven by a video, by speech alone, or by both.

**By a video** the main model works as the MegaPortraits base model does (same classes,
128-d expression space): :func:`reenact` hands the work to
:func:`neuralhead.megaportraits.reenact.reenact_video` with all its pose controls.

**By speech alone** (main paper Sec. 5, supplementary Sec. 2-3): the audio is cut into video
frames at ``fps`` (25 by default), one frame per ``1 / fps`` seconds until the sound ends, so
the video lasts as long as the audio (to within one frame). Each frame's audio embedding
(:mod:`.audio_embedding`) drives

* the expression: E_aud (:class:`~neuralhead.emoportraits.audio_encoder.SpeechExpressionEncoder`)
  predicts ``z-hat_t`` for every frame from the source photo's own expression code ``z_s``
  (the "first frame" of supplementary 2.1) and the embeddings;
* the head motion: the rotation generator (:mod:`.rotation_generator`) predicts rotation and
  translation relative to the first frame, applied from the source photo's pose, so the head
  starts where the photo has it, low-pass filtered over ``smoothing`` frames (2 by default)
  and with drift slower than a few seconds removed (see
  :func:`~neuralhead.emoportraits.rotation_generator.generate_head_motion`). Without a
  rotation generator the head keeps the photo's pose.

Explicit ``yaw`` / ``pitch`` / ``roll`` (degrees) replace the driven angle, as for video.

**By both** (pose from the video, mouth from the audio): the video is tracked and read as for
video driving; E_aud runs from the first driver frame's code over the audio resampled to the
video's frames, and the first ``mouth_components`` coefficients of each frame's code in the
mouth PCA basis saved with the speech encoder (Sec. 5.2) are taken from the audio's code,
the rest from the video's (:meth:`~neuralhead.emoportraits.latent_space.ExpressionPCA.replace_components`).
Without a basis the audio's code replaces the video's whole. The video has the driver's
frame count and rate; the sound is the given audio's.

Every output is an mp4 marked as synthetic media (container metadata) and carries the
driving sound.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from neuralhead.emoportraits.audio_embedding import SAMPLE_RATE, load_audio_embedder
from neuralhead.emoportraits.checkpoints import (
    ROTATION_SUBDIR,
    SPEECH_SUBDIR,
    main_model_directory,
    require_saved,
)
from neuralhead.errors import InputError
from neuralhead.inference.common import OUTPUT_AUDIO_RATE, PasteBack, load_sound
from neuralhead.media.audio import load_audio
from neuralhead.media.video import VideoWriter
from neuralhead.megaportraits.background import BackgroundCompositor
from neuralhead.megaportraits.base_model import DriverMotion, MegaPortraitsBase, Pose
from neuralhead.megaportraits.reenact import (
    MegaPortraitsReenactor,
    PoseControl,
    ReenactResult,
    _source_plate,
    driver_crops,
    driving_pose,
    reenact_video,
    track_driver,
)
from neuralhead.tracking import crop as crops
from neuralhead.visualize import to_uint8

#: Frame rate of speech-only output (VoxCeleb2's, which the models are trained on).
DEFAULT_FPS = 25.0
#: Sigma (frames) of the Gaussian filter on head motion generated from speech: the raw
#: generator output is jerkier than real head motion (docs/results.md), a 2-frame filter
#: brings its angular acceleration to the real motion's order.
DEFAULT_SMOOTHING = 2.0
#: Mouth components taken from the audio when driving by video and audio (L_PCA's n, Sec. 2.3).
MOUTH_COMPONENTS = 8
MOUTH_BASIS_FILE = "mouth_basis.safetensors"


def load_speech_model(path: str | os.PathLike, *, map_location: str = "cpu"):
    """E_aud of a speech run (or saved encoder) and its mouth PCA basis (None if absent)."""
    from neuralhead.emoportraits.audio_encoder import SpeechExpressionEncoder
    from neuralhead.emoportraits.latent_space import ExpressionPCA

    directory = require_saved(path, (SPEECH_SUBDIR,), SpeechExpressionEncoder, "speech encoder")
    encoder = SpeechExpressionEncoder.from_pretrained(directory, map_location=map_location)
    basis_file = directory / MOUTH_BASIS_FILE
    basis = ExpressionPCA.load(basis_file) if basis_file.is_file() else None
    return encoder.eval(), basis


def load_rotation_model(path: str | os.PathLike, *, map_location: str = "cpu"):
    """The head-rotation generator of a rotation run (or a saved generator)."""
    from neuralhead.emoportraits.rotation_generator import RotationGenerator

    directory = require_saved(path, (ROTATION_SUBDIR,), RotationGenerator, "rotation generator")
    return RotationGenerator.from_pretrained(directory, map_location=map_location).eval()


def _embeddings(
    spec: str,
    expected_dim: int,
    wave: np.ndarray,
    num_frames: int,
    fps: float,
    device: str,
    what: str,
) -> torch.Tensor:
    embedder = load_audio_embedder(spec, device=device)
    if embedder.dim != expected_dim:
        raise InputError(
            f"the {what} was trained on {expected_dim}-d audio embeddings; {spec!r} gives "
            f"{embedder.dim}: pass the audio embedder it was trained with"
        )
    return embedder.embed(wave, SAMPLE_RATE, num_frames, fps).float()


def pose_from_vector(model: MegaPortraitsBase, vector: torch.Tensor) -> Pose:
    """The base model's pose dict for poses ``(T, 6)`` in the tracker's layout (pitch, yaw,
    roll, tx, ty, tz), as :class:`~neuralhead.megaportraits.motion_encoder.HeadPoseNetwork`
    gives it."""
    mean_log_scale = model.head_pose.pose_mean[5].to(vector)
    return {
        "rotation": vector[:, :3],
        "translation": F.pad(vector[:, 3:5], (0, 1)),
        "scale": (vector[:, 5:6] - mean_log_scale).exp(),
        "log_scale": vector[:, 5:6],
    }


@torch.no_grad()
def speech_expressions(encoder, embeddings: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """E_aud's codes ``(T, d)`` for embeddings ``(T, A)`` from the first frame's ``z0`` ``(d,)``."""
    if z0.shape[-1] != encoder.config.expression_dim:
        raise InputError(
            f"the speech encoder predicts {encoder.config.expression_dim}-d codes, the main model "
            f"uses {z0.shape[-1]}: train it with this main model"
        )
    return encoder(embeddings[None].to(z0), z0.reshape(1, -1))[0]


def _check_modes(driving_video, audio, speech_model, rotation_model) -> str:
    if driving_video is None and audio is None:
        raise InputError("give a driving video, an audio file, or both")
    if audio is not None and speech_model is None:
        raise InputError(
            "driving by audio needs a speech encoder: train one with `neuralhead train "
            "emoportraits-speech` and pass it with --speech-model"
        )
    if audio is None and speech_model is not None:
        raise InputError("--speech-model is read only when driving by --audio")
    if driving_video is not None and rotation_model is not None:
        raise InputError(
            "--rotation-model drives the head from speech alone: with a driving video the "
            "head follows the video"
        )
    if driving_video is None:
        return "audio"
    return "video" if audio is None else "both"


def reenact(
    checkpoint: str | os.PathLike,
    source_image: str | os.PathLike | np.ndarray,
    out_path: str | os.PathLike,
    *,
    driving_video: str | os.PathLike | None = None,
    audio: str | os.PathLike | None = None,
    speech_model: str | os.PathLike | None = None,
    rotation_model: str | os.PathLike | None = None,
    audio_embedder: str | None = None,
    fps: float = DEFAULT_FPS,
    motion: str | None = None,
    scale: str | None = None,
    yaw: float | None = None,
    pitch: float | None = None,
    roll: float | None = None,
    smoothing: float = DEFAULT_SMOOTHING,
    mouth_components: int = MOUTH_COMPONENTS,
    paste_back: bool = False,
    background: bool = True,
    crop_scale: float = crops.DEFAULT_CROP_SCALE,
    batch_size: int = 4,
    max_frames: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> ReenactResult:
    """Animate ``source_image`` by ``driving_video``, by ``audio``, or by both (module docstring).

    ``checkpoint``: the main model (an EMOPortraits run or saved model). ``speech_model``:
    an E_aud run (``neuralhead train emoportraits-speech``), needed with ``audio``;
    ``rotation_model``: a rotation-generator run (``neuralhead train emoportraits-rotation``)
    for head motion from speech alone. ``audio_embedder`` overrides the embedder spec the
    speech / rotation models recorded (e.g. ``whisper:PATH`` where Whisper lives on this
    machine). ``fps``: frame rate of speech-only output. ``motion`` and ``scale`` apply to
    video driving (:func:`~neuralhead.megaportraits.reenact.reenact_video`); ``yaw``,
    ``pitch``, ``roll`` (degrees) to every mode; ``smoothing``: sigma in frames of a Gaussian
    filter on generated head motion (0: the generator's raw output).
    """
    mode = _check_modes(driving_video, audio, speech_model, rotation_model)
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    if paste_back and not background:
        raise InputError("paste_back needs the background: the generated crop has none of its own")
    if not fps > 0:
        raise InputError(f"fps must be positive, got {fps}")
    if mode == "video":
        return reenact_video(
            main_model_directory(checkpoint),
            source_image,
            driving_video,
            out_path,
            motion=motion,
            scale=scale,
            yaw=yaw,
            pitch=pitch,
            roll=roll,
            paste_back=paste_back,
            background=background,
            crop_scale=crop_scale,
            batch_size=batch_size,
            max_frames=max_frames,
            device=device,
            progress=progress,
        )
    if mode == "audio" and (motion is not None or scale is not None):
        raise InputError(
            "--motion and --scale apply to video driving; speech drives the head itself"
        )

    from neuralhead.emoportraits.checkpoints import load_main_model

    reenactor = MegaPortraitsReenactor(
        load_main_model(checkpoint), crop_scale=crop_scale, device=device
    )
    base = reenactor.base
    source = reenactor.prepare_source(source_image)
    encoder, mouth_basis = load_speech_model(speech_model)
    encoder.to(reenactor.device)
    audio = Path(audio)
    wave = load_audio(audio, SAMPLE_RATE)
    if len(wave) == 0:
        raise InputError(f"{audio.name} has no sound")

    track = None
    if mode == "audio":
        num_frames = max(1, math.ceil(len(wave) / SAMPLE_RATE * fps))
        if max_frames is not None:
            num_frames = min(num_frames, max_frames)
    else:
        track = track_driver(
            driving_video, crop_scale=crop_scale, max_frames=max_frames, progress=progress
        )
        num_frames, fps = len(track), track.fps
    spec = audio_embedder or encoder.config.embedder
    speech = _embeddings(
        spec, encoder.config.audio_dim, wave, num_frames, fps, device, "speech encoder"
    )

    poses = None
    if mode == "audio":
        z_hat = speech_expressions(encoder, speech.to(reenactor.device), source.state.z_s[0])
        with torch.no_grad():
            reference = base.head_pose.predict(source.image)[0]
        if rotation_model is not None:
            from neuralhead.emoportraits.rotation_generator import generate_head_motion

            generator = load_rotation_model(rotation_model).to(reenactor.device)
            rotation_spec = audio_embedder or generator.config.embedder
            rotation_audio = (
                speech
                if rotation_spec == spec
                else _embeddings(
                    rotation_spec,
                    generator.config.audio_dim,
                    wave,
                    num_frames,
                    fps,
                    device,
                    "rotation generator",
                )
            )
            with torch.no_grad():
                vectors = generate_head_motion(
                    generator,
                    rotation_audio.to(reenactor.device),
                    reference_pose=reference,
                    smoothing=smoothing,
                )
        else:
            vectors = reference.expand(num_frames, 6)
        control = PoseControl(motion="absolute", scale="driver", pitch=pitch, yaw=yaw, roll=roll)
        poses = driving_pose(
            source.state.pose, pose_from_vector(base, vectors.to(reenactor.device)), control
        )
        described = "expression from speech, " + (
            "head motion from speech" if rotation_model is not None else "the photo's head pose"
        )
    else:
        z_hat = None  # computed from the first driver frame's code
        control = PoseControl(
            motion=motion or "relative", scale=scale or "source", pitch=pitch, yaw=yaw, roll=roll
        )
        described = "pose and expression from the video, " + (
            f"the first {mouth_components} mouth components from speech"
            if mouth_basis is not None
            else "expression code from speech"
        )

    sound = load_sound(audio, num_frames, fps)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = reenactor.output_size
    paste = PasteBack(source.full_image, source.box) if paste_back else None
    compositor = BackgroundCompositor(_source_plate(source, size)) if background else None
    source_name = "an image" if isinstance(source_image, np.ndarray) else Path(source_image).name
    driven_by = audio.name if mode == "audio" else f"{Path(driving_video).name} and {audio.name}"
    description = (
        f"EMOPortraits {Path(checkpoint).name}: {source_name} driven by {driven_by} ({described})"
    )
    written = (0, 0)
    with (
        compositor if compositor is not None else contextlib.nullcontext(),
        VideoWriter(
            out,
            fps,
            audio=sound,
            audio_sample_rate=OUTPUT_AUDIO_RATE,
            generator="neuralhead emoportraits",
            description=description,
        ) as writer,
        tqdm(total=num_frames, desc="generating", unit="frame", disable=not progress) as bar,
    ):
        if mode == "audio":
            batches = (
                (None, slice(start, min(start + batch_size, num_frames)))
                for start in range(0, num_frames, batch_size)
            )
        else:
            batches = (
                (crops_batch, None)
                for crops_batch in driver_crops(
                    driving_video, track.boxes, reenactor.input_size, batch_size=batch_size
                )
            )
        done = 0
        for crop_batch, frames in batches:
            with torch.no_grad():
                if crop_batch is None:
                    motion_now = DriverMotion(
                        pose={k: v[frames] for k, v in poses.items()}, z_d=z_hat[frames]
                    )
                else:
                    driver = torch.from_numpy(crop_batch).permute(0, 3, 1, 2).float() / 255.0
                    motion_now = reenactor.motion(driver, control)
                    if z_hat is None:
                        z_hat = speech_expressions(
                            encoder, speech.to(reenactor.device), motion_now.z_d[0]
                        )
                    z_audio = z_hat[done : done + len(crop_batch)]
                    z_mixed = (
                        mouth_basis.replace_components(motion_now.z_d, z_audio, mouth_components)
                        if mouth_basis is not None
                        else z_audio
                    )
                    motion_now = DriverMotion(pose=motion_now.pose, z_d=z_mixed.to(motion_now.z_d))
                images = base.render(source.state, motion_now)["image"].clamp(0.0, 1.0)
            if compositor is not None:
                images = compositor(images)
            for image in images:
                frame = to_uint8(image, (0.0, 1.0))
                if paste is not None:
                    frame = paste(frame)
                writer.write(frame)
                written = (frame.shape[1], frame.shape[0])
            done += len(images)
            bar.update(len(images))
    return ReenactResult(out, num_frames, fps, written, described, sound is not None)
