"""Training HeadGAN by self-reenactment on prepared videos (Sec. 4.1, App. B).

Each step draws a batch of (reference, target) pairs from the same videos
(:class:`~neuralhead.headgan.dataset.HeadGANPairs`), updates the generator G = (F, R) on
L_G (Eq. 8) with the discriminators judging its frames, then the discriminators D and D_m on
L_D + L_Dm (Eqs. 4, 5, 9) with the generated frames detached. Adam with the config's learning
rate and betas (2e-4, (0.5, 0.999), Sec. 4.1) for both, constant (the paper gives no schedule).
The authors update the discriminators once per several generator steps (IMPLEMENTATION_NOTES);
``d_every`` sets how many (1 by default, our choice).

Evaluation is self-reenactment on the held-out end of the first dataset, which no step trains
on: its first valid frame is the reference and the other held-out frames are reconstructed from
their 3D faces. The model's L1 (0-255) and PSNR are reported beside those of the "no motion"
baseline, which predicts the reference frame itself, and those of the warped reference.

The run directory is the engine's (config.json, log.txt, stats.jsonl, previews/,
checkpoints/) plus ``face_model.npz``, written at the start and reused on resumption; when
training ends, ``headgan/`` receives what inference needs: the generator (``config.json`` +
``model.safetensors``), ``face_model.npz`` and ``audio_stats.npz`` (see :func:`train_headgan`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from neuralhead import __version__
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.fileio import write_atomic
from neuralhead.headgan.config import HeadGANConfig, preset
from neuralhead.headgan.dataset import AudioStatistics, HeadGANPairs
from neuralhead.headgan.discriminators import HeadGANDiscriminators
from neuralhead.headgan.face_model import MorphableModel, build_face_model
from neuralhead.headgan.generator import HeadGANGenerator
from neuralhead.headgan.losses import HeadGANLoss
from neuralhead.metrics.image import l1_255, psnr
from neuralhead.nn.pretrained import config_from_dict, config_to_dict
from neuralhead.pretrained.vgg import VGG19
from neuralhead.training.engine import Engine, EngineOptions
from neuralhead.training.sampler import StepSampler
from neuralhead.visualize import grid, label, to_uint8

log = logging.getLogger(__name__)
train_log = logging.getLogger("neuralhead.train")

FACE_MODEL_FILE = "face_model.npz"
AUDIO_STATS_FILE = "audio_stats.npz"
EXPORT_DIR = "headgan"


@dataclass
class HeadGANTrainOptions:
    """Settings of a HeadGAN run (all recorded in the run's config.json).

    ``lr`` replaces the config's learning rate of both optimisers when given. ``face_model``
    is a saved :class:`~neuralhead.headgan.face_model.MorphableModel` (``.npz``); without it
    one is learned from the training datasets. ``vgg_weights`` is the VGG19 weight file (or
    its directory); without it the weight cache is searched, and if the file is not there the
    two VGG terms of Eq. 8 are left out (with a warning), never replaced.
    """

    preset: str = "headgan-256"
    batch_size: int = 4  # pairs per step on each process
    lr: float | None = None
    d_every: int = 1  # discriminator update once per this many generator steps
    vgg_weights: str | None = None
    face_model: str | None = None
    audio_recognizer: str | None = None  # speech recogniser of the audio features (default)
    cache_limit_gb: float = 4.0  # keep training frames in memory below this size
    eval_frames: int = 32  # held-out frames reconstructed at each evaluation
    model_overrides: dict[str, Any] = field(default_factory=dict)


def build_config(options: HeadGANTrainOptions) -> HeadGANConfig:
    """The model config: the preset with the user's overrides and learning rate."""
    overrides = dict(options.model_overrides)
    if options.lr is not None:
        overrides["learning_rate"] = options.lr
    try:
        return preset(options.preset, **overrides)
    except TypeError as exc:
        raise InputError(f"bad model override: {exc}") from None


def load_vgg(path: str | None) -> nn.Module | None:
    """VGG19 for the perceptual terms, or None when its weights are absent (and none were named)."""
    try:
        return VGG19.from_pretrained(path)
    except WeightsMissingError as exc:
        if path is not None:
            raise
        log.warning(
            "VGG19 weights not found, so HeadGAN trains WITHOUT the VGG terms of Eq. 8 "
            "(lambda_vgg, lambda_warp_vgg); pass --vgg-weights to use them. %s",
            exc,
        )
        return None


def flow_image(flow: torch.Tensor, max_magnitude: float | None = None) -> np.ndarray:
    """A flow ``(2, H, W)`` in pixels as HxWx3 uint8: hue = direction, brightness = length.

    Lengths are scaled by ``max_magnitude`` (default: the flow's largest, at least one pixel).
    """
    dx, dy = flow.detach().float().cpu().numpy()
    magnitude = np.hypot(dx, dy)
    top = max(float(magnitude.max()), 1.0) if max_magnitude is None else max_magnitude
    hsv = np.zeros((*dx.shape, 3), np.uint8)
    hsv[..., 0] = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * 179).astype(np.uint8)
    hsv[..., 1] = 255
    hsv[..., 2] = (np.clip(magnitude / top, 0, 1) * 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _rgb(images: torch.Tensor) -> np.ndarray:
    """The first image of a batch in [0, 1] as HxWx3 uint8."""
    return to_uint8(images[0], (0.0, 1.0))


def _split_features(features: list[list[torch.Tensor]] | None, batch: int) -> tuple[Any, Any]:
    """Discriminator features of ``cat([a, b])`` -> the features of ``a`` and of ``b``."""
    if features is None:
        return None, None
    first = [[f[:batch] for f in scale] for scale in features]
    second = [[f[batch:] for f in scale] for scale in features]
    return first, second


class HeadGANTask:
    """The :class:`~neuralhead.training.engine.Task` that trains HeadGAN."""

    def __init__(
        self,
        engine: Engine,
        data_dirs: list[Path],
        options: HeadGANTrainOptions,
        config: HeadGANConfig,
        face_model: MorphableModel,
    ) -> None:
        if options.d_every < 1 or options.batch_size < 1:
            raise InputError("batch_size and d_every must be at least 1")
        self.engine, self.options, self.config = engine, options, config
        self.face_model = face_model
        self.vgg = load_vgg(options.vgg_weights)
        progress = engine.is_main and engine.options.progress
        common = dict(recognizer=options.audio_recognizer, device=engine.device, progress=progress)
        self.train_set = HeadGANPairs(
            data_dirs, face_model, config, "train", cache_limit_gb=options.cache_limit_gb, **common
        )
        self.heldout = self._heldout_set(data_dirs[0], common)
        self.audio_stats = self.train_set.audio_statistics

        self.raw_generator = HeadGANGenerator(config)
        self.raw_discriminators = HeadGANDiscriminators(config)
        self.generator = engine.wrap(self.raw_generator)
        self.discriminators = engine.wrap(self.raw_discriminators)
        self.loss = HeadGANLoss(config, self.vgg).to(engine.device)
        adam = dict(lr=config.learning_rate, betas=tuple(config.betas))
        self.g_optimizer = torch.optim.Adam(self.raw_generator.parameters(), **adam)
        self.d_optimizer = torch.optim.Adam(self.raw_discriminators.parameters(), **adam)
        self.sampler = StepSampler(
            list(range(len(self.train_set))),
            options.batch_size,
            engine.options.seed,
            engine.rank,
            engine.world_size,
        )
        self._preview_items = self._pick_preview_items()

    def _heldout_set(self, data_dir: Path, common: dict[str, Any]) -> HeadGANPairs | None:
        try:
            heldout = HeadGANPairs([data_dir], self.face_model, self.config, "heldout", **common)
        except InputError as exc:
            log.warning("no held-out evaluation: %s", exc)
            return None
        if len(heldout) < 2:
            log.warning("no held-out evaluation: %s has fewer than 2 held-out frames", data_dir)
            return None
        return heldout

    # ------------------------------------------------------------------ Task protocol
    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminators": self.discriminators}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.g_optimizer, "discriminators": self.d_optimizer}

    def schedulers(self) -> dict[str, Any]:
        return {}

    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        # References are drawn from a generator seeded by the step, so that a resumed run
        # sees the same pairs as an uninterrupted one.
        seed = (self.engine.options.seed * 1_000_003 + step) * 4099 + self.engine.rank
        generator = torch.Generator().manual_seed(seed)
        return self.train_set.batch(self.sampler.batch(step), generator)

    def _discriminate(
        self,
        discriminators: nn.Module,
        fake: torch.Tensor,
        batch: dict[str, torch.Tensor],
    ) -> tuple[Any, Any, Any, Any]:
        """D and D_m on generated and real frames in one pass (one forward per DDP backward).

        Returns the features of fake and real frames for D, then for D_m (None without it).
        """
        b = fake.shape[0]
        render = batch["driving"][:, -self.config.render_channels :]
        audio = batch["audio"] if self.config.use_audio else None
        image_features, mouth_features = discriminators(
            torch.cat([fake, batch["target"]]),
            torch.cat([render, render]),
            torch.cat([batch["mouth_center"], batch["mouth_center"]]),
            None if audio is None else torch.cat([audio, audio]),
        )
        return (*_split_features(image_features, b), *_split_features(mouth_features, b))

    def train_step(self, step: int) -> dict[str, float]:
        batch = self._batch(step)
        audio = batch["audio"] if self.config.use_audio else None
        render = batch["driving"][:, -self.config.render_channels :]
        self.generator.train()
        self.discriminators.train()

        # Generator step: the discriminators judge the attached fake, but only G is updated;
        # their weights are frozen for it and the unwrapped module is used, so no gradient
        # of theirs is computed or synchronised.
        self.raw_discriminators.requires_grad_(False)
        with self.engine.autocast():
            out = self.generator(
                batch["driving"], batch["reference_image"], batch["reference_render"], audio
            )
            d_fake, d_real, dm_fake, dm_real = self._discriminate(
                self.raw_discriminators, out["image"], batch
            )
            g_total, g_terms = self.loss.generator_loss(
                out,
                batch["target"],
                d_fake=d_fake,
                d_real=d_real,
                dm_fake=dm_fake,
                dm_real=dm_real,
                render=render,
            )
        self.g_optimizer.zero_grad(set_to_none=True)
        self.engine.backward_and_step(g_total, self.g_optimizer)
        self.raw_discriminators.requires_grad_(True)
        stats = {f"loss_{name}": float(value) for name, value in g_terms.items()}
        stats["loss"] = float(g_total.detach())

        if step % self.options.d_every == 0:
            with self.engine.autocast():
                d_fake, d_real, dm_fake, dm_real = self._discriminate(
                    self.discriminators, out["image"].detach(), batch
                )
                d_total, d_terms = self.loss.discriminator_loss(d_real, d_fake, dm_real, dm_fake)
            self.d_optimizer.zero_grad(set_to_none=True)
            self.engine.backward_and_step(d_total, self.d_optimizer)
            stats.update({f"loss_{name}": float(value) for name, value in d_terms.items()})
        with torch.no_grad():
            image = out["image"].detach().float()
            stats["l1_255"] = float(l1_255(image, batch["target"]).mean())
        return stats

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The generator's output for a batch, in eval mode."""
        self.raw_generator.eval()
        out = self.raw_generator(
            batch["driving"],
            batch["reference_image"],
            batch["reference_render"],
            batch["audio"] if self.config.use_audio else None,
        )
        return {k: v.float() for k, v in out.items()}

    def heldout_items(self) -> list[tuple[int, int, int]]:
        """Self-reenactment of the held-out frames from the first held-out frame."""
        if self.heldout is None:
            return []
        frames = self.heldout.valid_frames(0)
        reference, targets = int(frames[0]), frames[1:]
        picks = np.linspace(0, len(targets) - 1, min(self.options.eval_frames, len(targets)))
        return [(0, int(targets[i]), reference) for i in np.unique(picks.round().astype(int))]

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.engine.is_main or self.heldout is None:
            return {}
        items = self.heldout_items()
        sums: dict[str, float] = {}
        for start in range(0, len(items), self.options.batch_size):
            batch = self.heldout.pairs(items[start : start + self.options.batch_size])
            out = self.generate(batch)
            target = batch["target"]
            predictions = {
                "heldout": out["image"].clamp(0, 1),
                "warped": out["warped_image"].clamp(0, 1),
                "baseline": batch["reference_image"],
            }
            for name, prediction in predictions.items():
                for metric, fn in (("l1", l1_255), ("psnr", psnr)):
                    key = f"{name}_{metric}"
                    sums[key] = sums.get(key, 0.0) + float(fn(prediction, target).sum())
        return {key: value / len(items) for key, value in sums.items()}

    def _pick_preview_items(self) -> list[tuple[HeadGANPairs, tuple[int, int, int]]]:
        frames = self.train_set.valid_frames(0)
        picks = [
            (self.train_set, (0, int(frames[i]), int(frames[0])))
            for i in np.linspace(len(frames) // 3, len(frames) - 1, 2).astype(int)
        ]
        heldout = self.heldout_items()
        if heldout:
            picks += [(self.heldout, heldout[i]) for i in sorted({0, len(heldout) - 1})]
        return picks

    def preview(self, step: int) -> np.ndarray:
        """Rows of reference | driving render | flow | warped | generated | target."""
        rows = []
        for dataset, item in self._preview_items:
            batch = dataset.pairs([item])
            out = self.generate(batch)
            split = "train" if dataset is self.train_set else "held-out"
            rows.append(
                [
                    label(_rgb(batch["reference_image"]), f"reference #{item[2]}"),
                    label(_rgb(batch["driving"][:, -3:]), "driving 3D face"),
                    label(flow_image(out["flow"][0]), "flow"),
                    label(_rgb(out["warped_image"]), "warped"),
                    label(_rgb(out["image"]), "generated"),
                    label(_rgb(batch["target"]), f"{split} #{item[1]}"),
                ]
            )
        return grid(rows)

    def finish(self, run_dir: Path) -> None:
        """Export what inference needs to ``run_dir/headgan`` (see the module docstring)."""
        export(run_dir / EXPORT_DIR, self.raw_generator, self.face_model, self.audio_stats)


def export(
    directory: Path,
    generator: HeadGANGenerator,
    face_model: MorphableModel,
    audio_stats: AudioStatistics | None,
) -> Path:
    """Write the generator, the face model and (with audio) the audio statistics."""
    generator.save_pretrained(directory)
    write_atomic(directory / FACE_MODEL_FILE, face_model.save)
    if audio_stats is not None:
        audio_stats.save(directory / AUDIO_STATS_FILE)
    return directory


def run_config(
    data_dirs: list[Path],
    options: HeadGANTrainOptions,
    config: HeadGANConfig,
    engine: Engine,
    vgg: bool,
) -> dict[str, Any]:
    return {
        "model": "headgan",
        "neuralhead_version": __version__,
        "data": [str(Path(d).resolve()) for d in data_dirs],
        "train": asdict(options),
        "engine": asdict(engine.options),
        "model_config": config_to_dict(config),
        "vgg_loss": vgg,
        "world_size": engine.world_size,
    }


def train_headgan(
    data_dirs: list[str | Path],
    run_dir: str | Path,
    options: HeadGANTrainOptions,
    engine_options: EngineOptions,
    resume: bool = False,
) -> Path:
    """Train (or resume) a HeadGAN run on prepared datasets; returns the run directory.

    ``data_dirs`` are the training videos (one prepared dataset each); the held-out part of
    the first is used for evaluation. When resuming, the data, options, model config and face
    model of the run are used and ``data_dirs`` and ``options`` are ignored. Works under
    torchrun.
    """
    run_dir = Path(run_dir)
    run = None
    if resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise InputError(f"cannot resume: {run_dir} has no config.json")
        run = json.loads(saved.read_text())
        if run.get("model") != "headgan":
            raise InputError(f"cannot resume: {run_dir} is a {run.get('model')} run, not headgan")
        engine_options = replace(engine_options, seed=run["engine"]["seed"])
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise InputError(
            f"run directory {run_dir} already exists; pass --resume to continue it "
            "or choose another --run-dir"
        )
    if run is not None:
        data_dirs = run["data"]
        options = HeadGANTrainOptions(**run["train"])
        config = config_from_dict(HeadGANConfig, run["model_config"])
        face_model = MorphableModel.load(run_dir / FACE_MODEL_FILE)
    else:
        if not data_dirs:
            raise InputError("give at least one prepared dataset directory to train on")
        config = build_config(options)
        if options.face_model is not None:
            face_model = MorphableModel.load(options.face_model)
        else:
            face_model = build_face_model(data_dirs)
    data_dirs = [Path(d) for d in data_dirs]

    engine = Engine.create(run_dir, engine_options)
    task = None
    try:
        task = HeadGANTask(engine, data_dirs, options, config, face_model)
        vgg = task.vgg is not None
        engine.prepare_run_dir(run_config(data_dirs, options, config, engine, vgg), resume)
        if engine.is_main and not resume:
            write_atomic(run_dir / FACE_MODEL_FILE, face_model.save)
        train_log.info(
            "HeadGAN on %d videos (%d training frames), face model: %s; VGG terms: %s",
            len(data_dirs),
            len(task.train_set),
            face_model.description,
            "on" if vgg else "OFF (weights missing)",
        )
        engine.barrier()
        start = engine.start_or_resume(task, resume)
        engine.fit(task, start)
    finally:
        task = None  # Engine.close frees its DDP wrappers while the process group lives
        engine.close()
    return run_dir
