"""``neuralhead prepare``: a talking-head video → a prepared dataset directory.

Two streaming passes over the video keep memory constant whatever its length:

1. **Tracking.** Every frame goes through the face mesh tracker (478 landmarks with iris);
   landmarks are appended to a file on disk. Frames without a face are flagged and their
   landmarks interpolated from the nearest frames with one; a clip where most frames have no
   face stops with an error.
2. **Cropping.** From all landmarks the crop is chosen (:mod:`neuralhead.tracking.crop`),
   then the video is decoded again and each frame's crop and foreground mask are written.

Between the passes, per-frame parameters are computed chunk by chunk: head pose (similarity
fit against the canonical template), template-space landmarks, the expression basis (PCA
over the training frames) and coefficients, and gaze. The audio track is resampled to
16 kHz and turned into per-frame feature windows (DNP Sec. 3.3) by a pluggable extractor.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from neuralhead import __version__
from neuralhead.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FRAME_PATTERN,
    MASK_PATTERN,
    META,
    DatasetFiles,
)
from neuralhead.errors import InputError, NoFaceError
from neuralhead.features.audio import extract_features_from_file, frame_windows, get_audio_extractor
from neuralhead.fileio import write_json_atomic
from neuralhead.media.audio import iter_audio
from neuralhead.media.video import VideoInfo, VideoReader, probe_video
from neuralhead.tracking import crop as crops
from neuralhead.tracking.expression import ExpressionBasis
from neuralhead.tracking.gaze import gaze_angles
from neuralhead.tracking.mediapipe_backend import (
    FaceMeshTracker,
    ForegroundSegmenter,
    tracker_version,
)
from neuralhead.tracking.pose import fit_head_pose, pose_vector
from neuralhead.tracking.topology import NUM_LANDMARKS

AUDIO_SAMPLE_RATE = 16000
AUDIO_WINDOW = 16  # feature vectors per frame, DNP Sec. 3.3
_CHUNK = 512  # frames per chunk when computing parameters


@dataclass
class PrepareOptions:
    """Settings of ``neuralhead prepare`` (recorded in the dataset's meta.json)."""

    size: int = 256
    crop_mode: str = "fixed"  # fixed | track | full
    crop_scale: float = crops.DEFAULT_CROP_SCALE
    num_expression: int = 32
    expression_basis: str | None = None  # reuse another dataset's basis (its directory or .npz)
    heldout_fraction: float = 0.1
    audio_extractor: str = "logmel"
    write_frames: bool = True
    write_masks: bool = True
    max_frames: int | None = None
    min_face_fraction: float = 0.5
    overwrite: bool = False

    def validate(self) -> None:
        if self.size < 32 or self.size % 16:
            raise InputError(f"--size must be a multiple of 16 and at least 32, got {self.size}")
        if self.crop_mode not in ("fixed", "track", "full"):
            raise InputError(f"--crop must be fixed, track or full, got {self.crop_mode!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise InputError(f"--heldout must be in [0, 1), got {self.heldout_fraction}")
        if self.num_expression < 1:
            raise InputError("--num-expression must be at least 1")


def prepare_video(
    video: str | Path, out_dir: str | Path, options: PrepareOptions | None = None, progress: bool = True
) -> DatasetFiles:
    """Track, crop and parametrise ``video`` into the dataset directory ``out_dir``.

    If anything fails, the partly written directory is removed, so a failed run leaves
    nothing behind (large landmark files included) and can simply be repeated.
    """
    options = options or PrepareOptions()
    options.validate()
    video, out = Path(video), Path(out_dir)
    basis_path = _external_basis(options.expression_basis)
    info = probe_video(video)
    _claim_output_dir(out, options.overwrite)
    try:
        _prepare_into(video, out, info, options, basis_path, progress)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return DatasetFiles.open(out)


def _external_basis(spec: str | None) -> Path | None:
    """The .npz of ``--expression-basis`` (a dataset directory or the file), checked up front."""
    if not spec:
        return None
    path = Path(spec)
    if path.is_dir():
        path = path / "expression_basis.npz"
    if not path.is_file():
        raise InputError(f"expression basis {path} not found")
    return path


def _prepare_into(
    video: Path,
    out: Path,
    info: VideoInfo,
    options: PrepareOptions,
    basis_path: Path | None,
    progress: bool,
) -> None:
    raw_path = out / ".landmarks_raw.f32"
    valid = _track_pass(video, raw_path, info.num_frames, options.max_frames, progress)
    num_frames = len(valid)
    found = int(valid.sum())
    if found == 0:
        raise NoFaceError(f"no face found in any of the {num_frames} frames of {video.name}")
    if found < options.min_face_fraction * num_frames:
        missing = 100.0 * (1 - found / num_frames)
        raise NoFaceError(
            f"no face found in {missing:.0f}% of the frames of {video.name} "
            f"(at least {100 * options.min_face_fraction:.0f}% need one)"
        )
    raw = np.memmap(raw_path, dtype=np.float32, mode="r+", shape=(num_frames, NUM_LANDMARKS, 3))
    _interpolate_missing(raw, valid)

    boxes = _crop_boxes(raw, info.width, info.height, info.fps, options)
    landmarks = np.lib.format.open_memmap(
        out / "landmarks.npy", mode="w+", dtype=np.float32, shape=raw.shape
    )
    for start in range(0, num_frames, _CHUNK):
        sl = slice(start, start + _CHUNK)
        landmarks[sl] = crops.landmarks_to_crop(raw[sl], boxes[sl], options.size)
    landmarks.flush()
    del raw
    raw_path.unlink()
    np.save(out / "crop_boxes.npy", boxes)
    np.save(out / "valid.npy", valid)

    num_train = num_frames - int(round(options.heldout_fraction * num_frames))
    basis_source = _compute_parameters(
        out, landmarks, valid, num_train, options.size, options.num_expression, basis_path
    )

    if options.write_frames:
        _crop_pass(video, out, boxes, num_frames, options, progress)

    audio_meta = _prepare_audio(video, out, info.fps, num_frames, options) if info.has_audio else None

    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "neuralhead_version": __version__,
        "tracker": tracker_version(),
        "source": {
            "path": str(video.resolve()),
            "width": info.width,
            "height": info.height,
            "fps": info.fps,
        },
        "num_frames": num_frames,
        "fps": info.fps,
        "size": options.size,
        "frames_written": options.write_frames,
        "masks_written": options.write_frames and options.write_masks,
        "faces": {"found": found, "missing": num_frames - found},
        "crop": {"mode": options.crop_mode, "scale": options.crop_scale},
        "pose": {
            "layout": ["pitch", "yaw", "roll", "tx", "ty", "tz"],
            "units": "radians; tx, ty in [-1, 1] of the crop; tz = log(face scale / crop size)",
        },
        "expression": {
            "num_components": int(np.load(out / "expression.npy", mmap_mode="r").shape[1]),
            "basis": "expression_basis.npz",
            "fitted_on": basis_source,
        },
        "gaze": {"layout": ["yaw", "pitch"], "units": "radians, eye-in-head"},
        "audio": audio_meta,
        "split": {
            "heldout_fraction": options.heldout_fraction,
            "num_train": num_train,
            "num_heldout": num_frames - num_train,
        },
        "options": asdict(options),
    }
    write_json_atomic(out / META, meta)


def _claim_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"output directory {out} is not empty (use --overwrite to replace it)")
        # A run that failed part-way left the raw landmarks (while tracking) or landmarks.npy.
        if any((out / name).is_file() for name in (META, ".landmarks_raw.f32", "landmarks.npy")):
            shutil.rmtree(out)
        else:
            raise InputError(f"refusing to overwrite {out}: it is not a prepared dataset")
    out.mkdir(parents=True, exist_ok=True)


