"""Training Dynamic Neural Portraits on one prepared video (Sec. 3.2-3.3, Sec. 4).

The model is fitted by reconstruction (Eq. 4) on the clip's training frames; the last part of
the clip (10% by default, fixed when the dataset is prepared) is never trained on and serves
for evaluation. Optimiser settings are ours (the paper does not give them): Adam, learning
rate 5e-4 with a short warm-up and cosine decay to a tenth, batches of 4 frames at 256.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuralhead import __version__
from neuralhead.data.dataset import PortraitDataset
from neuralhead.dnp.config import DNPConfig, preset
from neuralhead.dnp.losses import reconstruction_loss
from neuralhead.dnp.model import DynamicNeuralPortrait
from neuralhead.dnp.portrait import Portrait, PortraitData
from neuralhead.errors import InputError
from neuralhead.metrics.image import l1_255, psnr
from neuralhead.nn.pretrained import config_from_dict, config_to_dict
from neuralhead.training.engine import Engine
from neuralhead.training.sampler import StepSampler
from neuralhead.visualize import comparison_sheet, to_uint8


@dataclass
class DNPTrainOptions:
    """Optimisation settings of a DNP run (all recorded in the run's config.json)."""

    preset: str = "dnp-256"
    batch_size: int = 4  # frames per step on each process
    lr: float = 5e-4
    lr_final_ratio: float = 0.1
    warmup_steps: int = 200
    latent_weight_decay: float = 0.0  # optional L2 on the latent codes v_i (0: off, as in Eq. 4)
    num_workers: int = 2  # data loader processes when frames are read from disk
    cache_limit_gb: float = 8.0  # keep training frames in memory below this size
    eval_frames: int = 32  # held-out frames scored at each evaluation
    model_overrides: dict[str, Any] = field(default_factory=dict)


def build_config(data: PortraitDataset, options: DNPTrainOptions) -> DNPConfig:
    """The model config: the preset, the user's overrides, and sizes taken from the data."""
    try:
        config = preset(options.preset, **options.model_overrides)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(str(exc).strip("'\"")) from None
    sizes: dict[str, Any] = {
        "num_expression": int(data.expression.shape[1]),
        "num_latents": int(data.files.split_range("train").stop),
    }
    if config.driver == "audio":
        if data.audio_windows is None:
            raise InputError(f"{options.preset} is audio-driven but {data.files.root} has no audio")
        sizes["audio_dim"] = int(data.audio_windows.shape[-1])
        sizes["audio_window"] = int(data.audio_windows.shape[1])
    return replace(config, **sizes)


class DNPTask:
    """The :class:`~neuralhead.training.engine.Task` that trains one portrait."""

    def __init__(
        self, engine: Engine, data_dir: str | Path, options: DNPTrainOptions, config: DNPConfig | None = None
    ) -> None:
        self.engine, self.options = engine, options
        probe = PortraitDataset(data_dir, "train", progress=False)
        self.config = config or build_config(probe, options)
        size = self.config.image_size
        probe.image_size = size
        cache = probe.cache_bytes < options.cache_limit_gb * 2**30
        self.train_set = PortraitDataset(
            data_dir, "train", size, cache=cache, progress=engine.is_main and engine.options.progress
        )
        try:
            self.heldout = PortraitDataset(data_dir, "heldout", size, progress=False)
        except InputError:
            self.heldout = None
        self.cached = cache

        model = DynamicNeuralPortrait(self.config)
        stats_frames = torch.as_tensor(self.train_set.frames)
        audio = self.train_set.audio_windows[stats_frames] if self.config.driver == "audio" else None
        model.set_input_statistics(
            self.train_set.pose[stats_frames],
            self.train_set.gaze[stats_frames],
            self.train_set.expression[stats_frames],
            audio,
        )
        model.set_mean_frame(self._mean_frame())
        self.raw_model = model
        # N_att takes no part in the loss before audio_attention_start.
        self.model = engine.wrap(model, find_unused_parameters=self.config.driver == "audio")
        latent_params = list(model.latents.parameters())
        latent_ids = {id(p) for p in latent_params}
        self.optimizer = torch.optim.Adam(
            [
                {"params": [p for p in model.parameters() if id(p) not in latent_ids]},
                {"params": latent_params, "weight_decay": options.latent_weight_decay},
            ],
            lr=options.lr,
        )
        total = engine.options.max_steps
        warmup, final = options.warmup_steps, options.lr_final_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.sampler = StepSampler(
            list(range(len(self.train_set))),
            options.batch_size,
            engine.options.seed,
            engine.rank,
            engine.world_size,
        )
        self._loader_iter = None
        self._preview_frames = self._pick_preview_frames()

    def _mean_frame(self, max_frames: int = 256) -> torch.Tensor:
        """Mean of (up to ``max_frames``, evenly spaced) training frames, in [-1, 1]."""
        frames = self.train_set.frames
        picks = frames[np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).astype(int)]
        total = torch.zeros(3, self.config.image_size, self.config.image_size, dtype=torch.float64)
        for frame in picks:
            total += self.train_set.image_uint8(int(frame)).double()
        return (total / len(picks) / 127.5 - 1.0).float()

    # ------------------------------------------------------------------ Task protocol
    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adam": self.optimizer}

    def schedulers(self) -> dict[str, Any]:
        return {"lr": self.scheduler}

    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        if self.cached:
            batch = self.train_set.batch(self.sampler.batch(step))
        else:
            if self._loader_iter is None:
                loader = torch.utils.data.DataLoader(
                    self.train_set,
                    batch_sampler=self.sampler.iterate(step),
                    num_workers=self.options.num_workers,
                    persistent_workers=self.options.num_workers > 0,
                )
                self._loader_iter = iter(loader)
            batch = next(self._loader_iter)
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, step: int) -> dict[str, float]:
        if self.config.driver == "audio":
            self.raw_model.audio_attention_active.fill_(step >= self.config.audio_attention_start)
        batch = self._batch(step)
        self.model.train()
        with self.engine.autocast():
            out = self.model(
                pose=batch["pose"],
                gaze=batch["gaze"],
                expression=batch["expression"],
                audio=batch.get("audio"),
                frame_index=batch["index"],
            )
        terms = reconstruction_loss(out, batch["image"])
        self.optimizer.zero_grad(set_to_none=True)
        self.engine.backward_and_step(terms["total"], self.optimizer)
        self.scheduler.step()
        with torch.no_grad():
            train_psnr = psnr((out.image.float().clamp(-1, 1) + 1) / 2, (batch["image"] + 1) / 2).mean()
        stats = {f"loss_{k}": float(v.detach()) for k, v in terms.items() if k != "total"}
        stats.update(loss=float(terms["total"].detach()), psnr=float(train_psnr), lr=self.scheduler.get_last_lr()[0])
        return stats

    @torch.no_grad()
    def render(self, dataset: PortraitDataset, frames: np.ndarray, use_latents: bool) -> torch.Tensor:
        """Generate ``frames`` of ``dataset``; training frames may use their own latent codes."""
        self.raw_model.eval()
        params = dataset.parameters(torch.as_tensor(frames, dtype=torch.long))
        params = {k: v.to(self.engine.device) for k, v in params.items()}
        out = self.raw_model(
            pose=params["pose"],
            gaze=params["gaze"],
            expression=params["expression"],
            audio=params.get("audio"),
            frame_index=params["index"] if use_latents else None,
        )
        return out.image.float().clamp(-1, 1)

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.engine.is_main or self.heldout is None:
            return {}
        frames = self.heldout.frames
        frames = frames[np.linspace(0, len(frames) - 1, min(self.options.eval_frames, len(frames))).astype(int)]
        pred = (self.render(self.heldout, frames, use_latents=False) + 1) / 2
        target = torch.stack([self.heldout.image_uint8(int(f)) for f in frames]).float() / 255.0
        target = target.to(pred.device)
        return {"heldout_psnr": float(psnr(pred, target).mean()), "heldout_l1": float(l1_255(pred, target).mean())}

    def _pick_preview_frames(self) -> list[tuple[PortraitDataset, int, bool]]:
        picks = [(self.train_set, int(f), True) for f in self.train_set.frames[:: max(len(self.train_set) // 3, 1)][:3]]
        if self.heldout is not None:
            picks += [(self.heldout, int(f), False) for f in self.heldout.frames[:: max(len(self.heldout) // 3, 1)][:3]]
        return picks

    def preview(self, step: int) -> np.ndarray:
        targets, preds, names = [], [], []
        for dataset, frame, train in self._preview_frames:
            pred = self.render(dataset, np.array([frame]), use_latents=train)[0]
            targets.append(to_uint8(dataset.image_uint8(frame).permute(1, 2, 0).numpy()))
            preds.append(to_uint8(pred))
            names.append(f"{'train' if train else 'held-out'} #{frame}")
        return comparison_sheet(targets, preds, names)

    def finish(self, run_dir: Path) -> None:
        """Export a self-contained portrait to ``run_dir/export``."""
        Portrait(self.raw_model, PortraitData.load(run_dir / "portrait"), run_dir).save(run_dir / "export")


def run_config(data_dir: Path, options: DNPTrainOptions, config: DNPConfig, engine: Engine) -> dict[str, Any]:
    return {
        "model": "dnp",
        "neuralhead_version": __version__,
        "data": str(Path(data_dir).resolve()),
        "train": asdict(options),
        "engine": asdict(engine.options),
        "model_config": config_to_dict(config),
        "world_size": engine.world_size,
    }


def train_dnp(
    data_dir: str | Path,
    run_dir: str | Path,
    options: DNPTrainOptions,
    engine_options,
    resume: bool = False,
) -> Path:
    """Train (or resume) a DNP run; returns the run directory. Works under torchrun."""
    run_dir = Path(run_dir)
    run = None
    if resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise InputError(f"cannot resume: {run_dir} has no config.json")
        run = json.loads(saved.read_text())
        # The data order is a function of the seed: a resumed run keeps its own.
        engine_options = replace(engine_options, seed=run["engine"]["seed"])
    elif run_dir.exists() and any(run_dir.iterdir()):
        # Refuse before loading any data (a large dataset takes a while to cache). Every rank
        # checks before joining the process group, which rank 0 must do before creating it.
        raise InputError(
            f"run directory {run_dir} already exists; pass --resume to continue it "
            "or choose another --run-dir"
        )
    engine = Engine.create(run_dir, engine_options)
    task = None
    try:
        config = None
        if run is not None:
            options = DNPTrainOptions(**run["train"])
            config = config_from_dict(DNPConfig, run["model_config"])
            data_dir = run["data"]
        task = DNPTask(engine, data_dir, options, config)
        engine.prepare_run_dir(run_config(Path(data_dir), options, task.config, engine), resume)
        if engine.is_main and not (run_dir / "portrait").exists():
            PortraitData.from_dataset(task.train_set.files).save(run_dir / "portrait")
        engine.barrier()
        start = engine.start_or_resume(task, resume)
        engine.fit(task, start)
    finally:
        task = None  # Engine.close frees its DDP wrappers while the process group lives
        engine.close()
    return run_dir
