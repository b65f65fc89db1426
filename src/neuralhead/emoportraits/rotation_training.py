"""Training EMOPortraits' audio-to-rotation GAN on prepared talking videos (supplementary Sec. 3).

Data: prepared datasets with audio (docs/dataset.md). Each gives per-frame audio embeddings
(:func:`~neuralhead.emoportraits.audio_embedding.dataset_audio_embeddings`, cached in the
dataset) and its tracked head poses ``pose.npy``; poses of frames without a face
(``valid.npy`` False) are interpolated linearly from their neighbours. A sample is a window of
``sequence_length`` consecutive frames: its audio embeddings and its poses as transformations
from the window's first frame (:func:`~neuralhead.emoportraits.rotation_generator.relative_sequence`).
Training windows lie in the train split of each clip (starting every ``train_stride`` frames);
evaluation windows, non-overlapping, in its held-out part (the clip's end, never trained on).

A step (Sec. 3.4): ``critic_steps`` (5) updates of both critics on the WGAN-GP loss (Eq. 8,
penalty 10), each on a fresh batch, then one generator update on L_tot (Eq. 5) with the
critics frozen. Adam with the WGAN-GP paper's settings (lr 1e-4, betas (0, 0.9)), constant
learning rate (our choice: the paper gives no schedule).

Evaluation, on held-out windows: the L1 of rotations (6D) and translations to the real motion,
the mean angular speed (deg/s) of real and generated motion and their ratio (1 = as lively
as the speaker), and the mean angular acceleration (deg/s², a smoothness measure, see
:func:`~neuralhead.emoportraits.rotation_generator.angular_acceleration`) of real and generated
motion; speed and acceleration also after a Gaussian filter of ``eval_smoothing`` frames on
both, since tracked poses carry frame-to-frame jitter that raw real motion would count as
speed. Generated windows are placed at the real window's first pose. The preview plots yaw, pitch and roll over time, real
against generated.

The run directory is the training engine's (config.json, log.txt, stats.jsonl, previews/,
checkpoints/, resumable); at the end ``rotation/`` receives the generator (``config.json`` +
``model.safetensors``, with the audio embedder's spec in its config).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuralhead import __version__
from neuralhead.data.format import DatasetFiles
from neuralhead.emoportraits.audio_embedding import (
    AudioEmbedder,
    dataset_audio_embeddings,
    load_audio_embedder,
)
from neuralhead.emoportraits.checkpoints import ROTATION_SUBDIR
from neuralhead.emoportraits.rotation_generator import (
    RotationGenerator,
    RotationGeneratorConfig,
    angular_acceleration,
    angular_speed,
    apply_relative,
    build_discriminators,
    critic_loss,
    generator_loss,
    reconstruction_terms,
    relative_sequence,
    rotation_preset,
    smooth_head_motion,
)
from neuralhead.errors import InputError
from neuralhead.inference.common import interpolate_missing
from neuralhead.nn.pretrained import config_from_dict, config_to_dict
from neuralhead.training import cli_args
from neuralhead.training.engine import Engine, EngineOptions
from neuralhead.training.sampler import StepSampler

log = logging.getLogger(__name__)
train_log = logging.getLogger("neuralhead.train")

#: The ``model`` recorded in a run's config.json.
RUN_MODEL = "emoportraits-rotation"


@dataclass
class RotationTrainOptions:
    """Settings of an audio-to-rotation run (all recorded in the run's config.json).

    ``audio_embedder`` is the embedder spec (``load_audio_embedder``: ``substitute[:DIM]`` or
    ``whisper:PATH``; default the preset's); the generator's ``audio_dim`` follows the
    embedder. ``batch_size`` (windows per process and update) replaces the preset's.
    ``train_stride`` is the spacing in frames of training-window starts; at each evaluation
    up to ``eval_windows`` held-out windows are generated, and ``eval_smoothing`` is the
    Gaussian sigma (frames) of the smoothed variant measured beside the raw output.
    """

    preset: str = "rotation"
    audio_embedder: str | None = None
    batch_size: int | None = None
    train_stride: int = 1
    eval_windows: int = 32
    eval_smoothing: float = 2.0
    model_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class SpeechClip:
    """One prepared dataset: poses ``(N, 6)`` (gaps interpolated), audio ``(N, A)``, splits."""

    root: Path
    fps: float
    pose: torch.Tensor
    audio: torch.Tensor
    train: range
    heldout: range


def load_clip(dataset_dir: str | Path, embedder: AudioEmbedder) -> SpeechClip:
    """A dataset's poses and audio embeddings; an :class:`InputError` if it has no audio."""
    files = DatasetFiles.open(dataset_dir)
    if not files.has_audio:
        raise InputError(
            f"dataset {files.root} has no audio: the rotation generator learns head motion "
            "from speech, so every dataset needs a sound track"
        )
    valid = files.array("valid", mmap=False).astype(bool)
    if not valid.any():
        raise InputError(f"dataset {files.root} has no frame with a face")
    pose = interpolate_missing(files.array("pose", mmap=False).astype(np.float32), valid)
    audio = dataset_audio_embeddings(files.root, embedder).float()
    if audio.shape != (files.num_frames, embedder.dim):
        raise InputError(
            f"audio embeddings of {files.root} have shape {tuple(audio.shape)}, expected "
            f"({files.num_frames}, {embedder.dim})"
        )
    return SpeechClip(
        root=files.root,
        fps=files.fps,
        pose=torch.from_numpy(pose),
        audio=audio,
        train=files.split_range("train"),
        heldout=files.split_range("heldout"),
    )


class RotationWindows:
    """Windows of ``length`` frames of one split of the clips: ``items`` lists ``(clip, start)``;
    ``load(items)`` gives audio embeddings ``(B, length, A)`` and poses ``(B, length, 6)``."""

    def __init__(self, clips: list[SpeechClip], split: str, length: int, stride: int) -> None:
        if stride < 1:
            raise InputError(f"the window stride must be at least 1 frame, got {stride}")
        self.clips, self.length = clips, length
        self.items: list[tuple[int, int]] = []
        for c, clip in enumerate(clips):
            frames = clip.train if split == "train" else clip.heldout
            self.items += [(c, s) for s in range(frames.start, frames.stop - length + 1, stride)]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, items: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        audio = torch.stack([self.clips[c].audio[s : s + self.length] for c, s in items])
        pose = torch.stack([self.clips[c].pose[s : s + self.length] for c, s in items])
        return audio, pose


def _plot_angles(real: torch.Tensor, generated: torch.Tensor, fps: float, title: str) -> np.ndarray:
    """Yaw, pitch and roll (degrees) over time, real against generated, as RGB uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 6), dpi=80)
    canvas = FigureCanvasAgg(figure)
    seconds = np.arange(real.shape[0]) / fps
    axes = figure.subplots(3, 1, sharex=True)
    for axis, (name, column) in zip(axes, (("yaw", 1), ("pitch", 0), ("roll", 2))):
        axis.plot(seconds, np.degrees(real[:, column].numpy()), label="real")
        axis.plot(seconds, np.degrees(generated[:, column].numpy()), label="generated")
        axis.set_ylabel(f"{name} (deg)")
    axes[0].set_title(title)
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("time (s)")
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


class RotationTask:
    """The :class:`~neuralhead.training.engine.Task` of the audio-to-rotation GAN (module docstring)."""

    def __init__(
        self,
        engine: Engine,
        clips: list[SpeechClip],
        options: RotationTrainOptions,
        config: RotationGeneratorConfig,
    ) -> None:
        self.engine, self.options, self.config = engine, options, config
        length = config.sequence_length
        self.train_set = RotationWindows(clips, "train", length, options.train_stride)
        if not len(self.train_set):
            raise InputError(
                f"no training window: the train splits are shorter than sequence_length = "
                f"{length} frames"
            )
        self.heldout = RotationWindows(clips, "heldout", length, length)
        if not len(self.heldout):
            log.warning(
                "no held-out evaluation: the held-out parts are shorter than %d frames", length
            )
        self.batch_size = options.batch_size or max(1, config.batch_size // engine.world_size)

        self.raw_generator = RotationGenerator(config)
        self.raw_local, self.raw_global = build_discriminators(config)
        self.generator = engine.wrap(self.raw_generator)
        self.local_discriminator = engine.wrap(self.raw_local)
        self.global_discriminator = engine.wrap(self.raw_global)
        adam = dict(lr=config.lr, betas=tuple(config.betas))
        self.g_optimizer = torch.optim.Adam(self.raw_generator.parameters(), **adam)
        critics = [*self.raw_local.parameters(), *self.raw_global.parameters()]
        self.d_optimizer = torch.optim.Adam(critics, **adam)
        self.sampler = StepSampler(
            list(range(len(self.train_set))),
            self.batch_size,
            engine.options.seed,
            engine.rank,
            engine.world_size,
        )

    # ------------------------------------------------------------------ Task protocol
    def modules(self) -> dict[str, nn.Module]:
        return {
            "generator": self.generator,
            "local_discriminator": self.local_discriminator,
            "global_discriminator": self.global_discriminator,
        }

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.g_optimizer, "discriminators": self.d_optimizer}

    def schedulers(self) -> dict[str, Any]:
        return {}

    def _batch(self, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio ``(B, T, A)`` and relative motion ``(B, T, 9)`` of the ``draw``-th batch."""
        items = [self.train_set.items[i] for i in self.sampler.batch(draw)]
        audio, pose = self.train_set.load(items)
        device = self.engine.device
        return audio.to(device), relative_sequence(pose).to(device)

    def train_step(self, step: int) -> dict[str, float]:
        c = self.config
        # Each update draws its own batch; the draw index is a function of the step alone, so
        # a resumed run sees the same data.
        draws = c.critic_steps + 1
        self.generator.train()
        self.local_discriminator.train()
        self.global_discriminator.train()
        critic_stats: dict[str, float] = {}
        for k in range(c.critic_steps):
            audio, real = self._batch(step * draws + k)
            with torch.no_grad(), self.engine.autocast():
                fake = self.generator(audio).float()
            d_loss, d_terms = critic_loss(
                self.local_discriminator,
                self.global_discriminator,
                real,
                fake,
                audio,
                gp_weight=c.gp_weight,
                unwrapped=(self.raw_local, self.raw_global),
            )
            self.d_optimizer.zero_grad(set_to_none=True)
            self.engine.backward_and_step(d_loss, self.d_optimizer)
            for name, value in {"loss_d": d_loss, **d_terms}.items():
                critic_stats[name] = (
                    critic_stats.get(name, 0.0) + float(value.detach()) / c.critic_steps
                )

        audio, real = self._batch(step * draws + c.critic_steps)
        self.raw_local.requires_grad_(False)
        self.raw_global.requires_grad_(False)
        try:
            with self.engine.autocast():
                pred = self.generator(audio).float()
            total, terms = generator_loss(pred, real, audio, self.raw_local, self.raw_global, c)
            self.g_optimizer.zero_grad(set_to_none=True)
            self.engine.backward_and_step(total, self.g_optimizer)
        finally:
            self.raw_local.requires_grad_(True)
            self.raw_global.requires_grad_(True)
        stats = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        stats.update(loss=float(total.detach()), **critic_stats)
        return stats

    # ------------------------------------------------------------------ evaluation
    def eval_items(self) -> list[tuple[int, int]]:
        """Up to ``eval_windows`` held-out windows, evenly spread."""
        count = min(self.options.eval_windows, len(self.heldout))
        if count == 0:
            return []
        picks = np.unique(np.linspace(0, len(self.heldout) - 1, count).round().astype(int))
        return [self.heldout.items[p] for p in picks]

    @torch.no_grad()
    def generate_windows(
        self, windows: RotationWindows, items: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Real poses, generated relative motion ``(N, T, 9)`` and generated poses (CPU), the
        generated windows placed at their real first pose."""
        audio, real_pose = windows.load(items)
        self.raw_generator.eval()
        pred = self.raw_generator(audio.to(self.engine.device)).float().cpu()
        return real_pose, pred, apply_relative(real_pose[:, 0], pred)

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out L1, angular speed and acceleration (see the module docstring)."""
        items = self.eval_items()
        if not self.engine.is_main or not items:
            return {}
        real_pose, pred, generated = self.generate_windows(self.heldout, items)
        rot, trans = reconstruction_terms(pred, relative_sequence(real_pose))
        sigma, fps = self.options.eval_smoothing, self.config.fps
        smoothed = smooth_head_motion(generated, sigma)
        real_smoothed = smooth_head_motion(real_pose, sigma)
        speed_real = angular_speed(real_pose, fps)
        speed_generated = angular_speed(generated, fps)
        return {
            "heldout_l1_rot": float(rot),
            "heldout_l1_trans": float(trans),
            "speed_real": speed_real,
            "speed_generated": speed_generated,
            "speed_ratio": speed_generated / max(speed_real, 1e-9),
            "speed_smoothed": angular_speed(smoothed, fps),
            "speed_real_smoothed": angular_speed(real_smoothed, fps),
            "accel_real": angular_acceleration(real_pose, fps),
            "accel_generated": angular_acceleration(generated, fps),
            "accel_smoothed": angular_acceleration(smoothed, fps),
            "accel_real_smoothed": angular_acceleration(real_smoothed, fps),
        }

    def preview(self, step: int) -> np.ndarray:
        """Yaw, pitch and roll of a held-out window (a training one without held-out data)."""
        items = self.eval_items()[:1]
        windows, split = (self.heldout, "held-out") if items else (self.train_set, "train")
        items = items or [windows.items[len(windows) // 2]]
        real_pose, _, generated = self.generate_windows(windows, items)
        clip = windows.clips[items[0][0]].root.name
        title = f"step {step}: {split} window of {clip} from frame {items[0][1]}"
        return _plot_angles(real_pose[0], generated[0], self.config.fps, title)

    def finish(self, run_dir: Path) -> None:
        """Save the generator to ``run_dir/rotation``."""
        self.raw_generator.save_pretrained(run_dir / ROTATION_SUBDIR)


# ------------------------------------------------------------------------------- the run
def _embedder_spec(spec: str | None) -> str | None:
    """The spec with a Whisper directory made absolute, so inference finds it from anywhere."""
    if spec is not None and spec.startswith("whisper:"):
        return "whisper:" + str(Path(spec.split(":", 1)[1]).expanduser().resolve())
    return spec


def run_config(
    data_dirs: list[Path],
    options: RotationTrainOptions,
    config: RotationGeneratorConfig,
    engine: Engine,
) -> dict[str, Any]:
    return {
        "model": RUN_MODEL,
        "neuralhead_version": __version__,
        "data": [str(Path(d).resolve()) for d in data_dirs],
        "train": asdict(options),
        "engine": asdict(engine.options),
        "model_config": config_to_dict(config),
        "world_size": engine.world_size,
    }


def train_rotation_generator(
    data_dirs: list[str | Path],
    run_dir: str | Path,
    options: RotationTrainOptions,
    engine_options: EngineOptions,
    resume: bool = False,
    *,
    embedder: AudioEmbedder | None = None,
) -> Path:
    """Train (or resume) an audio-to-rotation run; returns the run directory.

    ``data_dirs`` are prepared datasets with audio, all at one frame rate (which becomes the
    generator's ``fps``). ``embedder`` replaces the one loaded from the spec (the spec is still
    what the run records for inference). When resuming, the run's data, options and config are
    used and ``data_dirs`` and ``options`` are ignored. A new run is evaluated once before its
    first step, so that its stats hold the starting point. Works under torchrun.
    """
    run_dir = Path(run_dir)
    if resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise InputError(f"cannot resume: {run_dir} has no config.json")
        run = json.loads(saved.read_text())
        if run.get("model") != RUN_MODEL:
            raise InputError(
                f"cannot resume: {run_dir} is a {run.get('model')} run, not {RUN_MODEL}"
            )
        engine_options = replace(engine_options, seed=run["engine"]["seed"])
        data_dirs = run["data"]
        options = RotationTrainOptions(**run["train"])
        config = config_from_dict(RotationGeneratorConfig, run["model_config"])
    else:
        if not data_dirs:
            raise InputError("give prepared dataset directories with audio to train on")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise InputError(
                f"run directory {run_dir} already exists; pass --resume to continue it "
                "or choose another --run-dir"
            )
        config = rotation_preset(options.preset, **options.model_overrides)
        if options.batch_size is not None:
            config = replace(config, batch_size=options.batch_size)
        spec = _embedder_spec(options.audio_embedder) or config.embedder
        options = replace(options, audio_embedder=spec)
        config = replace(config, embedder=spec)
    if embedder is None:
        embedder = load_audio_embedder(config.embedder)
    data_dirs = [Path(d) for d in data_dirs]
    clips = [load_clip(d, embedder) for d in data_dirs]
    rates = sorted({clip.fps for clip in clips})
    if len(rates) > 1:
        raise InputError(
            f"the datasets have different frame rates ({', '.join(f'{r:g}' for r in rates)} fps); "
            "head motion is learnt per frame, so train on videos of one rate"
        )
    if resume:
        if embedder.dim != config.audio_dim or rates[0] != config.fps:
            raise InputError(
                f"cannot resume: the run's generator reads {config.audio_dim}-d audio at "
                f"{config.fps:g} fps, the data gives {embedder.dim}-d at {rates[0]:g} fps"
            )
    else:
        config = replace(config, audio_dim=embedder.dim, fps=rates[0])

    engine = Engine.create(run_dir, engine_options)
    task = None
    try:
        task = RotationTask(engine, clips, options, config)
        engine.prepare_run_dir(run_config(data_dirs, options, config, engine), resume)
        train_log.info(
            "audio-to-rotation GAN on %d videos: %d training and %d held-out windows of %d "
            "frames; audio embedder %s (%d values per frame)",
            len(clips),
            len(task.train_set),
            len(task.heldout),
            config.sequence_length,
            config.embedder,
            config.audio_dim,
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


# ----------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``neuralhead train emoportraits-rotation``."""
    parser.add_argument(
        "data_dirs",
        type=Path,
        nargs="*",
        metavar="DATA_DIR",
        help="prepared datasets with audio (not needed with --resume)",
    )
    parser.add_argument(
        "--audio-embedder",
        default=None,
        metavar="SPEC",
        help="per-frame audio features: substitute[:DIM] (offline stand-in, "
        "default) or whisper:PATH (a local Whisper model directory)",
    )
    parser.add_argument(
        "--preset", default="rotation", help="rotation (default) or rotation-tiny (CPU smoke runs)"
    )
    parser.add_argument(
        "--eval-windows",
        type=cli_args.positive_int,
        default=32,
        help="held-out windows generated at each evaluation (default 32)",
    )
    parser.add_argument(
        "--eval-smoothing",
        type=float,
        default=2.0,
        metavar="SIGMA",
        help="Gaussian sigma in frames of the smoothed output measured at evaluation (default 2)",
    )
    cli_args.add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``neuralhead train emoportraits-rotation`` from parsed arguments."""
    if args.resume is None and not args.data_dirs:
        raise InputError("give prepared DATA_DIRs with audio to train on, or --resume RUN_DIR")
    run_dir = cli_args.train_run_dir(
        args, RUN_MODEL, args.data_dirs[0] if args.data_dirs else args.resume
    )
    if cli_args.should_relaunch(args):
        return cli_args.relaunch_with_torchrun(args.nproc_per_node, run_dir)
    overrides = dict(args.overrides)
    engine_options = cli_args.engine_options(
        args, rotation_preset(args.preset, **overrides).num_iterations
    )
    options = RotationTrainOptions(
        preset=args.preset,
        audio_embedder=args.audio_embedder,
        batch_size=args.batch_size,
        eval_windows=args.eval_windows,
        eval_smoothing=args.eval_smoothing,
        model_overrides=overrides,
    )
    result = train_rotation_generator(
        args.data_dirs, run_dir, options, engine_options, resume=args.resume is not None
    )
    if cli_args.is_main_process():
        print(f"run directory: {result}")
    return 0
