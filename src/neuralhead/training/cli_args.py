"""Command-line pieces every ``neuralhead train`` command shares.

The run directory, schedule, device and logging options, their translation into
:class:`~neuralhead.training.engine.EngineOptions`, the default run directory and the
relaunch under ``torchrun`` are the same for every model, so they live here once; each
model's module adds only its own options.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from neuralhead.errors import InputError
from neuralhead.training.engine import EngineOptions

#: Interval options of every train command: flag -> EngineOptions field.
INTERVALS = {
    "--log-every": "log_every",
    "--preview-every": "preview_every",
    "--eval-every": "eval_every",
    "--checkpoint-every": "checkpoint_every",
}


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def key_value(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` with VALUE read as JSON when it parses (lists become tuples)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, list):
        value = tuple(value)
    return key.strip(), value


def add_run_arguments(p: argparse.ArgumentParser, *, overrides: bool = True) -> None:
    """Run-directory, schedule, device and logging options (and ``--set`` when ``overrides``)."""
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/<model>-<data>-<time>")
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint",
    )
    p.add_argument(
        "--max-steps",
        type=positive_int,
        default=None,
        help="default: the preset's iterations (kept when resuming)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="stop with a checkpoint after this many minutes",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="samples per step and process (default: the preset's)",
    )
    if overrides:
        p.add_argument(
            "--set",
            dest="overrides",
            type=key_value,
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="override a config field, e.g. --set weight_fm=10",
        )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: bf16/fp16 on GPU, fp32 on CPU",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    for flag, name in INTERVALS.items():
        p.add_argument(
            flag,
            type=positive_int,
            default=None,
            help=f"default {getattr(EngineOptions, name)}, or the resumed run's",
        )
    p.add_argument(
        "--nproc-per-node",
        type=positive_int,
        default=None,
        help="launch this many processes on this machine (torchrun)",
    )
    p.add_argument("--no-progress", action="store_true")


def _saved_engine(args: argparse.Namespace) -> dict:
    """The engine options recorded by the run being resumed (empty for a new run)."""
    resume = getattr(args, "resume", None)
    if resume is None or not (resume / "config.json").is_file():
        return {}
    return json.loads((resume / "config.json").read_text()).get("engine", {})


def engine_options(args: argparse.Namespace, default_max_steps: int) -> EngineOptions:
    """The engine options of a parsed command.

    A resumed run keeps its step limit and its logging, preview, evaluation and checkpoint
    intervals unless the command gives new ones; a new run takes the defaults.
    """
    saved = _saved_engine(args)
    max_steps = args.max_steps or saved.get("max_steps", default_max_steps)
    intervals = {}
    for name in INTERVALS.values():
        given = getattr(args, name, None)
        intervals[name] = (
            given if given is not None else saved.get(name, getattr(EngineOptions, name))
        )
    return EngineOptions(
        max_steps=max_steps,
        **intervals,
        time_budget_minutes=args.time_budget,
        precision=args.precision,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )


def train_run_dir(args: argparse.Namespace, model: str, data: Path) -> Path:
    """--resume, else --run-dir, else runs/MODEL-DATA-TIME (refused under torchrun)."""
    run_dir = args.resume or args.run_dir
    if run_dir is None:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise InputError(
                "pass --run-dir when launching with torchrun (every process needs the same one)"
            )
        run_dir = (
            Path("runs") / f"{model}-{Path(data).resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    return run_dir


def relaunch_with_torchrun(nproc: int, run_dir: Path) -> int:
    """Re-run this command under torch.distributed.run with ``nproc`` local processes."""
    cleaned: list[str] = []
    skip = False
    for item in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if item == "--nproc-per-node":
            skip = True
            continue
        if item.startswith("--nproc-per-node="):
            continue
        cleaned.append(item)
    if "--run-dir" not in cleaned and "--resume" not in cleaned:
        cleaned += ["--run-dir", str(run_dir)]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "neuralhead",
        *cleaned,
    ]
    return subprocess.call(cmd)


def should_relaunch(args: argparse.Namespace) -> bool:
    """Whether ``--nproc-per-node`` asks for a torchrun relaunch of this (not yet launched) process."""
    return bool(args.nproc_per_node) and "LOCAL_RANK" not in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0