def _track_pass(
    video: Path, raw_path: Path, expected: int | None, max_frames: int | None, progress: bool
) -> np.ndarray:
    """Append each frame's landmarks (NaN when no face) to ``raw_path``; return validity."""
    valid: list[bool] = []
    empty = np.full((NUM_LANDMARKS, 3), np.nan, dtype=np.float32)
    total = min(expected or 0, max_frames or expected or 0) or None
    # The bar is a context manager so that an error ends its line before the CLI prints it.
    bar = tqdm(total=total, desc="tracking", unit="frame", disable=not progress)
    with (
        bar,
        VideoReader(video) as reader,
        FaceMeshTracker() as tracker,
        open(raw_path, "wb") as raw,
    ):
        for frame in reader:
            points = tracker.process(frame)
            valid.append(points is not None)
            raw.write((points if points is not None else empty).tobytes())
            bar.update()
            if max_frames and len(valid) >= max_frames:
                break
    if not valid:
        raise InputError(f"video {video.name} has no frames")
    return np.array(valid, dtype=bool)


def _interpolate_missing(landmarks: np.ndarray, valid: np.ndarray) -> None:
    """Fill frames without a face by linear interpolation between their valid neighbours."""
    if valid.all():
        return
    good = np.flatnonzero(valid)
    for idx in np.flatnonzero(~valid):
        after = np.searchsorted(good, idx)
        if after == 0:
            landmarks[idx] = landmarks[good[0]]
        elif after == len(good):
            landmarks[idx] = landmarks[good[-1]]
        else:
            a, b = good[after - 1], good[after]
            w = (idx - a) / (b - a)
            landmarks[idx] = (1 - w) * landmarks[a] + w * landmarks[b]


