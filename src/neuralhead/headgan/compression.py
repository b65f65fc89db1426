"""Talking-head video compression with HeadGAN (Sec. 3.4).

The sender fits the face model to every frame and sends 35 numbers per frame, the expression
``p_exp`` (28) and the camera ``c`` (7); the receiver renders the 3D face with the identity of
a reference image sent once at the start and lets the generator reconstruct the frame.

**Encoding** (:func:`encode_video`). The video is tracked and fitted once
(:func:`neuralhead.headgan.driving.track_video`). One crop box for the whole clip
(:func:`neuralhead.tracking.crop.fixed_box`: a conference camera is still, so head motion stays
in the cameras and the background stays put) defines the frame of reference of every camera
and of the reference image, a crop of one frame of the video. The stream holds the reference's
identity, expression and camera, so the receiver needs no face tracker, and, by default, the
reference crop itself as a PNG.

**File format** ``.nhc`` (version 1), little-endian::

    offset  type                 field
    0       4 bytes              magic b"NHGC"
    4       uint16               format version (1)
    6       uint16               flags: bit 0 = frame values are float16 (else float32),
                                 bit 1 = a reference PNG is embedded
    8       float64              fps
    16      uint32               number of frames N
    20      uint16               side S of the square reference crop, pixels
    22      uint16               K_exp, expression values per frame (28 by default)
    24      uint16               K_id, identity values of the reference
    26      uint16               camera values per frame (7)
    28      32 bytes             SHA-256 of the face model (:func:`face_model_hash`)
    60      uint32               index of the video frame the reference was cropped from
    64      uint32               length L of the embedded PNG (0 when none)
    68      float32[K_id+K_exp+7] the reference's identity, expression and camera
    ...     L bytes              PNG of the reference crop (S x S, RGB)
    ...     N rows               per frame: K_exp expression values, then the 7 camera values
                                 (scale, pitch, yaw, roll, tx, ty, tz), float16 or float32

Cameras are in normalised coordinates of the crop (:func:`neuralhead.headgan.fitting.project`),
so they hold for any image size. Values are float16 by default (our choice): 2 bytes x 35 =
70 bytes a frame, 1750 bytes (14 kbit) a second at 25 fps; rounding moves a camera
translation by at most 1/2048 of the crop (0.06 pixels at 256), an expression coefficient by
at most 1/2048 of its value. float32 doubles the size. The header (68 bytes, the reference's
parameters and the PNG) is sent once.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from neuralhead.errors import InputError
from neuralhead.fileio import write_atomic
from neuralhead.headgan.audio_features import audio_features_for_video
from neuralhead.headgan.driving import camera_to_crop, track_video
from neuralhead.headgan.face_model import MorphableModel
from neuralhead.headgan.fitting import CAMERA_DIM, adapt_camera
from neuralhead.headgan.reenact import HeadGANReenactor, generate_video, load_face_model
from neuralhead.inference.common import OUTPUT_AUDIO_RATE, load_sound
from neuralhead.media.video import VideoReader, VideoWriter, probe_video
from neuralhead.tracking import crop as crops

MAGIC = b"NHGC"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sHHdIHHHH32sII")
_FLAG_FLOAT16 = 1
_FLAG_PNG = 2
PRECISIONS = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def face_model_hash(model: MorphableModel) -> bytes:
    """SHA-256 of a face model's mean and bases as little-endian float32 (32 bytes).

    Sender and receiver must render with the same model; a stream names the one it was encoded
    with so that a mismatch is caught instead of producing a wrong face.
    """
    digest = hashlib.sha256()
    for array in (model.mean, model.identity_basis, model.expression_basis):
        values = array.detach().cpu().numpy().astype("<f4")
        digest.update(np.asarray(values.shape, "<i8").tobytes())
        digest.update(values.tobytes())
    return digest.digest()


@dataclass
class StreamHeader:
    """The header of a ``.nhc`` stream (see the module docstring)."""

    fps: float
    num_frames: int
    image_size: int
    face_model_sha256: bytes
    reference_frame: int
    reference_identity: np.ndarray  # (K_id,)
    reference_expression: np.ndarray  # (K_exp,)
    reference_camera: np.ndarray  # (7,)
    reference_png: bytes = b""
    precision: str = "float16"
    version: int = FORMAT_VERSION

    @property
    def num_expression(self) -> int:
        return len(self.reference_expression)

    @property
    def num_identity(self) -> int:
        return len(self.reference_identity)

    @property
    def values_per_frame(self) -> int:
        """K_exp + 7: 35 with the paper's 28 expression components."""
        return self.num_expression + CAMERA_DIM

    @property
    def bytes_per_value(self) -> int:
        return PRECISIONS[self.precision].itemsize

    @property
    def bytes_per_frame(self) -> int:
        return self.values_per_frame * self.bytes_per_value

    @property
    def bytes_per_second(self) -> float:
        """Bytes of frame data a second: values per frame x bytes per value x fps."""
        return self.bytes_per_frame * self.fps

    @property
    def size(self) -> int:
        """Bytes of the header itself, reference PNG included."""
        return (
            _FIXED.size + 4 * (self.num_identity + self.values_per_frame) + len(self.reference_png)
        )


