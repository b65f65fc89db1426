"""Training the speech-driven expression encoder E_aud (EMOPortraits Sec. 5.1-5.2; supplementary 2).

E_aud (:class:`~neuralhead.emoportraits.audio_encoder.SpeechExpressionEncoder`) learns to
predict the expression codes z of a video from its speech, with the motion encoder E_motion
of a trained, frozen main model as its teacher (Sec. 5.1: "employing E_motion as a teacher
model for this new encoder"). Each step, for each of ``batch_size`` samples (our default: one
clip per step; the paper gives no batch size):

* a clip of consecutive frames of random length in ``[min_clip, max_clip]`` (supplementary
  2.2: 50 to 200 frames) is drawn from the train split of a dataset, clamped to the run of
  consecutive frames with a face it lies in; runs are drawn in proportion to the number of
  places a shortest clip fits in them (our choice), so every frame is about equally likely;
* its first frame x_0 and the audio embeddings of all its frames
  (:func:`~neuralhead.emoportraits.audio_embedding.dataset_audio_embeddings`) go into E_aud,
  which returns z-hat_n for every frame;
* the targets are z_n = E_motion(x_n) of every frame, read as at inference: the pose-aligned
  face crop, ``model.expression_encoder(x_n, model.estimate_pose(x_n))``, in eval mode and
  without gradients;
* L_speech (supplementary Eq. 2, :class:`~neuralhead.emoportraits.speech_losses.SpeechLoss`,
  weights of 2.3) on the frames n >= 1 ("all subsequent frames [...] are utilized as
  reference frames"). The latent terms L_PCA (main Eq. 6 on the mouth basis Z_m, n = 8) and
  L_vtr use every such frame. The photometric terms (L1, VGGFace, BCE of the lip masks, lips
  L1) need x-hat^aud_n: the first frame is encoded once as the source (no gradient) and
  frame n is rendered with ``DriverMotion(pose=estimate_pose(x_n), z_d=z-hat_n)`` through the
  frozen generator, so gradients reach z-hat_n and through it E_aud only. Rendering all 200
  frames at 512 px, with gradients, would make a step some fifty times costlier, so
  ``render_frames`` frames of each clip (our choice: 4) are drawn at random and rendered; their targets are the frames with the
  background replaced as in MegaPortraits (:func:`~neuralhead.megaportraits.losses.foreground`
  with the dataset's masks).

The mouth basis Z_m (Sec. 5.2) is a file written by
:meth:`~neuralhead.emoportraits.latent_space.ExpressionPCA.save` (``mouth_basis``, e.g. from
``neuralhead expressions mouth-basis``); without one it is computed at the start with
:func:`~neuralhead.emoportraits.latent_space.mouth_basis` from the first training dataset
(ideally a video of one person moving the mouth, as in the paper). Either way the run keeps
a copy as ``mouth_basis.safetensors``. The VGGFace and face-parser terms need their networks'
weights; when they are absent and no file was named, the terms are left out with a warning
and listed under ``unavailable_losses`` in the run's config.json (the lips L1 then takes its
mouth mask from the landmarks, see :mod:`~neuralhead.emoportraits.speech_losses`).

Optimisation (supplementary 2.3): AdamW, the learning rate decayed from 1e-4 to 0 by a cosine
over ``num_iterations`` (a new run sets it to its step limit; a resumed run keeps it). The
weight decay, 1e-2, is AdamW's default (the paper gives none); so is the default of 100k
steps (:data:`DEFAULT_STEPS`).

Evaluation uses fixed clips of the held-out splits (up to ``max_clip`` frames each, spread
over them): the L1 of the codes (L_vtr), L_PCA and the L1 (0-255) of ``render_frames``
rendered frames against the foreground targets, for E_aud and for the "no motion" baseline
z-hat_n = z_0 (the first frame's expression held still), so a user sees whether E_aud beats
standing still; ``teacher_l1`` is the L1 of renders with the teacher's codes, the best E_aud
can reach through this generator.

The run directory is the training engine's (config.json, log.txt, stats.jsonl, previews/,
checkpoints/; resumable). When training ends, ``speech/`` receives E_aud
(:meth:`~neuralhead.nn.pretrained.PretrainedModel.save_pretrained`; its config records the
audio embedder's spec and the base model's ``expression_dim``) and a copy of the mouth basis
as ``speech/mouth_basis.safetensors`` for inference (mixing speech and video, Sec. 5.2).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuralhead import __version__
from neuralhead.data.format import DatasetFiles
from neuralhead.emoportraits.audio_embedding import (
    AudioEmbedder,
    dataset_audio_embeddings,
    load_audio_embedder,
)
from neuralhead.emoportraits.audio_encoder import SpeechEncoderConfig, SpeechExpressionEncoder
from neuralhead.emoportraits.checkpoints import SPEECH_SUBDIR, load_main_model
from neuralhead.emoportraits.latent_space import ExpressionPCA, mouth_basis, pca_loss
from neuralhead.emoportraits.speech_losses import SPEECH_WEIGHTS, SpeechLoss
from neuralhead.errors import InputError
from neuralhead.megaportraits.base_model import DriverMotion, MegaPortraitsBase, Pose, SourceState
from neuralhead.megaportraits.dataset import MegaPortraitsPairs
from neuralhead.megaportraits.enhancer_training import load_optional_network
from neuralhead.megaportraits.losses import foreground
from neuralhead.metrics.image import l1_255
from neuralhead.nn.pretrained import config_from_dict, config_to_dict
from neuralhead.training import cli_args
from neuralhead.training.engine import Engine, EngineOptions
from neuralhead.visualize import grid, label, to_uint8

log = logging.getLogger(__name__)
train_log = logging.getLogger("neuralhead.train")

#: ``model`` of the run's config.json.
RUN_MODEL = "emoportraits-speech"
#: The mouth basis Z_m, in the run directory and beside the exported E_aud.
MOUTH_BASIS_FILE = "mouth_basis.safetensors"
#: Steps of a run when none are given (our choice; the paper gives no count for E_aud).
DEFAULT_STEPS = 100_000
#: Terms of L_speech computed on rendered frames; the latent ones use every frame.
PHOTOMETRIC_TERMS = ("l1", "vggface", "bce", "lips")
LATENT_TERMS = ("pca", "vtr")
#: Frames per chunk when the teacher encodes a clip (only memory depends on it).
TEACHER_CHUNK = 32
#: Frames per row of a preview.
PREVIEW_FRAMES = 4


@dataclass
class SpeechTrainOptions:
    """Settings of an E_aud run (all recorded in the run's config.json).

    ``base_model`` is the trained main model (a run or saved model directory,
    :func:`~neuralhead.emoportraits.checkpoints.load_main_model`); ``audio_embedder`` the
    embedder spec (:func:`~neuralhead.emoportraits.audio_embedding.load_audio_embedder`;
    ``None``: the offline substitute). ``mouth_basis`` is a saved
    :class:`~neuralhead.emoportraits.latent_space.ExpressionPCA` (``None``: computed from the
    first dataset, from at most ``mouth_basis_frames`` frames). Clips have ``min_clip`` to
    ``max_clip`` frames (50-200 in the paper; lower them for short videos), ``render_frames``
    of each are rendered for the photometric terms (0: latent terms only).
    ``loss_weights`` override :data:`~neuralhead.emoportraits.speech_losses.SPEECH_WEIGHTS`;
    ``encoder_overrides`` set :class:`SpeechEncoderConfig` fields. ``num_iterations`` is the
    length of the cosine schedule (default: the run's step limit). Each evaluation uses
    ``eval_clips`` held-out clips. ``vggface_weights`` and ``face_parser_weights`` name the
    networks' files (default: the weight cache).
    """

    base_model: str | None = None
    audio_embedder: str | None = None
    mouth_basis: str | None = None
    mouth_basis_frames: int | None = None
    min_clip: int = 50
    max_clip: int = 200
    render_frames: int = 4
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-2
    num_iterations: int | None = None
    pca_components: int = 8
    eval_clips: int = 4
    vggface_weights: str | None = None
    face_parser_weights: str | None = None
    cache_limit_gb: float = 4.0
    loss_weights: dict[str, float] = field(default_factory=dict)
    encoder_overrides: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise :class:`InputError` for settings that cannot work."""
        if self.min_clip < 2:
            raise InputError(
                f"min_clip must be at least 2 (the first frame and one to predict), got {self.min_clip}"
            )
        if self.max_clip < self.min_clip:
            raise InputError(f"max_clip ({self.max_clip}) is below min_clip ({self.min_clip})")
        for name in ("batch_size", "pca_components", "eval_clips"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.render_frames < 0:
            raise InputError(f"render_frames must not be negative, got {self.render_frames}")
        if self.mouth_basis_frames is not None and self.mouth_basis_frames < 2:
            raise InputError(
                f"mouth_basis_frames must be at least 2, got {self.mouth_basis_frames}"
            )
        if self.lr <= 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        unknown = set(self.loss_weights) - set(SPEECH_WEIGHTS)
        if unknown:
            raise InputError(
                f"unknown speech loss weights {', '.join(sorted(unknown))}; "
                f"known: {', '.join(SPEECH_WEIGHTS)}"
            )
        if not any(self.weights[name] for name in SPEECH_WEIGHTS):
            raise InputError("every speech loss weight is 0: nothing to train on")

    @property
    def weights(self) -> dict[str, float]:
        """The loss weights in effect."""
        return {name: float(self.loss_weights.get(name, w)) for name, w in SPEECH_WEIGHTS.items()}


# ------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Clip:
    """``length`` consecutive frames of dataset ``video`` from frame ``start``."""

    video: int
    start: int
    length: int

    @property
    def frames(self) -> list[int]:
        return list(range(self.start, self.start + self.length))


def valid_runs(files: DatasetFiles, split: str) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive frames with a face in ``split``."""
    valid = files.array("valid", mmap=False).astype(bool)
    frames = np.array(files.split_range(split))
    frames = frames[valid[frames]]
    if len(frames) == 0:
        return []
    breaks = np.nonzero(np.diff(frames) != 1)[0] + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(frames, breaks)]


class SpeechClips:
    """Clips of consecutive frames of one split of prepared datasets with audio.

    Args:
        data_dirs: prepared datasets (with masks and audio).
        split: ``"train"`` or ``"heldout"``.
        image_size: side frames, masks and landmarks are brought to.
        embeddings: per dataset, its audio embeddings ``(num_frames, A)``.
        min_length: runs shorter than this are left out; a dataset without a longer run is
            left out with a warning, and :class:`InputError` is raised when none is left.

    Attributes: ``dirs`` (the datasets kept; a clip's ``video`` indexes them), ``runs``
    (``(video, start, stop)``) and ``reader`` (a
    :class:`~neuralhead.megaportraits.dataset.MegaPortraitsPairs` that reads and caches the
    frames and masks).
    """

    def __init__(
        self,
        data_dirs: list[Path],
        split: str,
        image_size: int,
        embeddings: list[torch.Tensor],
        *,
        min_length: int,
        cache_limit_gb: float = 4.0,
        progress: bool = False,
    ) -> None:
        if len(embeddings) != len(data_dirs):
            raise InputError(f"{len(embeddings)} embeddings for {len(data_dirs)} datasets")
        self.split, self.min_length = split, min_length
        self.dirs: list[Path] = []
        self.embeddings: list[torch.Tensor] = []
        self.runs: list[tuple[int, int, int]] = []
        longest = 0
        for root, audio in zip(data_dirs, embeddings, strict=True):
            files = DatasetFiles.open(root)
            if audio.shape[0] != files.num_frames:
                raise InputError(
                    f"{root} has {files.num_frames} frames but {audio.shape[0]} audio embeddings"
                )
            runs = valid_runs(files, split)
            longest = max([longest] + [stop - start for start, stop in runs])
            runs = [(start, stop) for start, stop in runs if stop - start >= min_length]
            if not runs:
                log.warning(
                    "%s is left out of the %s clips: no %d consecutive frames with a face",
                    root,
                    split,
                    min_length,
                )
                continue
            video = len(self.dirs)
            self.dirs.append(Path(root))
            self.embeddings.append(audio.float())
            self.runs += [(video, start, stop) for start, stop in runs]
        if not self.runs:
            raise InputError(
                f"no dataset has {min_length} consecutive frames with a face in its {split} "
                f"split (the longest run has {longest}); give longer videos or lower --min-clip"
            )
        self.reader = MegaPortraitsPairs(
            self.dirs,
            image_size,
            split,
            cross_pairs=False,
            cache_limit_gb=cache_limit_gb,
            progress=progress,
        )

    def draw(
        self, count: int, min_length: int, max_length: int, generator: torch.Generator
    ) -> list[Clip]:
        """``count`` random clips (see the module docstring), a function of the generator."""
        places = torch.tensor(
            [stop - start - min_length + 1 for _, start, stop in self.runs], dtype=torch.float64
        )
        clips = []
        for _ in range(count):
            video, start, stop = self.runs[int(torch.multinomial(places, 1, generator=generator))]
            length = int(torch.randint(min_length, max_length + 1, (1,), generator=generator))
            length = min(length, stop - start)
            offset = int(torch.randint(stop - start - length + 1, (1,), generator=generator))
            clips.append(Clip(video, start + offset, length))
        return clips

    def fixed(self, max_length: int, count: int) -> list[Clip]:
        """Up to ``count`` clips of at most ``max_length`` frames, spread over the runs: each
        run is cut into consecutive ``max_length`` pieces (a shorter run is one piece)."""
        pieces = []
        for video, start, stop in self.runs:
            if stop - start <= max_length:
                pieces.append(Clip(video, start, stop - start))
            else:
                pieces += [
                    Clip(video, s, max_length)
                    for s in range(start, stop - max_length + 1, max_length)
                ]
        picks = np.unique(np.linspace(0, len(pieces) - 1, min(count, len(pieces))).round())
        return [pieces[int(p)] for p in picks]

    def load(self, clip: Clip, frames: list[int] | None = None) -> dict[str, torch.Tensor]:
        """``image`` ``(T, 3, S, S)`` and ``mask`` ``(T, 1, S, S)`` in [0, 1] and ``landmarks``
        ``(T, K, 2)`` pixels of ``frames`` (default: all the clip's)."""
        items = [
            self.reader.frame(clip.video, f) for f in (clip.frames if frames is None else frames)
        ]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    def audio(self, clip: Clip) -> torch.Tensor:
        """The clip's audio embeddings ``(T, A)``."""
        return self.embeddings[clip.video][clip.start : clip.start + clip.length]


# ------------------------------------------------------------------------------ the task
def cosine_to_zero(
    optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate decayed to 0 by a cosine over ``total_steps`` (supplementary 2.3)."""
    total = max(total_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
    )


@dataclass
class _Targets:
    """What the frozen model reads from a clip: E_motion's codes and the head poses."""

    z: torch.Tensor  # (T, d)
    pose: Pose  # entries (T, ...)

    def pose_at(self, frames: torch.Tensor) -> Pose:
        return {key: value[frames] for key, value in self.pose.items()}


class SpeechTask:
    """The :class:`~neuralhead.training.engine.Task` that trains E_aud (module docstring).

    ``model`` is the frozen main model, ``embedder`` the audio embedder, ``mouth_pca`` Z_m
    (``None``: computed from the first dataset once the data are found usable, which
    :attr:`basis_origin` then says) and ``networks`` the optional ``"vggface"`` and
    ``"face_parser"`` networks.
    """

    def __init__(
        self,
        engine: Engine,
        data_dirs: list[Path],
        options: SpeechTrainOptions,
        model: MegaPortraitsBase,
        encoder_config: SpeechEncoderConfig,
        embedder: AudioEmbedder,
        mouth_pca: ExpressionPCA | None = None,
        networks: dict[str, nn.Module | None] | None = None,
    ) -> None:
        options.check()
        d = model.config.expression_dim
        if encoder_config.expression_dim != d:
            raise InputError(
                f"E_aud predicts {encoder_config.expression_dim}-d codes; the base model's are {d}-d"
            )
        if encoder_config.audio_dim != embedder.dim:
            raise InputError(
                f"E_aud reads {encoder_config.audio_dim}-d audio embeddings; the embedder "
                f"{embedder.name} gives {embedder.dim}"
            )
        self.engine, self.options = engine, options
        device = engine.device
        self.model = model.to(device).eval().requires_grad_(False)

        embeddings = self._embeddings(data_dirs, embedder)
        size = model.config.image_size
        progress = engine.is_main and engine.options.progress
        common = dict(cache_limit_gb=options.cache_limit_gb, progress=progress)
        self.train_set = SpeechClips(
            data_dirs, "train", size, embeddings, min_length=options.min_clip, **common
        )
        try:
            self.heldout: SpeechClips | None = SpeechClips(
                data_dirs, "heldout", size, embeddings, min_length=2, **common
            )
        except InputError as exc:
            log.warning("no held-out evaluation: %s", exc)
            self.heldout = None

        self.basis_origin: str | None = None
        if mouth_pca is None:
            mouth_pca = mouth_basis(self.model, data_dirs[0], max_frames=options.mouth_basis_frames)
            self.basis_origin = f"computed from {data_dirs[0]}"
        if mouth_pca.dim != d:
            raise InputError(
                f"the mouth basis is for {mouth_pca.dim}-d codes, the base model's are {d}-d"
            )
        if options.pca_components > mouth_pca.num_components:
            raise InputError(
                f"pca_components={options.pca_components} exceeds the "
                f"{mouth_pca.num_components} components of the mouth basis"
            )
        self.mouth_pca = mouth_pca
        self.weights = options.weights
        networks = networks or {}
        # The latent terms are computed here on every frame; SpeechLoss scores the renders.
        photometric = {**self.weights, "pca": 0.0, "vtr": 0.0}
        self.loss = SpeechLoss(
            vggface=networks.get("vggface"),
            face_parser=networks.get("face_parser"),
            weights=photometric,
        ).to(device)
        unavailable = set(self.loss.unavailable)
        self.photometric = options.render_frames > 0 and any(
            self.weights[name] and name not in unavailable for name in PHOTOMETRIC_TERMS
        )

        self.raw_encoder = SpeechExpressionEncoder(encoder_config)
        self.encoder = engine.wrap(self.raw_encoder)
        self.optimizer = torch.optim.AdamW(
            self.raw_encoder.parameters(), lr=options.lr, weight_decay=options.weight_decay
        )
        self.scheduler = cosine_to_zero(
            self.optimizer, options.num_iterations or engine.options.max_steps
        )

    def _embeddings(self, data_dirs: list[Path], embedder: AudioEmbedder) -> list[torch.Tensor]:
        """Every dataset's audio embeddings; the main process fills the caches first."""
        if self.engine.is_main:
            embeddings = [dataset_audio_embeddings(d, embedder) for d in data_dirs]
        self.engine.barrier()
        if not self.engine.is_main:
            embeddings = [dataset_audio_embeddings(d, embedder) for d in data_dirs]
        return embeddings

    @property
    def loss_names(self) -> list[str]:
        """The terms this run trains with."""
        latent = [name for name in LATENT_TERMS if self.weights[name]]
        if not self.photometric:
            return latent
        unavailable = set(self.loss.unavailable)
        return [n for n in PHOTOMETRIC_TERMS if self.weights[n] and n not in unavailable] + latent

    # ------------------------------------------------------------------ Task protocol
    def modules(self) -> dict[str, nn.Module]:
        return {"speech_encoder": self.encoder}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"speech_encoder": self.optimizer}

    def schedulers(self) -> dict[str, Any]:
        return {"speech_encoder": self.scheduler}

    def _generator(self, step: int) -> torch.Generator:
        # Seeded by the step: a resumed run draws the same clips and rendered frames.
        seed = (self.engine.options.seed * 1_000_003 + step) * 4099 + self.engine.rank
        return torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ the frozen model
    @torch.no_grad()
    def teacher(self, clips: SpeechClips, clip: Clip) -> _Targets:
        """E_motion's codes z_n and the head poses of every frame of ``clip`` (eval mode),
        read a chunk of frames at a time."""
        codes, poses = [], []
        frames = clip.frames
        for start in range(0, len(frames), TEACHER_CHUNK):
            images = clips.load(clip, frames[start : start + TEACHER_CHUNK])["image"]
            images = images.to(self.engine.device)
            with self.engine.autocast():
                pose = self.model.estimate_pose(images)
                codes.append(self.model.expression_encoder(images, pose).float())
            poses.append({key: value.float() for key, value in pose.items()})
        pose = {key: torch.cat([p[key] for p in poses]) for key in poses[0]}
        return _Targets(torch.cat(codes), pose)

    @torch.no_grad()
    def source(self, clips: SpeechClips, clip: Clip) -> SourceState:
        """The clip's first frame encoded as the source (with its mask)."""
        first = clips.load(clip, [clip.start])
        device = self.engine.device
        with self.engine.autocast():
            return self.model.encode_source(first["image"].to(device), first["mask"].to(device))

    def render(
        self, source: SourceState, positions: torch.Tensor, z: torch.Tensor, targets: _Targets
    ) -> torch.Tensor:
        """The clip's frames at ``positions`` rendered from ``source`` with codes ``z``
        ``(R, d)`` and the frames' own head poses; gradients reach ``z`` only."""
        motion = DriverMotion(pose=targets.pose_at(positions.to(self.engine.device)), z_d=z)
        with self.engine.autocast():
            return self.model.render(source, motion)["image"].float()

    def frame_targets(
        self, clips: SpeechClips, clip: Clip, positions: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Foreground targets and landmarks of the clip's frames at ``positions``."""
        data = clips.load(clip, [clip.start + int(p) for p in positions])
        device = self.engine.device
        return {
            "image": foreground(data["image"], data["mask"]).to(device),
            "landmarks": data["landmarks"].to(device),
        }

    def predict(
        self, clips: SpeechClips, batch: list[Clip], *, training: bool
    ) -> tuple[list[torch.Tensor], list[_Targets]]:
        """E_aud's codes ``(T_b, d)`` and the teacher's targets of each clip of ``batch``.

        Clips shorter than the longest are padded at the end with zero embeddings, which is
        what E_aud's audio windows see beyond a clip's end, and the padded outputs are
        dropped; E_aud is autoregressive, so no earlier frame depends on them. One forward
        pass for the batch (as DistributedDataParallel wants).
        """
        encoder = self.encoder if training else self.raw_encoder
        encoder.train(training)
        targets = [self.teacher(clips, clip) for clip in batch]
        longest = max(clip.length for clip in batch)
        audio = torch.stack(
            [F.pad(clips.audio(clip), (0, 0, 0, longest - clip.length)) for clip in batch]
        ).to(self.engine.device)
        z0 = torch.stack([target.z[0] for target in targets])
        with self.engine.autocast():
            z_hat = encoder(audio, z0).float()
        return [z_hat[b, : clip.length] for b, clip in enumerate(batch)], targets

    def render_positions(self, length: int, generator: torch.Generator | None) -> torch.Tensor:
        """Positions (>= 1) in a clip of the frames to render: ``render_frames`` drawn at
        random, or evenly spaced without a generator."""
        count = min(self.options.render_frames, length - 1)
        if generator is None:
            spaced = np.unique(np.linspace(1, length - 1, count).round()).astype(np.int64)
            return torch.from_numpy(spaced)
        return torch.randperm(length - 1, generator=generator)[:count].sort().values + 1

    # ------------------------------------------------------------------ training
    def train_step(self, step: int) -> dict[str, float]:
        generator = self._generator(step)
        o = self.options
        batch = self.train_set.draw(o.batch_size, o.min_clip, o.max_clip, generator)
        z_hats, targets = self.predict(self.train_set, batch, training=True)
        z_hat_all = torch.cat([z[1:] for z in z_hats])
        z_all = torch.cat([target.z[1:] for target in targets])
        terms: dict[str, torch.Tensor] = {}
        if self.weights["pca"]:
            terms["pca"] = pca_loss(z_hat_all, z_all, self.mouth_pca, o.pca_components)
        if self.weights["vtr"]:
            terms["vtr"] = F.l1_loss(z_hat_all, z_all)
        total = sum(
            (self.weights[name] * value for name, value in terms.items()), z_all.new_zeros(())
        )
        if self.photometric:
            rendered = {"pred": [], "target": [], "landmarks": [], "z_hat": [], "z": []}
            for clip, z_hat, target in zip(batch, z_hats, targets, strict=True):
                positions = self.render_positions(clip.length, generator)
                source = self.source(self.train_set, clip)
                rendered["pred"].append(self.render(source, positions, z_hat[positions], target))
                frames = self.frame_targets(self.train_set, clip, positions)
                rendered["target"].append(frames["image"])
                rendered["landmarks"].append(frames["landmarks"])
                rendered["z_hat"].append(z_hat[positions])
                rendered["z"].append(target.z[positions])
            parts = {key: torch.cat(value) for key, value in rendered.items()}
            photometric, photometric_terms = self.loss(
                parts["pred"],
                parts["target"],
                parts["z_hat"],
                parts["z"],
                target_landmarks=parts["landmarks"],
            )
            total = total + photometric
            terms.update(photometric_terms)
        self.optimizer.zero_grad(set_to_none=True)
        self.engine.backward_and_step(total, self.optimizer)
        self.scheduler.step()

        stats = {f"loss_{name}": float(value.detach()) for name, value in terms.items()}
        stats["loss"] = float(total.detach())
        stats["lr"] = self.scheduler.get_last_lr()[0]
        stats["clip_frames"] = float(np.mean([clip.length for clip in batch]))
        return stats

    # ------------------------------------------------------------------ evaluation
    def eval_clips(self) -> list[Clip]:
        """The fixed held-out clips of every evaluation."""
        if self.heldout is None:
            return []
        return self.heldout.fixed(self.options.max_clip, self.options.eval_clips)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """On the held-out clips: ``{heldout,baseline}_{vtr,pca,l1}`` for E_aud and the still
        z_0 baseline (latent L1, L_PCA, rendered L1 on the 0-255 scale) and ``teacher_l1``
        (rendered with the teacher's codes)."""
        clips = self.eval_clips()
        if not self.engine.is_main or not clips:
            return {}
        n = self.options.pca_components
        sums: dict[str, float] = {}
        counts = {"latent": 0, "rendered": 0}

        def add(key: str, value: torch.Tensor, count: int) -> None:
            sums[key] = sums.get(key, 0.0) + float(value) * count

        for clip in clips:
            z_hats, targets = self.predict(self.heldout, [clip], training=False)
            target = targets[0]
            z = target.z[1:]
            candidates = {"heldout": z_hats[0][1:], "baseline": target.z[:1].expand_as(z)}
            for name, z_pred in candidates.items():
                add(f"{name}_vtr", F.l1_loss(z_pred, z), len(z))
                add(f"{name}_pca", pca_loss(z_pred, z, self.mouth_pca, n), len(z))
            counts["latent"] += len(z)
            if self.options.render_frames == 0:
                continue
            positions = self.render_positions(clip.length, None)
            reference = self.frame_targets(self.heldout, clip, positions)["image"]
            source = self.source(self.heldout, clip)
            codes = {
                "heldout": z_hats[0][positions],
                "baseline": target.z[:1].expand(len(positions), -1),
                "teacher": target.z[positions],
            }
            for name, code in codes.items():
                image = self.render(source, positions, code, target).clamp(0, 1)
                add(f"{name}_l1", l1_255(image, reference).mean(), len(positions))
            counts["rendered"] += len(positions)
        return {
            key: value / counts["rendered" if key.endswith("_l1") else "latent"]
            for key, value in sums.items()
        }

    @torch.no_grad()
    def preview(self, step: int) -> np.ndarray:
        """Rows of ground-truth frames (background replaced), renders with the teacher's
        codes and renders with E_aud's, for a held-out clip (a training clip without one)."""
        clips = self.eval_clips()
        if clips:
            dataset, clip, split = self.heldout, clips[0], "held-out"
        else:
            o, generator = self.options, torch.Generator().manual_seed(0)
            dataset, split = self.train_set, "train"
            clip = dataset.draw(1, o.min_clip, o.max_clip, generator)[0]
        z_hats, targets = self.predict(dataset, [clip], training=False)
        target = targets[0]
        count = min(PREVIEW_FRAMES, clip.length - 1)
        positions = torch.from_numpy(
            np.unique(np.linspace(1, clip.length - 1, count).round()).astype(np.int64)
        )
        source = self.source(dataset, clip)
        rows = {
            f"{split} frame": self.frame_targets(dataset, clip, positions)["image"],
            "teacher z": self.render(source, positions, target.z[positions], target),
            "E_aud z": self.render(source, positions, z_hats[0][positions], target),
        }
        return grid(
            [
                [
                    label(to_uint8(image, (0.0, 1.0)), f"{name} {clip.start + int(p)}")
                    for image, p in zip(images, positions, strict=True)
                ]
                for name, images in rows.items()
            ]
        )

    def finish(self, run_dir: Path) -> None:
        """Save E_aud to ``run_dir/speech`` with the mouth basis beside it."""
        directory = self.raw_encoder.save_pretrained(run_dir / SPEECH_SUBDIR)
        shutil.copyfile(run_dir / MOUTH_BASIS_FILE, directory / MOUTH_BASIS_FILE)


# ------------------------------------------------------------------------------ set-up
def embedder_spec(spec: str | None, embedder: AudioEmbedder) -> str:
    """The spec that rebuilds ``embedder`` anywhere: the substitute with its width, Whisper
    with its directory's absolute path."""
    kind, _, argument = (spec or "substitute").partition(":")
    if kind == "whisper":
        return f"whisper:{Path(argument).expanduser().resolve()}"
    return f"substitute:{embedder.dim}"


def build_encoder_config(
    options: SpeechTrainOptions, embedder: AudioEmbedder, model: MegaPortraitsBase
) -> SpeechEncoderConfig:
    """E_aud's config: the overrides, the embedder's width and spec, the model's code width."""
    fixed = {"audio_dim", "expression_dim", "embedder"} & set(options.encoder_overrides)
    if fixed:
        raise InputError(
            f"{', '.join(sorted(fixed))} follow the audio embedder and the base model; "
            "they cannot be set"
        )
    try:
        return SpeechEncoderConfig(
            **options.encoder_overrides,
            audio_dim=embedder.dim,
            expression_dim=model.config.expression_dim,
            embedder=embedder_spec(options.audio_embedder, embedder),
        )
    except TypeError as exc:
        raise InputError(f"bad E_aud setting: {exc}") from None


def load_networks(options: SpeechTrainOptions) -> dict[str, nn.Module | None]:
    """VGGFace and the face parser for the terms that need them and are weighted."""
    from neuralhead.pretrained.face_parser import FaceParser
    from neuralhead.pretrained.vggface import VGGFace

    weights = options.weights
    networks: dict[str, nn.Module | None] = {"vggface": None, "face_parser": None}
    if weights["vggface"]:
        networks["vggface"] = load_optional_network(
            VGGFace.from_pretrained, options.vggface_weights, "VGGFace (L_face of E_aud)"
        )
    if weights["bce"] or weights["lips"]:
        networks["face_parser"] = load_optional_network(
            FaceParser.from_pretrained,
            options.face_parser_weights,
            "Face parser (L_BCE of E_aud; L_lips then takes its mask from the landmarks)",
        )
    return networks


def _read_run(run_dir: Path) -> dict[str, Any]:
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise InputError(f"cannot resume: {run_dir} has no config.json")
    run = json.loads(saved.read_text())
    if run.get("model") != RUN_MODEL:
        raise InputError(f"cannot resume: {run_dir} is a {run.get('model')} run, not {RUN_MODEL}")
    return run


def train_speech_encoder(
    data_dirs: list[str | Path],
    run_dir: str | Path,
    options: SpeechTrainOptions,
    engine_options: EngineOptions,
    resume: bool = False,
    *,
    networks: dict[str, nn.Module | None] | None = None,
) -> Path:
    """Train (or resume) E_aud on prepared datasets with audio; returns the run directory.

    When resuming, the run's data, options and E_aud config are used and ``data_dirs`` and
    ``options`` are ignored. ``networks`` (``"vggface"``, ``"face_parser"``) replace the
    networks loaded from their weight files. A new run is evaluated before its first step.
    Works under torchrun.
    """
    run_dir = Path(run_dir)
    encoder_config = None
    if resume:
        run = _read_run(run_dir)
        engine_options = replace(engine_options, seed=run["engine"]["seed"])
        data_dirs = run["data"]
        options = SpeechTrainOptions(**run["train"])
        encoder_config = config_from_dict(SpeechEncoderConfig, run["encoder_config"])
    else:
        if not data_dirs:
            raise InputError("give prepared dataset directories with audio to train E_aud on")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise InputError(
                f"run directory {run_dir} already exists; pass --resume to continue it "
                "or choose another --run-dir"
            )
        if options.base_model is None:
            raise InputError(
                "give the trained main model (--base-model RUN) whose E_motion teaches E_aud"
            )
        options.check()
        options = replace(
            options,
            base_model=str(Path(options.base_model).resolve()),
            num_iterations=options.num_iterations or engine_options.max_steps,
        )
    data_dirs = [Path(d) for d in data_dirs]
    model = load_main_model(options.base_model)

    engine = Engine.create(run_dir, engine_options)
    task = None
    try:
        embedder = load_audio_embedder(options.audio_embedder, device=str(engine.device))
        if encoder_config is None:
            encoder_config = build_encoder_config(options, embedder, model)
        mouth_pca = None
        if resume:
            mouth_pca = ExpressionPCA.load(run_dir / MOUTH_BASIS_FILE)
        elif options.mouth_basis is not None:
            mouth_pca = ExpressionPCA.load(options.mouth_basis)
        if networks is None:
            networks = load_networks(options)
        task = SpeechTask(
            engine, data_dirs, options, model, encoder_config, embedder, mouth_pca, networks
        )
        basis_origin = task.basis_origin
        if not resume and options.mouth_basis is not None:
            basis_origin = f"read from {options.mouth_basis}"
        record = {
            "model": RUN_MODEL,
            "neuralhead_version": __version__,
            "data": [str(d.resolve()) for d in data_dirs],
            "base_model": options.base_model,
            "embedder": encoder_config.embedder,
            "train": asdict(options),
            "engine": asdict(engine.options),
            "encoder_config": config_to_dict(encoder_config),
            "losses": task.loss_names,
            "unavailable_losses": task.loss.unavailable,
            "world_size": engine.world_size,
        }
        engine.prepare_run_dir(record, resume)
        if basis_origin is not None:
            if engine.is_main:
                task.mouth_pca.save(run_dir / MOUTH_BASIS_FILE)
            train_log.info(
                "mouth basis Z_m (%d components) %s, saved as %s",
                task.mouth_pca.num_components,
                basis_origin,
                run_dir / MOUTH_BASIS_FILE,
            )
        train_log.info(
            "E_aud on %d runs of consecutive frames in %d datasets (embedder %s); losses: %s; "
            "left out for missing weights: %s",
            len(task.train_set.runs),
            len(task.train_set.dirs),
            encoder_config.embedder,
            ", ".join(task.loss_names),
            ", ".join(task.loss.unavailable) or "none",
        )
        engine.barrier()
        start = engine.load_latest(task) if resume else 0
        if start == 0:
            metrics = task.evaluate(0)
            if metrics:
                engine.write_stats(0, "eval", metrics)
            engine.seed_for_rank()
        engine.fit(task, start)
    finally:
        task = None  # Engine.close frees its DDP wrappers while the process group lives
        engine.close()
    return run_dir


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``neuralhead train emoportraits-speech``."""
    p = parser
    # fmt: off
    p.add_argument("data_dirs", type=Path, nargs="*", metavar="DATA_DIR",
                   help="prepared datasets with audio (not needed with --resume)")
    p.add_argument("--base-model", default=None, metavar="RUN",
                   help="the trained EMOPortraits main model (run or model directory), kept frozen")
    p.add_argument("--audio-embedder", default=None, metavar="SPEC",
                   help="substitute (default, offline), substitute:DIM or whisper:PATH")
    p.add_argument("--mouth-basis", default=None, metavar="FILE",
                   help="mouth PCA basis Z_m (default: computed from the first DATA_DIR)")
    p.add_argument("--mouth-basis-frames", type=cli_args.positive_int, default=None, metavar="N",
                   help="frames the computed mouth basis uses (default: all)")
    p.add_argument("--min-clip", type=cli_args.positive_int, default=50, metavar="N",
                   help="shortest training clip in frames (default 50)")
    p.add_argument("--max-clip", type=cli_args.positive_int, default=200, metavar="N",
                   help="longest clip in frames (default 200)")
    p.add_argument("--render-frames", type=int, default=4, metavar="N",
                   help="frames per clip rendered for the photometric losses (default 4; 0: none)")
    p.add_argument("--eval-clips", type=cli_args.positive_int, default=4, metavar="N",
                   help="held-out clips per evaluation (default 4)")
    p.add_argument("--lr", type=float, default=1e-4, help="initial learning rate (default 1e-4)")
    p.add_argument("--schedule-steps", type=cli_args.positive_int, default=None, metavar="N",
                   help="steps over which the learning rate decays to 0 (default: --max-steps)")
    p.add_argument("--vggface-weights", default=None, metavar="PATH",
                   help="VGGFace weights (default: the weight cache)")
    p.add_argument("--parser-weights", dest="face_parser_weights", default=None, metavar="PATH",
                   help="face-parser file or its directory (default: the weight cache; without it the "
                   "lip-mask BCE is off and the lips L1 takes its mask from the landmarks)")
    p.add_argument("--cache-limit-gb", type=float, default=4.0,
                   help="frames and masks are kept in memory up to this size (default 4)")
    # fmt: on
    cli_args.add_run_arguments(p)
    p.epilog = (
        "--set weight_NAME=W sets a loss weight of supplementary 2.3 (NAME: "
        f"{', '.join(SPEECH_WEIGHTS)}); any other --set FIELD=VALUE a field of E_aud's config "
        "(hidden_dim, audio_context, num_layers, negative_slope)."
    )


def options_from_args(args: argparse.Namespace) -> SpeechTrainOptions:
    """The options of a parsed command; ``--set weight_NAME=W`` sets a loss weight, any other
    ``--set FIELD=VALUE`` a field of E_aud's config."""
    overrides = dict(args.overrides)
    weights = {
        k[len("weight_") :]: float(v) for k, v in overrides.items() if k.startswith("weight_")
    }
    encoder = {k: v for k, v in overrides.items() if not k.startswith("weight_")}
    return SpeechTrainOptions(
        base_model=args.base_model,
        audio_embedder=args.audio_embedder,
        mouth_basis=args.mouth_basis,
        mouth_basis_frames=args.mouth_basis_frames,
        min_clip=args.min_clip,
        max_clip=args.max_clip,
        render_frames=args.render_frames,
        batch_size=args.batch_size or 1,
        lr=args.lr,
        num_iterations=args.schedule_steps,
        eval_clips=args.eval_clips,
        vggface_weights=args.vggface_weights,
        face_parser_weights=args.face_parser_weights,
        cache_limit_gb=args.cache_limit_gb,
        loss_weights=weights,
        encoder_overrides=encoder,
    )


def run(args: argparse.Namespace) -> int:
    """``neuralhead train emoportraits-speech``: train E_aud, print the run directory."""
    if args.resume is None:
        if not args.data_dirs:
            raise InputError(
                "give prepared DATA_DIRs with audio to train E_aud on, or --resume RUN_DIR"
            )
        if args.base_model is None:
            raise InputError(
                "give the trained main model with --base-model RUN (its E_motion is the teacher)"
            )
    data = args.data_dirs[0] if args.data_dirs else args.resume
    run_dir = cli_args.train_run_dir(args, RUN_MODEL, data)
    if cli_args.should_relaunch(args):
        return cli_args.relaunch_with_torchrun(args.nproc_per_node, run_dir)
    engine_options = cli_args.engine_options(args, DEFAULT_STEPS)
    result = train_speech_encoder(
        args.data_dirs,
        run_dir,
        options_from_args(args),
        engine_options,
        resume=args.resume is not None,
    )
    if cli_args.is_main_process():
        print(f"run directory: {result}")
    return 0
