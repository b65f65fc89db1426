"""What drives a reenactment: a prepared dataset, a video, a parameter file or an audio file.

Every kind is resolved to a :class:`Driver`: tracked per-frame values (pose, gaze,
template-space landmarks), optionally the driver's cropped frames (for a side-by-side view)
and its audio. Videos are tracked with the same pipeline as ``neuralhead prepare``, into a
temporary dataset, so a driver is measured exactly like the training data was.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from neuralhead.data.format import META, DatasetFiles
from neuralhead.data.prepare import PrepareOptions, prepare_video
from neuralhead.errors import InputError
from neuralhead.media.audio import load_audio

AUDIO_SUFFIXES = frozenset({".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus"})
PARAMS_SUFFIXES = frozenset({".npz"})


@dataclass
class Driver:
    """Per-frame driving values; arrays are ``None`` for what the driver does not provide."""

    kind: str  # dataset | video | params | audio
    path: Path
    fps: float
    num_frames: int
    pose: np.ndarray | None = None  # (T, 6)
    gaze: np.ndarray | None = None  # (T, 2)
    canonical: np.ndarray | None = None  # (T, 478, 3)
    expression: np.ndarray | None = None  # (T, K), only from a parameter file
    audio_windows: np.ndarray | None = None  # (T, w, D)
    audio_path: Path | None = None  # where the sound to mux comes from
    audio_offset: float = 0.0  # seconds into audio_path where frame 0 starts
    dataset: DatasetFiles | None = None
    frames: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # dataset frame numbers

    def driver_frames(self, size: int) -> Iterator[np.ndarray]:
        """The driver's cropped frames (RGB uint8, size x size), when it has them."""
        if self.dataset is None or not self.dataset.has_frames:
            raise InputError(f"{self.path.name} has no frames to show beside the output")
        for frame in self.frames:
            image = cv2.imread(str(self.dataset.frame_path(int(frame))))[:, :, ::-1]
            if image.shape[0] != size:
                image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            yield np.ascontiguousarray(image)

    def audio(self, sample_rate: int) -> np.ndarray | None:
        """The driver's sound for the generated frames (mono float32), if any."""
        if self.audio_path is None:
            return None
        wave = load_audio(self.audio_path, sample_rate)
        start = int(round(self.audio_offset * sample_rate))
        return wave[start : start + int(round(self.num_frames / self.fps * sample_rate)) + 1]


def driver_kind(path: Path) -> str:
    if path.is_dir():
        if not (path / META).is_file():
            raise InputError(f"{path} is a directory but not a prepared dataset (no {META})")
        return "dataset"
    if not path.exists():
        raise InputError(f"driving input {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    if suffix in PARAMS_SUFFIXES:
        return "params"
    return "video"


def from_dataset(
    files: DatasetFiles, split: str = "all", max_frames: int | None = None, only_valid: bool = False
) -> Driver:
    frames = np.array(files.split_range(split), dtype=np.int64)
    if only_valid:
        frames = frames[files.array("valid", mmap=False)[frames]]
    if max_frames:
        frames = frames[:max_frames]
    if len(frames) == 0:
        raise InputError(f"the {split} split of {files.root} is empty")
    audio_windows = files.array("audio_windows")[frames] if files.has_audio else None
    return Driver(
        kind="dataset",
        path=files.root,
        fps=files.fps,
        num_frames=len(frames),
        pose=np.asarray(files.array("pose")[frames]),
        gaze=np.asarray(files.array("gaze")[frames]),
        canonical=np.asarray(files.array("canonical")[frames]),
        audio_windows=None if audio_windows is None else np.asarray(audio_windows),
        audio_path=files.root / "audio.wav" if files.has_audio else None,
        audio_offset=float(frames[0]) / files.fps,
        dataset=files,
        frames=frames,
    )


def from_params(path: Path, max_frames: int | None = None) -> Driver:
    """A ``.npz`` of per-frame values: ``pose`` (T, 6) and ``gaze`` (T, 2), with either
    ``expression`` (T, K) in the portrait's basis or ``canonical`` (T, 478, 3) landmarks;
    optional scalar ``fps`` (default 25)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read parameter file {path}: {exc}") from None
    missing = {"pose", "gaze"} - set(arrays)
    if missing or not ({"expression", "canonical"} & set(arrays)):
        raise InputError(
            f"parameter file {path.name} needs arrays pose, gaze and expression or canonical "
            f"(has {', '.join(sorted(arrays)) or 'none'})"
        )
    n = len(arrays["pose"]) if not max_frames else min(max_frames, len(arrays["pose"]))
    if arrays["pose"].shape[1:] != (6,) or arrays["gaze"].shape[1:] != (2,):
        raise InputError(f"parameter file {path.name}: pose must be (T, 6) and gaze (T, 2)")
    return Driver(
        kind="params",
        path=path,
        fps=float(arrays.get("fps", 25.0)),
        num_frames=n,
        pose=arrays["pose"][:n].astype(np.float32),
        gaze=arrays["gaze"][:n].astype(np.float32),
        canonical=arrays["canonical"][:n] if "canonical" in arrays else None,
        expression=arrays["expression"][:n] if "expression" in arrays else None,
    )


@contextlib.contextmanager
def open_driver(
    path: str | Path,
    size: int,
    audio_extractor: str | None = "logmel",
    split: str = "all",
    max_frames: int | None = None,
    fps: float = 25.0,
    progress: bool = True,
) -> Iterator[Driver]:
    """Resolve ``path`` to a :class:`Driver`; temporary files live until the block ends.

    ``size`` is the crop size a video is prepared at, ``audio_extractor`` the feature
    extractor the portrait was trained with, ``fps`` the frame rate for audio drivers.
    """
    path = Path(path)
    kind = driver_kind(path)
    if kind == "dataset":
        yield from_dataset(DatasetFiles.open(path), split, max_frames)
    elif kind == "params":
        yield from_params(path, max_frames)
    elif kind == "audio":
        yield from_audio(path, fps, audio_extractor or "logmel", max_frames)
    else:
        with tempfile.TemporaryDirectory(prefix="neuralhead-driver-") as tmp:
            options = PrepareOptions(
                size=size,
                heldout_fraction=0.0,
                write_masks=False,
                max_frames=max_frames,
                audio_extractor=audio_extractor or "logmel",
            )
            files = prepare_video(path, Path(tmp) / "driver", options, progress=progress)
            driver = from_dataset(files, "all")
            driver.kind, driver.path = "video", path
            if files.has_audio:
                driver.audio_path = path
            yield driver


def from_audio(path: Path, fps: float, extractor_name: str, max_frames: int | None = None) -> Driver:
    from neuralhead.features.audio import (
        extract_features_from_file,
        frame_windows,
        get_audio_extractor,
    )

    extractor = get_audio_extractor(extractor_name)
    features = extract_features_from_file(path, extractor)
    seconds = (len(features) - 1) / extractor.rate
    n = max(int(round(seconds * fps)), 1)
    if max_frames:
        n = min(n, max_frames)
    windows = frame_windows(features, extractor.rate, fps, n)
    return Driver(kind="audio", path=path, fps=fps, num_frames=n, audio_windows=windows, audio_path=path)
