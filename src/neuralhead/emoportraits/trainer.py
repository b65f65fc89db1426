"""Training the EMOPortraits main model on prepared videos (main paper Sec. 4-5.1; supplementary 1).

The model is MegaPortraits' base model with EMOPortraits' preset
(:mod:`neuralhead.emoportraits.config`: 128-d z with dropout on it), trained as MegaPortraits
trains its base model (:mod:`neuralhead.megaportraits.trainer`: the same driver and pair
augmentations, frozen pre-trained head-pose network, multi-scale patch discriminator with
the hinge loss, AdamW with betas (0.5, 0.999) and a cosine decay from 2e-4 to 1e-6,
autocast on GPUs, DDP under torchrun, exact resumption) on L_main (supplementary Eq. 1,
:class:`~neuralhead.emoportraits.losses.EMOPortraitsLoss`). Each generator step computes
from a sample of :class:`~neuralhead.emoportraits.dataset.EMOPortraitsPairs`:

* x_s->d = G(x_s, x_d) and the cross-reenactment x_s*->d = G(x_s*, x_d), as MegaPortraits;
* the moved cross-reenactment x_s*m->d: x_s*'s source state rendered with the head pose of
  x_s^m and the driver's z_d (Sec. 5.1);
* E_motion's codes of the three outputs and z_d* of x_d*, for L_cos with three positive and
  three negative pairs (Eq. 5);
* the canonical volume of the driver frame, V^C_d = encode_source(x_d).v_c, compared with the
  source's V^C_s by L_CV (Eq. 2: two frames of one person);
* z_s and z_d for L_sdm (Eq. 3), weighted per sample: ``config.weight_mismatch`` and
  ``config.mismatch_margin`` (1, 0.5) for main-set pairs,
  :data:`~neuralhead.emoportraits.config.SECONDARY_MISMATCH_WEIGHT` and ``_MARGIN`` (10, 0.25)
  for second-set pairs (FEED in the paper; supplementary 1.2's mixed batches, see
  :mod:`neuralhead.emoportraits.dataset`);
* the target's eye, mouth and ear masks for L_head (supplementary 1.3), from the BiSeNet face
  parser (:mod:`neuralhead.pretrained.face_parser`) as in the paper. ``region_masks="auto"``
  uses the parser when its weights are found and otherwise, with one warning, eye and mouth
  masks drawn from the tracked landmarks (:func:`~neuralhead.emoportraits.losses.landmark_region_masks`,
  our substitute), which leaves L_ears out. The mode a run resolves to is recorded in its
  config, so that a resumed run keeps it.

The discriminator step is MegaPortraits'.

Evaluation is MegaPortraits' held-out self-reenactment (L1 and PSNR against the foreground
target, beside the "no motion" baseline) on the held-out frames of every video, main and
second set, with the contrastive ranking over Eq. 5's three positive and three negative pairs
(the moved source of each sample is a held-out frame of the previous video), the mean L1
between the canonical volumes of source and driver (``heldout_canonical_l1``; Eq. 2 on unseen
frames), and AUC_z (main paper Eq. 1) of E_motion's codes of up to ``auc_frames`` held-out
frames spread over all videos (``heldout_auc_z``; lower is a broader expression space).

The run directory is the engine's; at the end ``emoportraits/`` receives the model
(:data:`~neuralhead.emoportraits.checkpoints.MAIN_SUBDIR`; ``config.json`` +
``model.safetensors``), which :func:`~neuralhead.emoportraits.checkpoints.load_main_model`
loads.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuralhead.emoportraits.checkpoints import MAIN_SUBDIR
from neuralhead.emoportraits.config import (
    SECONDARY_MISMATCH_MARGIN,
    SECONDARY_MISMATCH_WEIGHT,
    preset,
)
from neuralhead.emoportraits.dataset import EMOPortraitsPairs, MixedStepSampler
from neuralhead.emoportraits.losses import (
    EMOPortraitsLoss,
    canonical_volume_loss,
    emo_contrastive_ranking,
    landmark_region_masks,
    parser_region_masks,
)
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.megaportraits.base_model import DriverMotion, SourceState
from neuralhead.megaportraits.config import MegaPortraitsConfig
from neuralhead.megaportraits.trainer import (
    GeneratorStep,
    MegaPortraitsTask,
    MegaPortraitsTrainOptions,
    add_base_model_arguments,
    base_model_options,
    run_base_model_command,
    train_task,
)
from neuralhead.pretrained.face_parser import FaceParser
from neuralhead.training import cli_args
from neuralhead.training.engine import Engine, EngineOptions
from neuralhead.visualize import label, to_uint8

log = logging.getLogger(__name__)

#: Where L_head's masks come from (see the module docstring).
REGION_MASK_MODES = ("auto", "parser", "landmarks", "off")


@dataclass
class EMOPortraitsTrainOptions(MegaPortraitsTrainOptions):
    """Settings of an EMOPortraits main-model run (all recorded in the run's config.json).

    The fields of :class:`~neuralhead.megaportraits.trainer.MegaPortraitsTrainOptions`
    (``pose_network`` is required), and: ``secondary_data``, the second set of prepared
    videos mixed into every second batch (supplementary 1.2; may be empty);
    ``region_masks``, one of :data:`REGION_MASK_MODES`; ``parser_weights``, the face
    parser's file or directory (default: the weight cache); ``auc_frames``, the most
    held-out frames whose codes enter AUC_z at each evaluation.
    """

    preset: str = "emoportraits-256"
    secondary_data: list[str] = field(default_factory=list)
    region_masks: str = "auto"
    parser_weights: str | None = None
    auc_frames: int = 512


def build_config(options: EMOPortraitsTrainOptions) -> MegaPortraitsConfig:
    """The model config: the EMOPortraits preset with the user's overrides, batch size and
    learning rate."""
    if options.auc_frames < 2:
        raise InputError(f"auc_frames must be at least 2, got {options.auc_frames}")
    overrides = dict(options.model_overrides)
    if options.lr is not None:
        overrides["lr"] = options.lr
    if options.batch_size is not None:
        overrides["batch_size"] = options.batch_size
    config = preset(options.preset, **overrides)
    if config.batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {config.batch_size}")
    return config


def mismatch_parameters(
    secondary: torch.Tensor, config: MegaPortraitsConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weight and margin of L_sdm (Eq. 3) for the ``secondary`` flags ``(B,)``:
    the config's for main-set pairs, the second set's constants for the others."""
    flags = secondary.bool()
    weight = torch.where(
        flags,
        torch.tensor(SECONDARY_MISMATCH_WEIGHT, device=flags.device),
        torch.tensor(float(config.weight_mismatch), device=flags.device),
    )
    margin = torch.where(
        flags,
        torch.tensor(SECONDARY_MISMATCH_MARGIN, device=flags.device),
        torch.tensor(float(config.mismatch_margin), device=flags.device),
    )
    return weight, margin


def resolve_region_masks(options: EMOPortraitsTrainOptions) -> tuple[str, FaceParser | None]:
    """The mode L_head's masks come from ("parser", "landmarks" or "off") and, for
    "parser", the face parser; "auto" falls back to "landmarks" with a warning when the
    parser's weights are not found (named weights must be there)."""
    mode = options.region_masks
    if mode not in REGION_MASK_MODES:
        raise InputError(
            f"region_masks must be one of {', '.join(REGION_MASK_MODES)}, got {mode!r}"
        )
    if mode not in ("auto", "parser"):
        return mode, None
    try:
        return "parser", FaceParser.from_pretrained(options.parser_weights)
    except WeightsMissingError as exc:
        if mode == "parser" or options.parser_weights is not None:
            raise
        log.warning(
            "face parser weights not found, so L_head (supplementary 1.3) uses eye and mouth "
            "masks drawn from the landmarks and leaves the ears out; pass --parser-weights to "
            "use the parser. %s",
            exc,
        )
        return "landmarks", None


class EMOGeneratorStep(GeneratorStep):
    """MegaPortraits' generator step (:class:`~neuralhead.megaportraits.trainer.GeneratorStep`)
    with EMOPortraits' outputs: ``canonical_source`` and ``canonical_driver`` (V^C of x_s and
    of x_d, Eq. 2) and, when the batch holds the moved source, ``moved_image`` (x_s*m->d,
    Sec. 5.1) and ``z_moved_pred`` (its code)."""

    def extra_outputs(
        self,
        batch: dict[str, torch.Tensor],
        source: SourceState,
        motion: DriverMotion,
        other: SourceState | None,
        generator: torch.Generator | None,
    ) -> dict[str, torch.Tensor]:
        driver = self.model.encode_source(batch["driver"], batch["driver_mask"])
        out = {"canonical_source": source.v_c, "canonical_driver": driver.v_c}
        if other is not None and "moved_source" in batch:
            # Only the pose of x_s^m is taken; the expression stays the driver's.
            pose = self.model.estimate_pose(batch["moved_source"])
            moved = self.model.render(other, DriverMotion(pose=pose, z_d=motion.z_d))["image"]
            out.update(moved_image=moved, z_moved_pred=self.read_expression(moved))
        return out


class EMOPortraitsTask(MegaPortraitsTask):
    """The :class:`~neuralhead.training.engine.Task` that trains the EMOPortraits main model."""

    model_name = "emoportraits"
    title = "EMOPortraits"
    options_class = EMOPortraitsTrainOptions
    pairs_class = EMOPortraitsPairs
    step_class = EMOGeneratorStep
    loss_class = EMOPortraitsLoss
    export_dir = MAIN_SUBDIR
    # x_s^m gets a draw of its own: flipped, it still gives a head pose to impose.
    augmented_groups = (*MegaPortraitsTask.augmented_groups, ("moved_source",))
    build_config = staticmethod(build_config)

    def __init__(
        self,
        engine: Engine,
        data_dirs: list[Path],
        options: EMOPortraitsTrainOptions,
        config: MegaPortraitsConfig,
    ) -> None:
        mode, parser = resolve_region_masks(options)
        super().__init__(engine, data_dirs, replace(options, region_masks=mode), config)
        self.parser = None if parser is None else parser.to(engine.device)

    def _train_set(self, data_dirs: list[Path]) -> EMOPortraitsPairs:
        return EMOPortraitsPairs(
            data_dirs,
            self.config.image_size,
            "train",
            secondary_dirs=self.options.secondary_data,
            cache_limit_gb=self.options.cache_limit_gb,
            progress=self.engine.is_main and self.engine.options.progress,
        )

    def _heldout_set(self, data_dirs: list[Path]) -> EMOPortraitsPairs | None:
        return super()._heldout_set([*data_dirs, *map(Path, self.options.secondary_data)])

    def _build_sampler(self) -> MixedStepSampler:
        engine = self.engine
        return MixedStepSampler(
            len(self.train_set),
            self.train_set.num_secondary_frames,
            self.config.batch_size,
            engine.options.seed,
            engine.rank,
            engine.world_size,
        )

    def _draw_batch(self, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        main, secondary = self.sampler.batch(step)
        return self.train_set.batch(main, generator, secondary=secondary)

    @property
    def unavailable(self) -> list[str]:
        missing = list(self.loss.unavailable)
        if self.options.region_masks == "landmarks" and self.loss.weights["ears"]:
            missing.append("ears")
        return missing

    # ------------------------------------------------------------------ the step
    def region_masks(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """L_head's masks of the target (the driver frame), or None with ``region_masks="off"``."""
        mode = self.options.region_masks
        if mode == "parser":
            return parser_region_masks(self.parser, batch["driver"])
        if mode == "landmarks":
            return landmark_region_masks(batch["driver_landmarks"], self.config.image_size)
        return None

    def generator_loss(
        self,
        batch: dict[str, torch.Tensor],
        out: dict[str, torch.Tensor],
        target: torch.Tensor,
        d_fake: Any,
        d_real: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_main (supplementary Eq. 1) of the generator step's outputs."""
        weight, margin = mismatch_parameters(batch["secondary"], self.config)
        return self.loss.generator_loss(
            out["image"],
            target,
            landmarks=batch["driver_landmarks"],
            d_fake=d_fake,
            d_real=d_real,
            z_pred=out.get("z_pred"),
            z_cross_pred=out.get("z_cross_pred"),
            z_moved_pred=out.get("z_moved_pred"),
            z_driver=out["z_driver"],
            z_other_driver=out.get("z_other_driver"),
            z_source=out["z_source"],
            mismatch_weight=weight,
            mismatch_margin=margin,
            canonical_source=out["canonical_source"],
            canonical_driver=out["canonical_driver"],
            region_masks=self.region_masks(batch),
        )

    def ranking(self, out: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The ranking over Eq. 5's pairs (MegaPortraits' four without the moved source)."""
        if "z_pred" not in out:
            return None
        return emo_contrastive_ranking(
            out["z_pred"],
            out["z_cross_pred"],
            out.get("z_moved_pred"),
            out["z_driver"],
            out["z_other_driver"],
        )

    # ------------------------------------------------------------------ evaluation
    def heldout_samples(self) -> list[dict[str, tuple[int, int]]]:
        """MegaPortraits' held-out samples, each with a moved source: a held-out frame of the
        previous video, cycling through its frames from the middle one, sample by sample."""
        samples = super().heldout_samples()
        if self.heldout is None or not self.heldout.cross_pairs:
            return samples
        videos = self.heldout.num_videos
        seen: dict[int, int] = {}
        for sample in samples:
            video = sample["driver"][0]
            k = seen[video] = seen.get(video, -1) + 1
            moved = (video - 1) % videos
            frames = self.heldout.valid_frames(moved)
            sample["moved_source"] = (moved, int(frames[(len(frames) // 2 + k) % len(frames)]))
        return samples

    def heldout_sums(
        self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]
    ) -> dict[str, float]:
        sums = super().heldout_sums(batch, out)
        size = out["canonical_source"].shape[0]
        loss = canonical_volume_loss(out["canonical_source"], out["canonical_driver"])
        sums["heldout_canonical_l1"] = float(loss) * size
        return sums

    def heldout_codes(self) -> torch.Tensor:
        """E_motion's codes ``(N, d)`` of up to ``auc_frames`` held-out frames, spread evenly
        over the frames of all held-out videos (eval mode: no dropout)."""
        from neuralhead.emoportraits.latent_space import expression_codes

        frames = [
            (video, int(frame))
            for video in range(self.heldout.num_videos)
            for frame in self.heldout.valid_frames(video)
        ]
        picks = np.linspace(0, len(frames) - 1, min(self.options.auc_frames, len(frames)))
        frames = [frames[i] for i in np.unique(picks.round().astype(int))]
        codes = []
        size = max(self.config.batch_size, 16)
        for start in range(0, len(frames), size):
            images = [self.heldout.frame(*f)["image"] for f in frames[start : start + size]]
            images = torch.stack(images).to(self.engine.device)
            codes.append(expression_codes(self.raw_model, images).float().cpu())
        return torch.cat(codes)

    def evaluate(self, step: int) -> dict[str, float]:
        metrics = super().evaluate(step)
        if not metrics:
            return metrics
        from neuralhead.emoportraits.latent_space import auc_z

        codes = self.heldout_codes()
        if len(codes) >= 2:
            metrics["heldout_auc_z"] = auc_z(codes)
        return metrics

    def preview_row(
        self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], split: str
    ) -> list[np.ndarray]:
        """MegaPortraits' row, then x_s^m and the moved cross-reenactment x_s*m->d."""
        row = super().preview_row(batch, out, split)
        if "moved_image" in out:
            row += [
                label(to_uint8(batch["moved_source"][0], (0.0, 1.0)), "pose source"),
                label(to_uint8(out["moved_image"][0], (0.0, 1.0)), "moved cross"),
            ]
        return row


def train_emoportraits(
    data_dirs: list[str | Path],
    run_dir: str | Path,
    options: EMOPortraitsTrainOptions,
    engine_options: EngineOptions,
    resume: bool = False,
) -> Path:
    """Train (or resume) an EMOPortraits main-model run; returns the run directory.

    ``data_dirs`` are the main videos (one prepared dataset each, at least two), and
    ``options.secondary_data`` the second set. When resuming, the data, options and model
    config of the run are used and ``data_dirs`` and ``options`` are ignored. A new run is
    evaluated once before its first step. Works under torchrun.
    """
    if not resume:
        options = replace(
            options,
            secondary_data=[str(Path(d).resolve()) for d in options.secondary_data],
            pose_network=None
            if options.pose_network is None
            else str(Path(options.pose_network).resolve()),
        )
    return train_task(EMOPortraitsTask, data_dirs, run_dir, options, engine_options, resume)


# ---------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``neuralhead train emoportraits``: MegaPortraits' and the second set, the
    region masks and AUC_z."""
    add_base_model_arguments(
        p,
        preset_default="emoportraits-256",
        presets="emoportraits-tiny (CPU, 64px), emoportraits-256 or emoportraits-512",
    )
    p.add_argument(
        "--secondary-data",
        type=Path,
        nargs="+",
        action="extend",
        default=[],
        metavar="DIR",
        help="a second set of prepared videos (FEED in the paper): every "
        "second batch ends with one of their pairs, its mismatch loss weighted 10 "
        "with margin 0.25 (give DATA_DIRs before this option)",
    )
    p.add_argument(
        "--region-masks",
        default="auto",
        choices=REGION_MASK_MODES,
        help="masks of the eye/mouth/ear L1 (L_head): the face parser, the landmark "
        "substitute (no ears) or none; auto: the parser when its weights are found",
    )
    p.add_argument(
        "--parser-weights",
        default=None,
        metavar="PATH",
        help="face parser file or its directory (default: the weight cache)",
    )
    p.add_argument(
        "--auc-frames",
        type=cli_args.positive_int,
        default=512,
        help="held-out frames whose expression codes give AUC_z at each evaluation (default 512)",
    )
    cli_args.add_run_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Run ``neuralhead train emoportraits`` (see :func:`add_arguments`)."""
    options = EMOPortraitsTrainOptions(
        **base_model_options(args),
        secondary_data=[str(d) for d in args.secondary_data],
        region_masks=args.region_masks,
        parser_weights=args.parser_weights,
        auc_frames=args.auc_frames,
    )
    return run_base_model_command(args, EMOPortraitsTask, options, train_emoportraits)