def _crop_boxes(
    landmarks: np.ndarray, width: int, height: int, fps: float, options: PrepareOptions
) -> np.ndarray:
    n = len(landmarks)
    if options.crop_mode == "full":
        side = min(width, height)
        box = np.array([(width - side) // 2, (height - side) // 2, side], dtype=np.int64)
        return np.repeat(box[None], n, axis=0)
    # Face centres and sizes are all the crop needs; gather them chunk by chunk.
    centre = np.empty((n, 2), np.float32)
    size = np.empty(n, np.float32)
    for start in range(0, n, _CHUNK):
        sl = slice(start, start + _CHUNK)
        centre[sl], size[sl] = crops.face_centres_and_sizes(landmarks[sl])
    if options.crop_mode == "fixed":
        box = crops.fixed_box(centre, size, width, height, options.crop_scale)
        return np.repeat(box[None], n, axis=0)
    return crops.tracked_boxes(centre, size, fps, options.crop_scale)


def _compute_parameters(
    out: Path,
    landmarks: np.ndarray,
    valid: np.ndarray,
    num_train: int,
    size: int,
    num_expression: int,
    basis_path: Path | None,
) -> str:
    """Write pose, canonical landmarks, expression basis and coefficients, and gaze."""
    n = len(landmarks)
    canonical = np.lib.format.open_memmap(
        out / "canonical.npy", mode="w+", dtype=np.float32, shape=landmarks.shape
    )
    pose = np.empty((n, 6), np.float32)
    for start in range(0, n, _CHUNK):
        sl = slice(start, start + _CHUNK)
        fit = fit_head_pose(landmarks[sl])
        pose[sl] = pose_vector(fit, size)
        canonical[sl] = fit.canonicalize(landmarks[sl])
    canonical.flush()
    np.save(out / "pose.npy", pose)

    if basis_path is not None:
        basis = ExpressionBasis.load(basis_path)
        source = f"external: {basis_path.resolve()}"
    else:
        fit_frames = np.flatnonzero(valid[:num_train])
        if len(fit_frames) < 2:
            raise NoFaceError("too few training frames with a face to build the expression basis")
        basis = ExpressionBasis.fit(_Rows(canonical, fit_frames), num_expression)
        source = f"training frames with a face ({len(fit_frames)})"
    basis.save(out / "expression_basis.npz")

    expression = np.empty((n, basis.num_components), np.float32)
    gaze = np.empty((n, 2), np.float32)
    for start in range(0, n, _CHUNK):
        sl = slice(start, start + _CHUNK)
        expression[sl] = basis.project(canonical[sl])
        gaze[sl] = gaze_angles(canonical[sl])
    np.save(out / "expression.npy", expression)
    np.save(out / "gaze.npy", gaze)
    return source


class _Rows:
    """A row selection of a memory-mapped array that is read lazily, slice by slice."""

    def __init__(self, array: np.ndarray, rows: np.ndarray) -> None:
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, sl: slice) -> np.ndarray:
        return self.array[self.rows[sl]]


def _crop_pass(
    video: Path, out: Path, boxes: np.ndarray, num_frames: int, options: PrepareOptions, progress: bool
) -> None:
    (out / "frames").mkdir(exist_ok=True)
    masks = options.write_masks
    if masks:
        (out / "masks").mkdir(exist_ok=True)
    segmenter = ForegroundSegmenter() if masks else None
    index = -1
    try:
        bar = tqdm(total=num_frames, desc="cropping", unit="frame", disable=not progress)
        with bar, VideoReader(video) as reader:
            for index, frame in enumerate(reader):
                if index >= num_frames:
                    break
                crop = crops.crop_frame(frame, boxes[index], options.size)
                cv2.imwrite(str(out / FRAME_PATTERN.format(index)), crop[:, :, ::-1])
                if segmenter is not None:
                    mask = segmenter.process(crop)
                    cv2.imwrite(str(out / MASK_PATTERN.format(index)), np.round(mask * 255).astype(np.uint8))
                bar.update()
    finally:
        if segmenter is not None:
            segmenter.close()
    if index + 1 < num_frames:
        raise InputError(f"video {video.name} gave fewer frames on the second pass ({index + 1})")


def _prepare_audio(
    video: Path, out: Path, fps: float, num_frames: int, options: PrepareOptions
) -> dict:
    """Resample the audio to 16 kHz mono (streamed to audio.wav) and compute windows."""
    wav_path = out / "audio.wav"
    with wave.open(str(wav_path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(AUDIO_SAMPLE_RATE)
        for chunk in iter_audio(video, AUDIO_SAMPLE_RATE):
            wav.writeframes((np.clip(chunk, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())
    extractor = get_audio_extractor(options.audio_extractor)
    features = extract_features_from_file(wav_path, extractor)
    windows = frame_windows(features, extractor.rate, fps, num_frames, window=AUDIO_WINDOW)
    np.save(out / "audio_windows.npy", windows.astype(np.float32))
    return {
        "file": "audio.wav",
        "sample_rate": AUDIO_SAMPLE_RATE,
        "extractor": extractor.name,
        "feature_dim": int(extractor.dim),
        "feature_rate": float(extractor.rate),
        "window": AUDIO_WINDOW,
        "windows": "audio_windows.npy",
    }
