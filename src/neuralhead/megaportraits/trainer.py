"""Training the MegaPortraits base model G_base on prepared videos (Sec. 3.1, 4.1, B.1).

Each step draws a batch of samples (:class:`~neuralhead.megaportraits.dataset.MegaPortraitsPairs`):
a source x_s and a driver x_d of one video, and x_s*, x_d* of another. Source and driver are
augmented together (colour jitter and flip, B.1); the driver's face crop that the expression
encoder reads is then warped and jittered severely (:class:`DriverAugmentation`, B.1). The
generator computes x_s->d = G_base(x_s, x_d) and the cross-reenactment x_s*->d =
G_base(x_s*, x_d), and reads the expression codes of both outputs and of x_d* back with
E_mtn for the cycle-consistency loss; it is updated on L_base (Eq. 8,
:class:`~neuralhead.megaportraits.losses.MegaPortraitsLoss`) against the driver with its
background replaced, judged by a multi-scale patch discriminator, which is then updated on
the hinge loss with the outputs detached.

Optimisation (Sec. 4.1, B.1): AdamW with betas (0.5, 0.999), eps 1e-8, weight decay 1e-2 for
generator and discriminator, the learning rate decayed from 2e-4 to 1e-6 by a cosine over
the config's ``num_iterations`` (a new run sets it to its step limit unless it is given), so
that a resumed run with a later step limit keeps the schedule it started with. On a GPU the forward passes run under bf16 / fp16 autocast (the engine's
``--precision``).

The head-pose network is pre-trained and frozen (Sec. 3.1, A.1): a run needs its weights
(``pose_network``, a file from ``neuralhead train megaportraits-pose``) and refuses to start
without them; it is never trained jointly here (our decision: the paper does not, and an
untrained pose would make the rigid warps meaningless).

Evaluation is self-reenactment on the held-out frames of every dataset, which no step trains
on: per video, its first held-out frame is the source and evenly spaced held-out frames are
the drivers; the cross pair of each sample comes from the next video's held-out frames. It
reports the L1 (0-255) and PSNR against the foreground target beside those of the "no
motion" baseline (the masked source itself), and the contrastive ranking (the fraction of
positive pairs of Eq. 7 that are more similar than the negative ones, 0.5 = chance).

The run directory is the engine's (config.json, log.txt, stats.jsonl, previews/,
checkpoints/); at the end ``megaportraits/`` receives the base model (``config.json`` +
``model.safetensors``, pose network included) for :meth:`MegaPortraitsBase.from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuralhead import __version__
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.megaportraits.augmentation import DriverAugmentation, PairAugmentation
from neuralhead.megaportraits.base_model import DriverMotion, MegaPortraitsBase, SourceState
from neuralhead.megaportraits.config import MegaPortraitsConfig, preset
from neuralhead.megaportraits.dataset import MegaPortraitsPairs
from neuralhead.megaportraits.losses import (
    MegaPortraitsLoss,
    contrastive_ranking,
    foreground,
    pyramid_levels,
)
from neuralhead.metrics.image import l1_255, psnr
from neuralhead.nn.discriminators import MultiScalePatchDiscriminator
from neuralhead.nn.pretrained import config_from_dict, config_to_dict
from neuralhead.pretrained.gaze import GazeBlinkNet
from neuralhead.pretrained.vgg import VGG19
from neuralhead.pretrained.vggface import VGGFace
from neuralhead.training import cli_args
from neuralhead.training.engine import Engine, EngineOptions
from neuralhead.training.sampler import StepSampler
from neuralhead.visualize import grid, label, to_uint8

log = logging.getLogger(__name__)
train_log = logging.getLogger("neuralhead.train")

EXPORT_DIR = "megaportraits"


@dataclass
class MegaPortraitsTrainOptions:
    """Settings of a MegaPortraits base-model run (all recorded in the run's config.json).

    ``batch_size`` and ``lr`` replace the preset's when given. ``pose_network`` is the
    pre-trained head-pose file (required). ``vgg_weights``, ``vggface_weights`` and
    ``gaze_weights`` name the perceptual networks' files (or directories); without one the
    weight cache is searched, and if the file is not there its term of Eq. 4 is left out
    with a warning, never replaced. ``vgg_pyramid`` is the number of image-pyramid levels of
    the VGG19 loss (fewer at small sizes, see
    :func:`~neuralhead.megaportraits.losses.pyramid_levels`). ``l1_weight`` adds a foreground
    L1 term the paper does not have (0: off). ``augment`` switches B.1's augmentations.
    """

    preset: str = "megaportraits-256"
    pose_network: str | None = None
    batch_size: int | None = None  # samples per step on each process
    lr: float | None = None
    vgg_weights: str | None = None
    vggface_weights: str | None = None
    gaze_weights: str | None = None
    vgg_pyramid: int = 3
    l1_weight: float = 0.0
    augment: bool = True
    cache_limit_gb: float = 4.0
    eval_samples: int = 8  # held-out drivers per video at each evaluation
    model_overrides: dict[str, Any] = field(default_factory=dict)


def build_config(options: MegaPortraitsTrainOptions) -> MegaPortraitsConfig:
    """The model config: the preset with the user's overrides, batch size and learning rate."""
    overrides = dict(options.model_overrides)
    if options.lr is not None:
        overrides["lr"] = options.lr
    if options.batch_size is not None:
        overrides["batch_size"] = options.batch_size
    try:
        config = preset(options.preset, **overrides)
    except TypeError as exc:
        raise InputError(f"bad model override: {exc}") from None
    unsupported = [
        name for name in ("weight_canonical_l1", "weight_region_l1") if getattr(config, name)
    ]
    if unsupported:
        raise InputError(
            f"{', '.join(unsupported)} (EMOPortraits losses) are not part of MegaPortraits "
            "training; leave them at 0"
        )
    if config.batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {config.batch_size}")
    return config


def cosine_schedule(
    optimizer: torch.optim.Optimizer, config: MegaPortraitsConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from ``config.lr`` to ``config.lr_min`` over ``config.num_iterations``
    steps (Sec. 4.1), then constant at ``lr_min``."""
    total, ratio = max(config.num_iterations, 1), config.lr_min / config.lr

    def factor(step: int) -> float:
        progress = min(step / total, 1.0)
        return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


#: Loader of each perceptual term's network (files found as :mod:`neuralhead.weights` does).
LOSS_NETWORKS = {
    "vgg19": VGG19.from_pretrained,
    "vggface": VGGFace.from_pretrained,
    "gaze": GazeBlinkNet.from_pretrained,
}


def _load_network(kind: str, path: str | None, term: str, flag: str) -> nn.Module | None:
    """A frozen pretrained network for a perceptual term, or None (with a warning) when its
    weights are absent and none were named; named but absent weights are an error."""
    try:
        return LOSS_NETWORKS[kind](path)
    except WeightsMissingError as exc:
        if path is not None:
            raise
        log.warning(
            "%s weights not found, so MegaPortraits trains WITHOUT %s (Eq. 4); pass %s to use "
            "it. %s",
            kind,
            term,
            flag,
            exc,
        )
        return None


def load_loss_networks(
    config: MegaPortraitsConfig, options: MegaPortraitsTrainOptions
) -> dict[str, nn.Module | None]:
    """The VGG19, VGGFace and gaze networks of the terms whose weight is not 0."""
    wanted = (
        ("vgg19", config.weight_vgg19, options.vgg_weights, "L_IN", "--vgg-weights"),
        ("vggface", config.weight_vggface, options.vggface_weights, "L_face", "--vggface-weights"),
        ("gaze", config.weight_gaze, options.gaze_weights, "L_gaze", "--gaze-weights"),
    )
    return {
        kind: _load_network(kind, path, term, flag) if weight else None
        for kind, weight, path, term, flag in wanted
    }


class GeneratorStep(nn.Module):
    """The generator side of one training step, in one ``forward`` (for DistributedDataParallel).

    ``forward(batch, generator)`` takes a batch of
    :class:`~neuralhead.megaportraits.dataset.MegaPortraitsPairs` on the model's device and
    returns ``image`` (x_s->d), ``z_source``, ``z_driver`` (from the driver crop, augmented
    in training mode when an augmentation is set), ``driver_crop`` (that crop) and, when the
    batch holds the cross pair, ``cross_image`` (x_s*->d), ``z_pred`` and ``z_cross_pred``
    (E_mtn's codes of the two outputs) and ``z_other_driver``; a subclass adds outputs of its
    own with :meth:`extra_outputs`.
    """

    def __init__(self, model: MegaPortraitsBase, augmentation: DriverAugmentation | None) -> None:
        super().__init__()
        self.model = model
        self.augmentation = augmentation

    def motion(
        self, driver: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[DriverMotion, torch.Tensor]:
        """The driver's motion with z_d read from its (augmented) face crop, and the crop."""
        pose = self.model.estimate_pose(driver)
        crop = self.model.expression_encoder.crop(driver, pose)
        if self.training and self.augmentation is not None:
            crop = self.augmentation(crop, generator)
        return DriverMotion(pose=pose, z_d=self.model.expression_encoder(crop)), crop

    def read_expression(self, image: torch.Tensor) -> torch.Tensor:
        """E_mtn's expression code of a generated image (gradients reach the image)."""
        return self.model.expression_encoder(image, self.model.estimate_pose(image))

    def extra_outputs(
        self,
        batch: dict[str, torch.Tensor],
        source: SourceState,
        motion: DriverMotion,
        other: SourceState | None,
        generator: torch.Generator | None,
    ) -> dict[str, torch.Tensor]:
        """Further outputs from the step's source, driver motion and other source (x_s*, None
        without cross pairs); none here."""
        return {}

    def forward(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        source = self.model.encode_source(batch["source"], batch["source_mask"])
        motion, crop = self.motion(batch["driver"], generator)
        image = self.model.render(source, motion)["image"]
        out = {"image": image, "z_source": source.z_s, "z_driver": motion.z_d, "driver_crop": crop}
        other = None
        if "other_source" in batch:
            other = self.model.encode_source(batch["other_source"], batch["other_source_mask"])
            cross = self.model.render(other, motion)["image"]
            other_motion, _ = self.motion(batch["other_driver"], generator)
            out.update(
                cross_image=cross,
                z_pred=self.read_expression(image),
                z_cross_pred=self.read_expression(cross),
                z_other_driver=other_motion.z_d,
            )
        out.update(self.extra_outputs(batch, source, motion, other, generator))
        return out


def _split(features: Any, batch: int) -> tuple[Any, Any]:
    """Discriminator features of ``cat([a, b])`` -> those of ``a`` and of ``b``."""
    first = [[f[:batch] for f in scale] for scale in features]
    second = [[f[batch:] for f in scale] for scale in features]
    return first, second


def _rgb(images: torch.Tensor) -> np.ndarray:
    return to_uint8(images[0], (0.0, 1.0))


class MegaPortraitsTask:
    """The :class:`~neuralhead.training.engine.Task` that trains the base model.

    A model whose training extends the base model's (EMOPortraits) subclasses it: the class
    attributes name the run, its options, datasets, generator step and export directory, and
    these methods are the parts it may change: :meth:`_train_set`, :meth:`_heldout_set`,
    :meth:`_build_loss`, :meth:`_build_sampler` and :meth:`_draw_batch` (data and objective),
    :meth:`generator_loss` and :meth:`ranking` (the step), :meth:`heldout_samples`,
    :meth:`heldout_sums` and :meth:`preview_row` (evaluation), :attr:`unavailable` and
    :meth:`run_config` (the run's record).
    """

    #: ``config.json``'s "model", checked when resuming.
    model_name = "megaportraits"
    #: Name of the model in messages.
    title = "MegaPortraits"
    options_class: type = MegaPortraitsTrainOptions
    pairs_class: type[MegaPortraitsPairs] = MegaPortraitsPairs
    step_class: type[GeneratorStep] = GeneratorStep
    loss_class: type[MegaPortraitsLoss] = MegaPortraitsLoss
    #: Sub-directory of the run that :meth:`finish` saves the model to.
    export_dir = EXPORT_DIR
    #: Frames augmented with one draw of B.1's jitter and flip (each pair shares one).
    augmented_groups: tuple[tuple[str, ...], ...] = (
        ("source", "driver"),
        ("other_source", "other_driver"),
    )

    @staticmethod
    def build_config(options: MegaPortraitsTrainOptions) -> MegaPortraitsConfig:
        """The model config of a new run's options."""
        return build_config(options)

    def __init__(
        self,
        engine: Engine,
        data_dirs: list[Path],
        options: MegaPortraitsTrainOptions,
        config: MegaPortraitsConfig,
    ) -> None:
        if options.pose_network is None:
            raise InputError(
                "MegaPortraits needs a pre-trained head-pose network (Sec. 3.1), kept frozen: "
                "train one with `neuralhead train megaportraits-pose DATA_DIR... --out FILE` "
                "and pass --pose-network FILE"
            )
        self.engine, self.options, self.config = engine, options, config
        self.train_set = self._train_set(data_dirs)
        self.heldout = self._heldout_set(data_dirs)
        self.loss = self._build_loss(load_loss_networks(config, options)).to(engine.device)

        self.raw_model = MegaPortraitsBase(config).load_head_pose(options.pose_network)
        self.pair_augmentation = PairAugmentation() if options.augment else None
        augmentation = DriverAugmentation() if options.augment else None
        self.raw_step = self.step_class(self.raw_model, augmentation)
        self.raw_discriminator = MultiScalePatchDiscriminator(
            3,
            num_scales=config.disc_num_scales,
            num_layers=config.disc_num_layers,
            base_channels=config.disc_base_channels,
        )
        self.step_module = engine.wrap(self.raw_step)
        self.discriminator = engine.wrap(self.raw_discriminator)
        adamw = dict(
            lr=config.lr,
            betas=tuple(config.betas),
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
        trainable = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.g_optimizer = torch.optim.AdamW(trainable, **adamw)
        self.d_optimizer = torch.optim.AdamW(self.raw_discriminator.parameters(), **adamw)
        self.g_scheduler = cosine_schedule(self.g_optimizer, config)
        self.d_scheduler = cosine_schedule(self.d_optimizer, config)
        self.sampler = self._build_sampler()

    def _train_set(self, data_dirs: list[Path]) -> MegaPortraitsPairs:
        return self.pairs_class(
            data_dirs,
            self.config.image_size,
            "train",
            cache_limit_gb=self.options.cache_limit_gb,
            progress=self.engine.is_main and self.engine.options.progress,
        )

    def _heldout_set(self, data_dirs: list[Path]) -> MegaPortraitsPairs | None:
        usable = []
        for root in data_dirs:
            try:
                MegaPortraitsPairs([root], self.config.image_size, "heldout", cross_pairs=False)
            except InputError as exc:
                log.warning("%s is left out of the evaluation: %s", root, exc)
                continue
            usable.append(root)
        if not usable:
            log.warning("no held-out evaluation: no dataset has held-out frames with a face")
            return None
        return self.pairs_class(
            usable, self.config.image_size, "heldout", cross_pairs=len(usable) > 1
        )

    def _build_loss(self, networks: dict[str, nn.Module | None]) -> MegaPortraitsLoss:
        """The objective, given the perceptual networks found (:func:`load_loss_networks`)."""
        return self.loss_class(
            self.config,
            vgg19=networks["vgg19"],
            vggface=networks["vggface"],
            gaze=networks["gaze"],
            vgg19_pyramid=pyramid_levels(self.config.image_size, self.options.vgg_pyramid),
            l1_weight=self.options.l1_weight,
        )

    def _build_sampler(self) -> StepSampler:
        engine = self.engine
        return StepSampler(
            list(range(len(self.train_set))),
            self.config.batch_size,
            engine.options.seed,
            engine.rank,
            engine.world_size,
        )

    def _draw_batch(self, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The training batch of ``step`` (a function of the step and the seeded generator)."""
        return self.train_set.batch(self.sampler.batch(step), generator)

    # ------------------------------------------------------------------ Task protocol
    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.raw_model, "discriminator": self.discriminator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.g_optimizer, "discriminator": self.d_optimizer}

    def schedulers(self) -> dict[str, Any]:
        return {"generator": self.g_scheduler, "discriminator": self.d_scheduler}

    def _generator(self, step: int) -> torch.Generator:
        # Seeded by the step: a resumed run draws the same pairs and augmentations.
        seed = (self.engine.options.seed * 1_000_003 + step) * 4099 + self.engine.rank
        return torch.Generator().manual_seed(seed)

    def _augment_pairs(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """B.1's jitter and flip, one draw per pair (source with driver, x_s* with x_d*)."""
        if self.pair_augmentation is None:
            return batch
        batch = dict(batch)
        for pair in self.augmented_groups:
            if pair[0] not in batch:
                continue
            parameters = self.pair_augmentation.draw(batch[pair[0]].shape[0], generator)
            for role in pair:
                batch[role], batch[f"{role}_mask"], batch[f"{role}_landmarks"] = (
                    self.pair_augmentation.apply(
                        parameters, batch[role], batch[f"{role}_mask"], batch[f"{role}_landmarks"]
                    )
                )
        return batch

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, step: int) -> dict[str, float]:
        generator = self._generator(step)
        batch = self._augment_pairs(self._to_device(self._draw_batch(step, generator)), generator)
        target = foreground(batch["driver"], batch["driver_mask"])
        size = target.shape[0]
        self.step_module.train()
        self.discriminator.train()

        # Generator step: the discriminator judges the attached output with its weights
        # frozen and unwrapped, so no gradient of its own is computed or synchronised.
        self.raw_discriminator.requires_grad_(False)
        with self.engine.autocast():
            out = self.step_module(batch, generator)
            d_fake, d_real = _split(self.raw_discriminator(torch.cat([out["image"], target])), size)
            g_total, g_terms = self.generator_loss(batch, out, target, d_fake, d_real)
        self.g_optimizer.zero_grad(set_to_none=True)
        self.engine.backward_and_step(g_total, self.g_optimizer)
        self.raw_discriminator.requires_grad_(True)

        with self.engine.autocast():
            d_fake, d_real = _split(
                self.discriminator(torch.cat([out["image"].detach(), target])), size
            )
            d_total, d_terms = self.loss.discriminator_loss(d_real, d_fake)
        self.d_optimizer.zero_grad(set_to_none=True)
        self.engine.backward_and_step(d_total, self.d_optimizer)
        self.g_scheduler.step()
        self.d_scheduler.step()

        stats = {f"loss_{name}": float(value) for name, value in {**g_terms, **d_terms}.items()}
        stats["loss"] = float(g_total.detach())
        stats["lr"] = self.g_scheduler.get_last_lr()[0]
        with torch.no_grad():
            stats["l1_255"] = float(l1_255(out["image"].detach().float(), target).mean())
            ranking = self.ranking(out)
            if ranking is not None:
                stats["ranking"] = float(ranking)
        return stats

    def generator_loss(
        self,
        batch: dict[str, torch.Tensor],
        out: dict[str, torch.Tensor],
        target: torch.Tensor,
        d_fake: Any,
        d_real: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_base (Eq. 8) of the generator step's outputs against ``target``."""
        return self.loss.generator_loss(
            out["image"],
            target,
            landmarks=batch["driver_landmarks"],
            d_fake=d_fake,
            d_real=d_real,
            z_pred=out.get("z_pred"),
            z_cross_pred=out.get("z_cross_pred"),
            z_driver=out["z_driver"],
            z_other_driver=out.get("z_other_driver"),
            z_source=out["z_source"],
        )

    def ranking(self, out: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The contrastive ranking of the outputs' codes (None without cross pairs)."""
        if "z_pred" not in out:
            return None
        return contrastive_ranking(
            out["z_pred"], out["z_cross_pred"], out["z_driver"], out["z_other_driver"]
        )

    # ------------------------------------------------------------------ evaluation
    def heldout_samples(self) -> list[dict[str, tuple[int, int]]]:
        """Self-reenactment samples of the held-out frames (see the module docstring)."""
        if self.heldout is None:
            return []
        videos = self.heldout.num_videos
        samples = []
        for video in range(videos):
            frames = self.heldout.valid_frames(video)
            if len(frames) < 2:
                continue
            drivers = frames[1:]
            picks = np.linspace(0, len(drivers) - 1, min(self.options.eval_samples, len(drivers)))
            other = (video + 1) % videos
            other_frames = self.heldout.valid_frames(other)
            for k, i in enumerate(np.unique(picks.round().astype(int))):
                sample = {"driver": (video, int(drivers[i])), "source": (video, int(frames[0]))}
                if self.heldout.cross_pairs:
                    sample["other_source"] = (other, int(other_frames[0]))
                    sample["other_driver"] = (other, int(other_frames[-1 - k % len(other_frames)]))
                samples.append(sample)
        return samples

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The generator step's outputs in eval mode (no augmentation, no dropout)."""
        self.raw_step.eval()
        out = self.raw_step(self._to_device(batch))
        return {k: v.float() for k, v in out.items()}

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.engine.is_main:
            return {}
        samples = self.heldout_samples()
        if not samples:
            return {}
        sums: dict[str, float] = {}
        rankings = []
        size = self.config.batch_size
        for start in range(0, len(samples), size):
            chunk = samples[start : start + size]
            batch = self._to_device(self.heldout.collate(chunk))
            out = self.generate(batch)
            for key, value in self.heldout_sums(batch, out).items():
                sums[key] = sums.get(key, 0.0) + value
            ranking = self.ranking(out)
            if ranking is not None:
                rankings.append((float(ranking), len(chunk)))
        metrics = {key: value / len(samples) for key, value in sums.items()}
        if rankings:
            metrics["heldout_ranking"] = sum(r * n for r, n in rankings) / len(samples)
        return metrics

    def heldout_sums(
        self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]
    ) -> dict[str, float]:
        """Per-sample metrics of one held-out batch, summed (:meth:`evaluate` averages them)."""
        target = foreground(batch["driver"], batch["driver_mask"])
        baseline = foreground(batch["source"], batch["source_mask"])
        sums = {}
        for name, prediction in (("heldout", out["image"]), ("baseline", baseline)):
            for metric, fn in (("l1", l1_255), ("psnr", psnr)):
                sums[f"{name}_{metric}"] = float(fn(prediction, target).sum())
        return sums

    def preview(self, step: int) -> np.ndarray:
        """Rows of source | driver | driver crop | x_s->d | target | x_s* | x_s*->d."""
        heldout = self.heldout_samples()
        # A training sample, then a held-out one of the first video and one of the last.
        picks = heldout[:1] + [s for s in heldout if s["driver"][0] != heldout[0]["driver"][0]][-1:]
        samples = self.train_set.draw([0], torch.Generator().manual_seed(0)) + picks
        rows = []
        for k, sample in enumerate(samples):
            dataset = self.train_set if k == 0 else self.heldout
            batch = dataset.collate([sample])
            split = "train" if k == 0 else "held-out"
            rows.append(self.preview_row(batch, self.generate(batch), split))
        return grid(rows)

    def preview_row(
        self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], split: str
    ) -> list[np.ndarray]:
        """The labelled images of one preview sample (a batch of one)."""
        row = [
            label(_rgb(batch["source"]), "source"),
            label(_rgb(batch["driver"]), f"{split} driver"),
            label(_rgb(out["driver_crop"]), "crop"),
            label(_rgb(out["image"]), "generated"),
            label(_rgb(foreground(batch["driver"], batch["driver_mask"])), "target"),
        ]
        if "cross_image" in out:
            row += [
                label(_rgb(batch["other_source"]), "other source"),
                label(_rgb(out["cross_image"]), "cross"),
            ]
        return row

    def finish(self, run_dir: Path) -> None:
        """Save the model to ``run_dir /`` :attr:`export_dir` (see the module docstring)."""
        self.raw_model.save_pretrained(run_dir / self.export_dir)

    @property
    def unavailable(self) -> list[str]:
        """Loss terms the run leaves out because something they need is missing."""
        return self.loss.unavailable

    def run_config(self, data_dirs: list[Path]) -> dict[str, Any]:
        """What the run's ``config.json`` records (resuming reads it back)."""
        return {
            "model": self.model_name,
            "neuralhead_version": __version__,
            "data": [str(Path(d).resolve()) for d in data_dirs],
            "train": asdict(self.options),
            "engine": asdict(self.engine.options),
            "model_config": config_to_dict(self.config),
            "unavailable_losses": self.unavailable,
            "world_size": self.engine.world_size,
        }


def train_megaportraits(
    data_dirs: list[str | Path],
    run_dir: str | Path,
    options: MegaPortraitsTrainOptions,
    engine_options: EngineOptions,
    resume: bool = False,
) -> Path:
    """Train (or resume) a MegaPortraits base-model run; returns the run directory.

    ``data_dirs`` are the training videos (one prepared dataset each, at least two for the
    cycle-consistency pairs). When resuming, the data, options and model config of the run
    are used and ``data_dirs`` and ``options`` are ignored. A new run is evaluated once before
    its first step, so that its stats hold the starting point. Works under torchrun.
    """
    return train_task(MegaPortraitsTask, data_dirs, run_dir, options, engine_options, resume)


def train_task(
    task_class: type[MegaPortraitsTask],
    data_dirs: list[str | Path],
    run_dir: str | Path,
    options: MegaPortraitsTrainOptions,
    engine_options: EngineOptions,
    resume: bool = False,
) -> Path:
    """Train (or resume) a run of ``task_class`` (see :func:`train_megaportraits`)."""
    run_dir = Path(run_dir)
    name = task_class.model_name
    run = None
    if resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise InputError(f"cannot resume: {run_dir} has no config.json")
        run = json.loads(saved.read_text())
        if run.get("model") != name:
            raise InputError(f"cannot resume: {run_dir} is a {run.get('model')} run, not {name}")
        engine_options = replace(engine_options, seed=run["engine"]["seed"])
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise InputError(
            f"run directory {run_dir} already exists; pass --resume to continue it "
            "or choose another --run-dir"
        )
    if run is not None:
        data_dirs = run["data"]
        options = task_class.options_class(**run["train"])
        config = config_from_dict(MegaPortraitsConfig, run["model_config"])
    else:
        if not data_dirs:
            raise InputError("give prepared dataset directories to train on")
        if "num_iterations" not in options.model_overrides:
            overrides = {**options.model_overrides, "num_iterations": engine_options.max_steps}
            options = replace(options, model_overrides=overrides)
        config = task_class.build_config(options)
    data_dirs = [Path(d) for d in data_dirs]

    engine = Engine.create(run_dir, engine_options)
    task = None
    try:
        task = task_class(engine, data_dirs, options, config)
        unavailable = task.unavailable
        engine.prepare_run_dir(task.run_config(data_dirs), resume)
        train_log.info(
            "%s %s on %d videos (%d training frames); losses left out for missing weights: %s",
            task.title,
            options.preset,
            len(data_dirs),
            len(task.train_set),
            ", ".join(unavailable) or "none",
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


# ---------------------------------------------------------------------------------- command line


def add_base_model_arguments(
    p: argparse.ArgumentParser, *, preset_default: str, presets: str
) -> None:
    """Options the base-model commands share (``train megaportraits``, ``train emoportraits``):
    the videos, preset, head-pose file, learning rate, perceptual networks and evaluation."""
    p.add_argument(
        "data_dirs",
        type=Path,
        nargs="*",
        metavar="DATA_DIR",
        help="prepared videos, at least two (not needed with --resume)",
    )
    p.add_argument("--preset", default=preset_default, help=presets)
    p.add_argument(
        "--pose-network",
        default=None,
        metavar="PATH",
        help="pre-trained head-pose file (required; kept frozen, read again on --resume)",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="AdamW learning rate of G and D (default 2e-4)"
    )
    for flag, network, term in (
        ("--vgg-weights", "VGG19 weight file", "L_IN"),
        ("--vggface-weights", "VGGFace weight file", "L_face"),
        ("--gaze-weights", "gaze network file", "L_gaze"),
    ):
        p.add_argument(
            flag,
            default=None,
            metavar="PATH",
            help=f"{network} or its directory (default: the weight cache; without it {term} is off)",
        )
    p.add_argument(
        "--l1-weight",
        type=float,
        default=0.0,
        help="weight of a foreground L1 term the paper does not use (default 0: off)",
    )
    p.add_argument("--no-augment", action="store_true", help="switch off the augmentations of B.1")
    p.add_argument(
        "--eval-samples",
        type=cli_args.positive_int,
        default=8,
        help="held-out drivers per video per evaluation (default 8)",
    )
    p.add_argument(
        "--cache-limit-gb",
        type=float,
        default=4.0,
        help="keep frames in memory up to this size (default 4)",
    )


def base_model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`MegaPortraitsTrainOptions` fields of the options of :func:`add_base_model_arguments`."""
    return dict(
        preset=args.preset,
        pose_network=args.pose_network,
        batch_size=args.batch_size,
        lr=args.lr,
        vgg_weights=args.vgg_weights,
        vggface_weights=args.vggface_weights,
        gaze_weights=args.gaze_weights,
        l1_weight=args.l1_weight,
        augment=not args.no_augment,
        cache_limit_gb=args.cache_limit_gb,
        eval_samples=args.eval_samples,
        model_overrides=dict(args.overrides),
    )


def run_base_model_command(
    args: argparse.Namespace,
    task_class: type[MegaPortraitsTask],
    options: MegaPortraitsTrainOptions,
    train: Any,
) -> int:
    """Relaunch under torchrun when asked, else run ``train(data_dirs, run_dir, options,
    engine_options, resume)`` (:func:`train_megaportraits` or its like for ``task_class``)."""
    if args.resume is None and not args.data_dirs:
        raise InputError("give prepared DATA_DIRs to train on, or --resume RUN_DIR")
    data = args.data_dirs[0] if args.data_dirs else args.resume
    run_dir = cli_args.train_run_dir(args, task_class.model_name, data)
    if cli_args.should_relaunch(args):
        return cli_args.relaunch_with_torchrun(args.nproc_per_node, run_dir)
    config = task_class.build_config(options)
    engine_options = cli_args.engine_options(args, config.num_iterations)
    run = train(args.data_dirs, run_dir, options, engine_options, resume=args.resume is not None)
    if cli_args.is_main_process():
        print(f"run directory: {run}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``neuralhead train megaportraits``."""
    add_base_model_arguments(
        p,
        preset_default="megaportraits-256",
        presets="megaportraits-tiny (CPU, 64px), megaportraits-256 or megaportraits-512",
    )
    cli_args.add_run_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Run ``neuralhead train megaportraits`` (see :func:`add_arguments`)."""
    options = MegaPortraitsTrainOptions(**base_model_options(args))
    return run_base_model_command(args, MegaPortraitsTask, options, train_megaportraits)