@dataclass
class CompressedStream:
    """A decoded ``.nhc`` file: its header and the per-frame values ``(N, K_exp + 7)``."""

    header: StreamHeader
    values: np.ndarray = field(repr=False)

    @property
    def expression(self) -> np.ndarray:
        return self.values[:, : self.header.num_expression]

    @property
    def camera(self) -> np.ndarray:
        return self.values[:, self.header.num_expression :]


def _check_header(header: StreamHeader) -> None:
    if header.precision not in PRECISIONS:
        raise InputError(f"precision must be float16 or float32, got {header.precision!r}")
    if not header.fps > 0 or header.image_size <= 0 or header.num_frames < 0:
        raise InputError("fps and image size must be positive and the frame count >= 0")
    if len(header.face_model_sha256) != 32:
        raise InputError("the face model hash must be 32 bytes (SHA-256)")
    if len(header.reference_camera) != CAMERA_DIM:
        raise InputError(f"the reference camera must have {CAMERA_DIM} values")
    if max(header.num_expression, header.num_identity, header.image_size) > 0xFFFF:
        raise InputError("image size and coefficient counts must fit in 16 bits")


def write_stream(path: str | os.PathLike, header: StreamHeader, values: np.ndarray) -> int:
    """Write a ``.nhc`` file atomically; returns its size in bytes."""
    _check_header(header)
    values = np.asarray(values, np.float32)
    if values.shape != (header.num_frames, header.values_per_frame):
        raise InputError(
            f"values must have shape ({header.num_frames}, {header.values_per_frame}), got {values.shape}"
        )
    stored = values.astype(PRECISIONS[header.precision])
    if not np.isfinite(stored).all():
        raise InputError(f"frame values do not fit in {header.precision} (or are not finite)")
    flags = (_FLAG_FLOAT16 if header.precision == "float16" else 0) | (
        _FLAG_PNG if header.reference_png else 0
    )
    fixed = _FIXED.pack(
        MAGIC,
        header.version,
        flags,
        float(header.fps),
        header.num_frames,
        header.image_size,
        header.num_expression,
        header.num_identity,
        CAMERA_DIM,
        header.face_model_sha256,
        header.reference_frame,
        len(header.reference_png),
    )
    reference = np.concatenate(
        [header.reference_identity, header.reference_expression, header.reference_camera]
    ).astype("<f4")
    payload = b"".join([fixed, reference.tobytes(), header.reference_png, stored.tobytes()])

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)

    write_atomic(path, write)
    return len(payload)


