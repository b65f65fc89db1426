"""The training loop shared by every model: devices, DDP, mixed precision, runs, resumption.

Distributed training uses PyTorch's own engine: launched by ``torchrun`` the process group
is read from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...)
and modules are wrapped in ``DistributedDataParallel``; launched plainly it is a single
process. NCCL is used on GPUs and gloo on CPUs, so the same command runs on a laptop, one
GPU, or many GPUs over many nodes.

A model plugs in as a :class:`Task` (modules, optimizers, a step function, previews). The
:class:`Engine` owns everything else: the run directory, logs, one JSON line of statistics
per logging step, TensorBoard events, preview images, atomic safetensors checkpoints and
exact resumption (step, weights, optimizer and scheduler state, random generators; the data
order is a function of the step, see :mod:`neuralhead.training.sampler`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from neuralhead.errors import InputError
from neuralhead.fileio import write_json_atomic
from neuralhead.training import checkpoint as ckpt

log = logging.getLogger("neuralhead.train")


@dataclass
class EngineOptions:
    """How long to train and how often to log, preview, evaluate and checkpoint."""

    max_steps: int = 10000
    log_every: int = 50
    preview_every: int = 500
    eval_every: int = 1000
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 10.0  # also checkpoint when this much time has passed
    keep_checkpoints: int = 3
    time_budget_minutes: float | None = None  # stop (with a checkpoint) after this long
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True


class Task(Protocol):
    """What a model provides to the engine."""

    def modules(self) -> dict[str, nn.Module]: ...  # everything whose weights are saved

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def schedulers(self) -> dict[str, Any]: ...

    def train_step(self, step: int) -> dict[str, float]: ...  # one optimisation step

    def evaluate(self, step: int) -> dict[str, float]: ...  # metrics on held-out data

    def preview(self, step: int) -> np.ndarray | None: ...  # an RGB uint8 image to look at

    def finish(self, run_dir: Path) -> None: ...  # export the trained model


@dataclass
class Engine:
    """Process group, device, precision and run directory of one training run."""

    run_dir: Path
    options: EngineOptions
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _writer: Any = None
    _scaler: Any = None

    # ------------------------------------------------------------------ set-up
    @classmethod
    def create(cls, run_dir: str | Path, options: EngineOptions) -> Engine:
        rank = int(os.environ.get("RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = _select_device(options.device, local_rank)
        if world_size > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30))
        engine = cls(Path(run_dir), options, rank, world_size, local_rank, device)
        engine._seed()
        return engine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def precision(self) -> str:
        p = self.options.precision
        if p == "auto":
            if self.device.type == "cuda":
                return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            return "fp32"
        if p not in ("fp32", "bf16", "fp16"):
            raise InputError(f"--precision must be auto, fp32, bf16 or fp16, got {p!r}")
        if p == "fp16" and self.device.type != "cuda":
            raise InputError("fp16 training needs a GPU; use --precision bf16 or fp32 on CPU")
        return p

    def _seed(self) -> None:
        # Every rank starts from the same weights (DDP also broadcasts them); random draws
        # inside steps differ per rank through the rank offset.
        seed = self.options.seed
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def seed_for_rank(self) -> None:
        """Re-seed after model construction so each rank draws its own noise."""
        seed = self.options.seed + 7919 * self.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """Move to the device and, when distributed, wrap in DistributedDataParallel.

        ``find_unused_parameters`` is for modules whose loss leaves some parameters out in
        some steps (DDP otherwise waits for their gradients and fails on the next step).
        """
        module = module.to(self.device)
        if self.distributed and any(p.requires_grad for p in module.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=ids, find_unused_parameters=find_unused_parameters
            )
        return module

    def autocast(self) -> contextlib.AbstractContextManager:
        p = self.precision
        if p == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward pass and optimizer step, with loss scaling under fp16."""
        if self.precision == "fp16":
            if self._scaler is None:
                self._scaler = torch.amp.GradScaler("cuda")
            self._scaler.scale(loss).backward()
            self._scaler.step(optimizer)
            self._scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar statistics over ranks (for logging)."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def replica_digests(self, module: nn.Module) -> list[str]:
        """SHA-256 of the module's weights on every rank (equal when replicas agree)."""
        module = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
        h = hashlib.sha256()
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest = h.hexdigest()
        if not self.distributed:
            return [digest]
        gathered: list[str] = [""] * self.world_size
        dist.all_gather_object(gathered, digest)
        return gathered

    # ------------------------------------------------------------------ run directory
    def prepare_run_dir(self, config: dict[str, Any], resume: bool) -> None:
        """Create (or check, when resuming) the run directory and start logging."""
        config_path = self.run_dir / "config.json"
        if self.is_main:
            if resume:
                if not config_path.is_file():
                    raise InputError(f"cannot resume: {self.run_dir} is not a training run directory")
            elif self.run_dir.exists() and any(self.run_dir.iterdir()):
                raise InputError(
                    f"run directory {self.run_dir} already exists; pass --resume to continue it "
                    "or choose another --run-dir"
                )
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "checkpoints").mkdir(exist_ok=True)
            (self.run_dir / "previews").mkdir(exist_ok=True)
            if not resume:
                write_json_atomic(config_path, config)
        self.barrier()
        self._setup_logging()

    def _setup_logging(self) -> None:
        log.setLevel(logging.INFO)
        log.propagate = False
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()
        if not self.is_main:
            log.addHandler(logging.NullHandler())
            return
        fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
        file_handler = logging.FileHandler(self.run_dir / "log.txt")
        file_handler.setFormatter(fmt)
        log.addHandler(file_handler)
        if not self.options.progress:
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(fmt)
            log.addHandler(console)

    def writer(self) -> Any:
        if self._writer is None and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    def write_stats(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.is_main:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        with open(self.run_dir / "stats.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self.writer()
        for key, value in values.items():
            writer.add_scalar(f"{kind}/{key}", value, step)
        writer.flush()

    def write_preview(self, step: int, image: np.ndarray) -> None:
        if not self.is_main:
            return
        import cv2

        path = self.run_dir / "previews" / f"step_{step:08d}.png"
        cv2.imwrite(str(path), np.ascontiguousarray(image[:, :, ::-1]))
        shutil.copyfile(path, self.run_dir / "previews" / "latest.png")
        self.writer().add_image("preview", image, step, dataformats="HWC")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, task: Task, step: int, extra: dict[str, Any] | None = None) -> None:
        root = self.run_dir / "checkpoints"
        tmp = root / f"{ckpt.checkpoint_name(step)}.tmp"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            modules = {n: _unwrap(m) for n, m in task.modules().items()}
            ckpt.write_checkpoint_files(
                tmp, modules, task.optimizers(), task.schedulers(), extra or {}, step
            )
        self.barrier()
        ckpt.write_rng_files(tmp, self.rank)
        self.barrier()
        if self.is_main:
            ckpt.publish_checkpoint(root, tmp, step, self.options.keep_checkpoints)
            log.info("checkpoint saved at step %d", step)
        self.barrier()

    def load_latest(self, task: Task) -> int:
        """Restore the latest checkpoint into the task; returns the step to continue from."""
        path = ckpt.latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            return 0
        modules = {n: _unwrap(m) for n, m in task.modules().items()}
        state = ckpt.load_checkpoint(
            path, modules, task.optimizers(), task.schedulers(), self.rank, self.device
        )
        log.info("resumed from %s (step %d)", path.name, state["step"])
        return int(state["step"])

    # ------------------------------------------------------------------ the loop
    def fit(self, task: Task, start_step: int = 0) -> int:
        """Run ``task`` from ``start_step`` to ``options.max_steps``; returns the final step."""
        opts = self.options
        step = start_step
        started = last_ckpt = time.time()
        stop = _StopFlag()
        # With a time budget the budget, not a step count nobody will reach, is what ends the
        # run, so the bar counts seconds and shows the step beside the loss.
        timed = opts.time_budget_minutes is not None
        bar = tqdm(
            total=round(60 * opts.time_budget_minutes) if timed else opts.max_steps,
            initial=0 if timed else start_step,
            desc="training",
            unit="s" if timed else "step",
            disable=not (opts.progress and self.is_main),
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s [{elapsed}<{remaining}{postfix}]"
            if timed
            else None,
        )
        postfix: dict[str, str] = {}
        last_refresh = 0.0
        window: dict[str, list[float]] = {}
        window_start, window_steps = time.time(), 0
        try:
            with stop.installed():
                while step < opts.max_steps:
                    values = task.train_step(step)
                    step += 1
                    window_steps += 1
                    for k, v in values.items():
                        window.setdefault(k, []).append(float(v))
                    if timed:
                        now = time.time()
                        if now - last_refresh > 0.5:
                            bar.n = min(bar.total, now - started)
                            postfix["step"] = str(step)
                            bar.set_postfix(postfix)
                            last_refresh = now
                    else:
                        bar.update()
                    if step % opts.log_every == 0 or step == opts.max_steps:
                        stats = {k: sum(v) / len(v) for k, v in window.items()}
                        stats = self.reduce_mean(stats)
                        stats["sec_per_step"] = (time.time() - window_start) / window_steps
                        stats.update(_memory_stats(self.device))
                        self.write_stats(step, "train", stats)
                        log.info("step %d %s", step, _fmt(stats))
                        postfix["loss"] = f"{stats.get('loss', float('nan')):.4f}"
                        bar.set_postfix(postfix)
                        window, window_start, window_steps = {}, time.time(), 0
                    if self.is_main and opts.preview_every and step % opts.preview_every == 0:
                        image = task.preview(step)
                        if image is not None:
                            self.write_preview(step, image)
                    if opts.eval_every and step % opts.eval_every == 0:
                        metrics = task.evaluate(step)
                        if metrics:
                            self.write_stats(step, "eval", metrics)
                            log.info("eval step %d %s", step, _fmt(metrics))
                    out_of_time = (
                        opts.time_budget_minutes is not None
                        and time.time() - started > 60 * opts.time_budget_minutes
                    )
                    interrupted = self._agree(stop.requested or out_of_time)
                    due = (opts.checkpoint_every and step % opts.checkpoint_every == 0) or (
                        time.time() - last_ckpt > 60 * opts.checkpoint_minutes
                    )
                    if self._agree(due) or interrupted or step == opts.max_steps:
                        self.save_checkpoint(task, step)
                        last_ckpt = time.time()
                    if interrupted:
                        reason = "time budget reached" if out_of_time else "interrupted"
                        log.info("%s at step %d; resume with --resume", reason, step)
                        break
        finally:
            bar.close()
        if step == opts.max_steps or not stop.requested:
            if self.is_main:
                task.finish(self.run_dir)
            self.barrier()
        if self._writer is not None:
            self._writer.close()
        return step

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (so all ranks checkpoint together)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def start_or_resume(self, task: Task, resume: bool) -> int:
        """The step to train from: the latest checkpoint's when resuming, else 0 (seeded per rank)."""
        start = self.load_latest(task) if resume else 0
        if start == 0:
            self.seed_for_rank()
        return start

    def close(self) -> None:
        """End the run; the caller drops its task (and so its DDP wrappers) first.

        DistributedDataParallel sits in reference cycles: left to the garbage collector it can
        be torn down at interpreter exit, after its process group, which aborts the process now
        and then (SIGABRT after a finished run). Collecting here frees it while all is alive.
        """
        if self.distributed:
            gc.collect()
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _select_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {spec} was asked for but no CUDA GPU is available")
    if spec == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(spec)


def _memory_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        import resource

        return {"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    except ImportError:
        return {}


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.5g}" for k, v in values.items())


class _StopFlag:
    """SIGINT / SIGTERM ask the loop to checkpoint and stop at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
