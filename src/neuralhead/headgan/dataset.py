"""HeadGAN's training samples: self-reenactment pairs from prepared videos (Sec. 3.3, 4.1).

HeadGAN is trained on reconstruction: "we randomly sample the reference image from the target
video" (Sec. 4.1), so the generator reproduces frame t of a video from another frame of the same
video and the 3D face of frame t, and the real frame t supervises it (App. B).

Per video (one prepared dataset directory, ``neuralhead prepare``), once at start:

* the face model is fitted to the clip's landmarks (:func:`~neuralhead.headgan.fitting.fit_frames`,
  vectorised over the frames), with one identity shared by the whole clip: in
  self-reenactment the source and the driver are the same person, so the driving shape of
  Eq. 1 (the source's identity with the driver's expression) is the clip's identity with frame
  t's expression, and the reference's render is the same function of the reference frame;
* the HeadGAN audio features ``(N, 300)`` (Sec. 3.2) are computed from ``audio.wav`` and
  standardised with the clip's own mean and standard deviation over its training frames (our
  choice: the paper states no normalisation; per-clip statistics remove differences of
  loudness and microphone between recordings).

A sample is frame t (the target), its driving condition (the renders of frames t-2, t-1, t on
channels, clamped at the clip's start; the last three channels are frame t's render), a
reference frame drawn uniformly from the other valid frames of the same split of the same
video, the reference's render, the mouth centre of frame t and its audio features. Frames are
read with :class:`~neuralhead.data.dataset.PortraitDataset` (resized to ``config.image_size``,
kept in memory below a size limit); renders are made per batch, one
:func:`~neuralhead.headgan.renderer.render_ncc` call for all of a batch's meshes.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neuralhead.data.dataset import PortraitDataset
from neuralhead.data.format import DatasetFiles
from neuralhead.errors import InputError
from neuralhead.fileio import write_atomic
from neuralhead.headgan.audio_features import AUDIO_FEATURE_DIM, audio_features_for_video
from neuralhead.headgan.config import HeadGANConfig
from neuralhead.headgan.face_model import MorphableModel
from neuralhead.headgan.fitting import fit_frames, project
from neuralhead.headgan.renderer import render_ncc
from neuralhead.tracking.topology import LIPS_OUTER_LOWER, LIPS_OUTER_UPPER

log = logging.getLogger(__name__)

#: Landmarks averaged into the mouth centre that D_m's crop is centred on (App. B, Eq. 5).
MOUTH_LANDMARKS = tuple(sorted(set(LIPS_OUTER_UPPER + LIPS_OUTER_LOWER)))

#: Standard deviations below this are treated as this (a feature constant over a clip).
MIN_AUDIO_STD = 1e-6


@dataclass
class AudioStatistics:
    """Mean and standard deviation ``(D,)`` of audio features, and the recogniser used.

    ``recognizer`` is what :func:`~neuralhead.headgan.audio_features.audio_features_for_video`
    was given (``""`` for the default log-mel substitute); features to be standardised must
    come from the same one.
    """

    mean: np.ndarray
    std: np.ndarray
    count: int
    recognizer: str = ""

    @classmethod
    def from_features(cls, features: np.ndarray, recognizer: str = "") -> AudioStatistics:
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or len(features) == 0:
            raise InputError(f"audio features must have shape (N >= 1, D), got {features.shape}")
        return cls(features.mean(0), features.std(0), len(features), recognizer)

    @classmethod
    def pooled(cls, parts: Sequence[AudioStatistics]) -> AudioStatistics:
        """The statistics of the union of the frames the ``parts`` were computed on."""
        if not parts:
            raise InputError("no audio statistics to pool")
        counts = np.array([p.count for p in parts], np.float64)
        means = np.stack([p.mean for p in parts])
        mean = (counts[:, None] * means).sum(0) / counts.sum()
        second = (counts[:, None] * (np.stack([p.std for p in parts]) ** 2 + means**2)).sum(0)
        std = np.sqrt(np.clip(second / counts.sum() - mean**2, 0.0, None))
        return cls(mean, std, int(counts.sum()), parts[0].recognizer)

    def standardize(self, features: np.ndarray) -> np.ndarray:
        """``(features - mean) / std`` as float32; constant features map to 0."""
        features = np.asarray(features)
        if features.shape[-1] != len(self.mean):
            raise InputError(
                f"audio features have {features.shape[-1]} values per frame, the statistics "
                f"{len(self.mean)}"
            )
        scaled = (features - self.mean) / np.maximum(self.std, MIN_AUDIO_STD)
        return scaled.astype(np.float32)

    def save(self, path: str | Path) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    mean=self.mean,
                    std=self.std,
                    count=np.int64(self.count),
                    recognizer=np.array(self.recognizer, dtype=np.str_),
                )

        write_atomic(path, write)

    @classmethod
    def load(cls, path: str | Path) -> AudioStatistics:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"audio statistics file {path} does not exist")
        with np.load(path, allow_pickle=False) as data:
            if "mean" not in data or "std" not in data:
                raise InputError(f"{path} is not an audio statistics file (no mean / std)")
            return cls(data["mean"], data["std"], int(data["count"]), str(data["recognizer"]))


@dataclass
class _Video:
    """One prepared clip, fitted: frames, face parameters, mouth centres and audio."""

    files: DatasetFiles
    frames: PortraitDataset  # the split's valid frames; reads any frame of the clip
    identity: torch.Tensor  # (K_id,)
    expression: torch.Tensor  # (N, K_exp)
    camera: torch.Tensor  # (N, 7)
    mouth_centers: torch.Tensor  # (N, 2) pixels at config.image_size
    audio: torch.Tensor | None  # (N, 300) standardised
    audio_stats: AudioStatistics | None
    cached_bytes: int  # memory taken by the frames kept in memory


class HeadGANPairs(torch.utils.data.Dataset):
    """Self-reenactment samples of HeadGAN from one or more prepared videos.

    Args:
        dataset_dirs: prepared dataset directories, one video each.
        face_model: the morphable model renders are made with (the same for all videos).
        config: the model config: ``image_size``, ``use_audio``, ``audio_dim``,
            ``render_channels`` and ``driving_frames`` are used.
        split: ``"train"`` or ``"heldout"`` (the fixed split of each dataset's meta.json):
            targets and references are the split's frames where a face was found.
        cache_limit_gb: frames of the split are kept in memory (uint8) while the total stays
            below this; the rest are read from disk when needed.
        recognizer: the speech recogniser of the audio features (None: the default).
        device: where renders are made and batches are returned.
        progress: show a bar while frames are loaded into memory.

    Without ``config.use_audio`` no audio is read and ``"audio"`` is all zeros; with it, a
    dataset without audio is an error.

    A sample (``__getitem__``, :meth:`batch`, :meth:`pairs`) is a dict of ``reference_image``,
    ``reference_render``, ``target`` ``(3, H, W)`` in [0, 1], ``driving`` ``(9, H, W)``,
    ``mouth_center`` ``(2,)`` (x, y pixels), ``audio`` ``(300,)``, and the ints ``video``,
    ``frame`` and ``reference_frame``; batches stack them.
    """

    def __init__(
        self,
        dataset_dirs: Iterable[str | Path],
        face_model: MorphableModel,
        config: HeadGANConfig,
        split: str = "train",
        *,
        cache_limit_gb: float = 4.0,
        recognizer: str | None = None,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> None:
        if split not in ("train", "heldout"):
            raise InputError(f"split must be 'train' or 'heldout', got {split!r}")
        dirs = [Path(d) for d in dataset_dirs]
        if not dirs:
            raise InputError("HeadGANPairs needs at least one prepared dataset directory")
        self.config, self.split = config, split
        self.device = torch.device(device)
        self.face_model = face_model.to(self.device)
        self.recognizer = recognizer or ""
        self._check_audio(dirs)
        budget = cache_limit_gb * 2**30
        self.videos: list[_Video] = []
        for root in dirs:
            video = self._load_video(root, budget, progress)
            budget -= video.cached_bytes
            self.videos.append(video)
        self._starts = np.cumsum([0] + [len(v.frames) for v in self.videos]).tolist()

    # ------------------------------------------------------------------ set-up
    def _check_audio(self, dirs: list[Path]) -> None:
        if not self.config.use_audio:
            return
        if self.config.audio_dim != AUDIO_FEATURE_DIM:
            raise InputError(
                f"HeadGAN audio features have {AUDIO_FEATURE_DIM} values per frame, the config "
                f"asks for audio_dim={self.config.audio_dim}"
            )
        silent = [str(d) for d in dirs if not DatasetFiles.open(d).has_audio]
        if silent:
            raise InputError(
                f"the model uses audio, but {', '.join(silent)} "
                f"{'has' if len(silent) == 1 else 'have'} none: train with a -noaudio preset "
                "(headgan-256-noaudio, headgan-tiny-noaudio) or prepare videos with sound"
            )

    def _load_video(self, root: Path, budget: float, progress: bool) -> _Video:
        files = DatasetFiles.open(root)
        size = self.config.image_size
        probe = PortraitDataset(root, self.split, size, progress=False)
        cache = 0 < probe.cache_bytes <= budget
        frames = PortraitDataset(root, self.split, size, cache=cache, progress=progress)
        landmarks = files.array("landmarks", mmap=False)
        fit = fit_frames(self.face_model, landmarks, files.size, share_identity=True)
        log.info(
            "%s: face model fitted to %d frames, RMS landmark error %.2f px (at %d px)",
            root,
            len(landmarks),
            float(fit.residual.mean()),
            files.size,
        )
        scale = size / files.size
        mouth = landmarks[:, list(MOUTH_LANDMARKS), :2].mean(1) * scale
        audio, stats = None, None
        if self.config.use_audio:
            audio_file = files.root / files.meta["audio"].get("file", "audio.wav")
            features = audio_features_for_video(
                audio_file, files.fps, files.num_frames, recognizer=self.recognizer or None
            )
            train = np.array(files.split_range("train"))
            valid = files.array("valid", mmap=False).astype(bool)
            stats = AudioStatistics.from_features(
                features[train[valid[train]]] if valid[train].any() else features, self.recognizer
            )
            audio = torch.from_numpy(stats.standardize(features)).to(self.device)
        return _Video(
            files=files,
            frames=frames,
            identity=fit.identity[0].to(self.device),
            expression=fit.expression.to(self.device),
            camera=fit.camera.to(self.device),
            mouth_centers=torch.from_numpy(np.asarray(mouth, np.float32)).to(self.device),
            audio=audio,
            audio_stats=stats,
            cached_bytes=probe.cache_bytes if cache else 0,
        )

    # ------------------------------------------------------------------ indexing
    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """Sample ``index`` -> ``(video, frame)``: the target frame of the sample."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range 0..{len(self) - 1}")
        video = bisect.bisect_right(self._starts, index) - 1
        return video, int(self.videos[video].frames.frames[index - self._starts[video]])

    def valid_frames(self, video: int) -> np.ndarray:
        """The frames of the split of ``video`` where a face was found (targets, references)."""
        return self.videos[video].frames.frames

    @property
    def audio_statistics(self) -> AudioStatistics | None:
        """The statistics of all videos' training frames together (None without audio)."""
        parts = [v.audio_stats for v in self.videos if v.audio_stats is not None]
        return AudioStatistics.pooled(parts) if parts else None

    def draw_reference(self, video: int, frame: int, generator: torch.Generator | None) -> int:
        """A reference frame for target ``frame``: uniform over the other valid frames."""
        candidates = self.valid_frames(video)
        others = candidates[candidates != frame]
        if len(others) == 0:
            return int(frame)
        pick = torch.randint(len(others), (1,), generator=generator).item()
        return int(others[pick])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """One sample with a reference drawn from torch's global generator."""
        batch = self.batch([index])
        return {k: v[0] for k, v in batch.items()}

    def batch(
        self, indices: Sequence[int], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The samples ``indices``, each with a reference drawn with ``generator``."""
        items = []
        for index in indices:
            video, frame = self.locate(int(index))
            items.append((video, frame, self.draw_reference(video, frame, generator)))
        return self.pairs(items)

    # ------------------------------------------------------------------ samples
    def render(self, video: Sequence[int], frames: Sequence[int]) -> torch.Tensor:
        """3D face renders ``(B, 3, H, W)`` of ``frames`` of videos ``video`` (Eq. 1, Sec. 4.1).

        The shape is the video's identity with the frame's expression, seen by the frame's
        camera.
        """
        videos = [self.videos[v] for v in video]
        identity = torch.stack([v.identity for v in videos])
        expression = torch.stack([v.expression[f] for v, f in zip(videos, frames)])
        camera = torch.stack([v.camera[f] for v, f in zip(videos, frames)])
        size = self.config.image_size
        vertices = project(self.face_model.shape(identity, expression), camera, size)
        return render_ncc(vertices, self.face_model.triangles, self.face_model.vertex_colors, size)

    def pairs(self, items: Sequence[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
        """Samples for explicit ``(video, target frame, reference frame)`` triples."""
        if not items:
            raise InputError("no samples asked for")
        steps = self.config.driving_frames
        batch = len(items)
        video_ids, frame_ids = [], []
        for video, frame, _ in items:
            last = self.videos[video].files.num_frames - 1
            for back in range(steps - 1, -1, -1):
                video_ids.append(video)
                frame_ids.append(min(max(frame - back, 0), last))
        for video, _, reference in items:
            video_ids.append(video)
            frame_ids.append(reference)
        renders = self.render(video_ids, frame_ids)
        size = self.config.image_size
        driving = renders[: batch * steps].reshape(batch, steps * renders.shape[1], size, size)

        def images(which: int) -> torch.Tensor:
            stack = torch.stack(
                [self.videos[item[0]].frames.image_uint8(item[which]) for item in items]
            )
            return stack.to(self.device, torch.float32) / 255.0

        audio = torch.zeros(batch, self.config.audio_dim, device=self.device)
        if self.config.use_audio:
            audio = torch.stack([self.videos[v].audio[f] for v, f, _ in items])
        return {
            "reference_image": images(2),
            "reference_render": renders[batch * steps :],
            "driving": driving,
            "target": images(1),
            "mouth_center": torch.stack([self.videos[v].mouth_centers[f] for v, f, _ in items]),
            "audio": audio,
            "video": torch.tensor([v for v, _, _ in items]),
            "frame": torch.tensor([f for _, f, _ in items]),
            "reference_frame": torch.tensor([r for _, _, r in items]),
        }