def read_stream(path: str | os.PathLike) -> CompressedStream:
    """Read and check a ``.nhc`` file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"stream file not found: {path}")
    data = path.read_bytes()
    if len(data) < _FIXED.size or data[:4] != MAGIC:
        raise InputError(f"{path} is not a HeadGAN stream (.nhc): wrong magic number")
    (_, version, flags, fps, num_frames, size, k_exp, k_id, cam_dim, sha, ref_frame, png_len) = (
        _FIXED.unpack_from(data)
    )
    if version > FORMAT_VERSION:
        raise InputError(
            f"{path} is format version {version}; this neuralhead reads up to {FORMAT_VERSION}"
        )
    if cam_dim != CAMERA_DIM:
        raise InputError(f"{path} has {cam_dim} camera values per frame, expected {CAMERA_DIM}")
    precision = "float16" if flags & _FLAG_FLOAT16 else "float32"
    offset = _FIXED.size
    reference_count = k_id + k_exp + CAMERA_DIM
    frame_bytes = num_frames * (k_exp + CAMERA_DIM) * PRECISIONS[precision].itemsize
    expected = offset + 4 * reference_count + png_len + frame_bytes
    if len(data) != expected:
        raise InputError(
            f"{path} is truncated or corrupt: {len(data)} bytes, the header announces {expected}"
        )
    reference = np.frombuffer(data, "<f4", reference_count, offset).astype(np.float32)
    offset += 4 * reference_count
    png = data[offset : offset + png_len]
    offset += png_len
    values = np.frombuffer(data, PRECISIONS[precision], num_frames * (k_exp + CAMERA_DIM), offset)
    header = StreamHeader(
        fps=fps,
        num_frames=num_frames,
        image_size=size,
        face_model_sha256=sha,
        reference_frame=ref_frame,
        reference_identity=reference[:k_id],
        reference_expression=reference[k_id : k_id + k_exp],
        reference_camera=reference[k_id + k_exp :],
        reference_png=png,
        precision=precision,
        version=version,
    )
    return CompressedStream(
        header, values.astype(np.float32).reshape(num_frames, k_exp + CAMERA_DIM)
    )


# ---------------------------------------------------------------------------------- encode


@dataclass
class EncodeResult:
    """What :func:`encode_video` wrote, with the sizes to compare.

    ``bytes_per_second`` is the stream's frame data (values x bytes x fps; the header is sent
    once); ``video_bytes_per_second`` is the input file's size over its duration (H.264 video
    and whatever audio it carries).
    """

    path: Path
    num_frames: int
    fps: float
    stream_bytes: int
    header_bytes: int
    bytes_per_second: float
    video_bytes: int
    video_bytes_per_second: float

    @property
    def kilobits_per_second(self) -> float:
        return 8.0 * self.bytes_per_second / 1000.0

    @property
    def ratio(self) -> float:
        """How many times smaller the stream's frame data is than the input video."""
        return self.video_bytes_per_second / self.bytes_per_second


def _frame(video: Path, index: int) -> np.ndarray:
    with VideoReader(video) as reader:
        for i, frame in enumerate(reader):
            if i == index:
                return frame
    raise InputError(f"{video.name} has no frame {index}")


def encode_video(
    video: str | os.PathLike,
    face_model: MorphableModel | str | os.PathLike,
    out: str | os.PathLike,
    *,
    reference_frame: int = 0,
    image_size: int = 256,
    precision: str = "float16",
    embed_reference: bool = True,
    crop_scale: float = crops.DEFAULT_CROP_SCALE,
    bound: float = 3.0,
    max_frames: int | None = None,
    progress: bool = True,
) -> EncodeResult:
    """Compress a talking-head video into a ``.nhc`` stream of 35 numbers a frame (Sec. 3.4).

    ``face_model``: a :class:`MorphableModel`, a HeadGAN checkpoint or a ``face_model.npz``.
    ``reference_frame``: the frame whose crop (``image_size`` pixels) is the reference.
    ``precision``: ``"float16"`` or ``"float32"`` frame values. Returns the sizes next to the
    input's (:class:`EncodeResult`).
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be float16 or float32, got {precision!r}")
    if reference_frame < 0:
        raise InputError(f"reference_frame must be >= 0, got {reference_frame}")
    video = Path(video)
    model = face_model if isinstance(face_model, MorphableModel) else load_face_model(face_model)
    tracked = track_video(video, model, max_frames=max_frames, bound=bound, progress=progress)
    if reference_frame >= len(tracked):
        raise InputError(
            f"reference frame {reference_frame} is past the {len(tracked)} frames encoded"
        )
    box = tracked.crop_boxes("fixed", crop_scale)[0]
    cameras = camera_to_crop(tracked.camera, box, tracked.canvas_size).astype(np.float32)
    png = b""
    if embed_reference:
        crop = crops.crop_frame(_frame(video, reference_frame), box, image_size)
        ok, encoded = cv2.imencode(".png", crop[:, :, ::-1])
        if not ok:
            raise InputError("could not encode the reference crop as PNG")
        png = encoded.tobytes()
    header = StreamHeader(
        fps=tracked.fps,
        num_frames=len(tracked),
        image_size=image_size,
        face_model_sha256=face_model_hash(model),
        reference_frame=reference_frame,
        reference_identity=tracked.identity[reference_frame],
        reference_expression=tracked.expression[reference_frame],
        reference_camera=cameras[reference_frame],
        reference_png=png,
        precision=precision,
    )
    values = np.concatenate([tracked.expression, cameras], axis=1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stream_bytes = write_stream(out, header, values)
    info = probe_video(video)
    duration = info.duration or (info.num_frames or len(tracked)) / info.fps
    video_bytes = video.stat().st_size
    return EncodeResult(
        path=out,
        num_frames=len(tracked),
        fps=tracked.fps,
        stream_bytes=stream_bytes,
        header_bytes=header.size,
        bytes_per_second=header.bytes_per_second,
        video_bytes=video_bytes,
        video_bytes_per_second=video_bytes / duration,
    )


# ---------------------------------------------------------------------------------- decode


@dataclass
class DecodeResult:
    path: Path
    num_frames: int
    fps: float
    has_audio: bool


def _cameras_for_new_reference(
    stream: CompressedStream, reference_camera: torch.Tensor
) -> torch.Tensor:
    """The stream's cameras moved from its reference's crop onto another reference image's.

    Scale and translation keep their offsets from the stream's reference camera, rescaled to
    the new reference's size; rotations stay absolute. That is
    :func:`~neuralhead.headgan.fitting.adapt_camera` with a fixed average (``momentum=1``)
    anchored on the stream's reference camera, given to it as an extra first frame.
    """
    anchored = np.concatenate([stream.header.reference_camera[None], stream.camera])
    moved = adapt_camera(torch.from_numpy(anchored), reference_camera.cpu(), momentum=1.0)
    return moved[1:]


def decode(
    stream: str | os.PathLike,
    reference_image: str | os.PathLike | np.ndarray | None,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    audio: str | os.PathLike | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
) -> DecodeResult:
    """Reconstruct the video of a ``.nhc`` stream with the HeadGAN at ``checkpoint``.

    ``reference_image``: None uses the stream's embedded reference crop and its parameters
    as sent; an image of the same person is tracked and fitted, and the stream's cameras are
    moved onto it (:func:`_cameras_for_new_reference`). ``audio``: the sound of the clip
    (the stream carries none), needed by audio models and muxed into the output. Writes an
    mp4 marked as synthetic media.
    """
    data = read_stream(stream)
    header = data.header
    if header.num_frames == 0:
        raise InputError(f"{stream} holds no frames")
    reenactor = HeadGANReenactor.from_checkpoint(checkpoint, device=device)
    model = reenactor.face_model
    if face_model_hash(model) != header.face_model_sha256:
        raise InputError(
            f"{stream} was encoded with another face model than the one of {checkpoint}; "
            "decode it with the checkpoint whose face model encoded it"
        )
    sound_path = None
    if audio is not None:
        sound_path = Path(audio)
        if not sound_path.is_file():
            raise InputError(f"audio file not found: {sound_path}")
    if reenactor.uses_audio and sound_path is None:
        raise InputError(
            "this HeadGAN model uses audio and the stream carries none: pass --audio FILE "
            "with the clip's sound, or decode with a model trained without audio"
        )
    if reference_image is None:
        if not header.reference_png:
            raise InputError(f"{stream} embeds no reference image: pass --reference IMAGE")
        bgr = cv2.imdecode(np.frombuffer(header.reference_png, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(f"the reference PNG embedded in {stream} is corrupt")
        reenactor.source_from_parameters(
            bgr[:, :, ::-1],
            header.reference_identity,
            header.reference_expression,
            header.reference_camera,
        )
        cameras = torch.from_numpy(data.camera)
    else:
        source = reenactor.prepare_source(reference_image, what="reference image")
        cameras = _cameras_for_new_reference(data, source.camera)
    features = None
    if reenactor.uses_audio:
        features = reenactor.standardise_audio(
            audio_features_for_video(
                sound_path, header.fps, header.num_frames, recognizer=reenactor.audio_recognizer
            )
        )
    sound = load_sound(sound_path, header.num_frames, header.fps)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frames = generate_video(
        reenactor,
        torch.from_numpy(data.expression),
        cameras,
        features,
        batch_size=batch_size,
        progress=progress,
    )
    with VideoWriter(
        out,
        header.fps,
        audio=sound,
        audio_sample_rate=OUTPUT_AUDIO_RATE if sound is not None else None,
        generator="neuralhead headgan",
        description=f"HeadGAN reconstruction of the stream {Path(stream).name}",
    ) as writer:
        for image in frames:
            writer.write(image)
    return DecodeResult(out, header.num_frames, header.fps, sound is not None)
