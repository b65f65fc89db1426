"""The ``neuralhead`` command line: one command, a sub-command per job.

Each sub-command parses its arguments and calls a pipeline function; no pipeline logic lives
here. A :class:`~neuralhead.errors.NeuralheadError` ends the command with one line
(``error: ...``) and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from neuralhead import __version__
from neuralhead.errors import InputError, NeuralheadError


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _key_value(text: str) -> tuple[str, object]:
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


# ---------------------------------------------------------------------------------- prepare
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="track, crop and parametrise a talking-head video into a dataset directory",
        description="Track a video's face (478 landmarks), crop it, and write frames, masks, "
        "pose / expression / gaze parameters and audio features (see docs/dataset.md).",
    )
    p.add_argument("video", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--size", type=int, default=256, help="crop size in pixels: 256, 512 or 1024 (default 256)")
    p.add_argument("--crop", dest="crop_mode", default="fixed", choices=["fixed", "track", "full"],
                   help="fixed: one box for the clip (default); track: follow the head; full: whole frame")
    p.add_argument("--crop-scale", type=float, default=2.0, help="crop side in face sizes (default 2.0)")
    p.add_argument("--num-expression", type=int, default=32, help="expression coefficients (default 32)")
    p.add_argument("--expression-basis", default=None,
                   help="reuse the expression basis of another dataset (its directory or .npz)")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction held out at the clip's end (default 0.1)")
    p.add_argument("--audio-features", default="logmel",
                   help="audio feature extractor: logmel (default), mfcc or package.module:Class")
    p.add_argument("--no-masks", action="store_true", help="do not compute foreground masks")
    p.add_argument("--max-frames", type=_positive_int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT_DIR")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from neuralhead.data.prepare import PrepareOptions, prepare_video

    options = PrepareOptions(
        size=args.size,
        crop_mode=args.crop_mode,
        crop_scale=args.crop_scale,
        num_expression=args.num_expression,
        expression_basis=args.expression_basis,
        heldout_fraction=args.heldout,
        audio_extractor=args.audio_features,
        write_masks=not args.no_masks,
        max_frames=args.max_frames,
        overwrite=args.overwrite,
    )
    files = prepare_video(args.video, args.out_dir, options)
    meta = files.meta
    print(
        f"prepared {meta['num_frames']} frames ({meta['faces']['missing']} without a face, "
        f"interpolated) at {meta['size']}x{meta['size']}, {meta['split']['num_heldout']} held out, "
        f"audio: {'yes' if meta['audio'] else 'no'} -> {files.root}"
    )
    return 0


# ---------------------------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model")
    models = p.add_subparsers(dest="model", metavar="MODEL", required=True)
    d = models.add_parser(
        "dnp",
        help="Dynamic Neural Portraits on one prepared video",
        description="Train a person-specific DNP portrait. Runs on one CPU, one GPU or, under "
        "torchrun (or with --nproc-per-node), on many GPUs and nodes.",
    )
    d.add_argument("data_dir", type=Path, nargs="?", help="prepared dataset (not needed with --resume)")
    d.add_argument("--preset", default="dnp-256",
                   help="dnp-tiny (CPU, 128px), dnp-256, dnp-512, dnp-1024; add -audio for the audio-driven variant")
    d.add_argument("--run-dir", type=Path, default=None, help="default: runs/dnp-<dataset>-<time>")
    d.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest checkpoint")
    d.add_argument("--max-steps", type=_positive_int, default=None, help="default 20000 (kept when resuming)")
    d.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop with a checkpoint after this many minutes")
    d.add_argument("--batch-size", type=_positive_int, default=4, help="frames per step and process (default 4)")
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--set", dest="overrides", type=_key_value, action="append", default=[],
                   metavar="FIELD=VALUE", help="override a model config field, e.g. --set mlp_width=512")
    d.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16/fp16 on GPU, fp32 on CPU")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--log-every", type=_positive_int, default=50)
    d.add_argument("--preview-every", type=_positive_int, default=500)
    d.add_argument("--eval-every", type=_positive_int, default=1000)
    d.add_argument("--checkpoint-every", type=_positive_int, default=1000)
    d.add_argument("--num-workers", type=int, default=2)
    d.add_argument("--nproc-per-node", type=_positive_int, default=None,
                   help="launch this many processes on this machine (torchrun)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_run_train_dnp)

    from neuralhead.pretrained import gaze_distill

    g = models.add_parser(
        "gaze",
        help="distil the gaze + blink network of MegaPortraits (App. B.5) from teacher labels",
        description="Distil the VGG16-based gaze + blink network used by the gaze loss from a "
        f"folder of eye crops with teacher labels ({gaze_distill.LABELS_FILE}; see docs/weights.md).",
    )
    gaze_distill.add_arguments(g)
    g.set_defaults(func=gaze_distill.run)


def _run_train_dnp(args: argparse.Namespace) -> int:
    from neuralhead.dnp.trainer import DNPTrainOptions, train_dnp
    from neuralhead.training.engine import EngineOptions

    if args.resume is None and args.data_dir is None:
        raise InputError("give a prepared DATA_DIR to train on, or --resume RUN_DIR")
    run_dir = args.resume or args.run_dir
    if run_dir is None:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise InputError("pass --run-dir when launching with torchrun (every process needs the same one)")
        run_dir = Path("runs") / f"dnp-{args.data_dir.resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return _relaunch_with_torchrun(args.nproc_per_node, run_dir)

    max_steps = args.max_steps
    if max_steps is None:
        max_steps = 20000
        if args.resume is not None and (args.resume / "config.json").is_file():
            max_steps = json.loads((args.resume / "config.json").read_text())["engine"]["max_steps"]
    engine_options = EngineOptions(
        max_steps=max_steps,
        log_every=args.log_every,
        preview_every=args.preview_every,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        time_budget_minutes=args.time_budget,
        precision=args.precision,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    options = DNPTrainOptions(
        preset=args.preset,
        batch_size=args.batch_size,
        lr=args.lr,
        num_workers=args.num_workers,
        model_overrides=dict(args.overrides),
    )
    run = train_dnp(args.data_dir, run_dir, options, engine_options, resume=args.resume is not None)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"run directory: {run}")
    return 0


def _relaunch_with_torchrun(nproc: int, run_dir: Path) -> int:
    """Re-run this command under torch.distributed.run with ``nproc`` local processes."""
    argv = sys.argv[1:]
    cleaned: list[str] = []
    skip = False
    for item in argv:
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "neuralhead", *cleaned]
    return subprocess.call(cmd)


# ---------------------------------------------------------------------------------- reenact
def _add_reenact(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reenact",
        help="drive a trained portrait with a video, a dataset, a parameter file or audio",
        description="Render a video of the portrait at --checkpoint driven by --driving: a video "
        "(another person: relative motion), a prepared dataset (the portrait's own: absolute), "
        "a .npz of parameters, or an audio file (audio-driven portraits).",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="training run directory or saved portrait")
    p.add_argument("--driving", type=Path, required=True, help="VIDEO | DATASET_DIR | PARAMS.npz | AUDIO")
    p.add_argument("--out", type=Path, required=True, help="output .mp4")
    p.add_argument("--motion", default="auto", choices=["auto", "absolute", "relative"])
    p.add_argument("--split", default="all", choices=["all", "train", "heldout"],
                   help="frames of a dataset driver (default all)")
    p.add_argument("--driver-reference", type=int, default=0,
                   help="driver frame that relative motion is measured from (default 0)")
    p.add_argument("--no-limit", action="store_true", help="do not clip relative motion to the training range")
    p.add_argument("--side-by-side", action="store_true", help="show the driver left of the output")
    p.add_argument("--max-frames", type=_positive_int, default=None)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_reenact)


def _run_reenact(args: argparse.Namespace) -> int:
    from neuralhead.inference.reenact import reenact

    result = reenact(
        args.checkpoint,
        args.driving,
        args.out,
        motion=args.motion,
        split=args.split,
        driver_reference=args.driver_reference,
        limit=not args.no_limit,
        side_by_side=args.side_by_side,
        max_frames=args.max_frames,
        batch_size=args.batch_size,
        device=args.device,
    )
    audio = "with audio" if result.has_audio else "no audio"
    print(f"wrote {result.path}: {result.num_frames} frames at {result.fps:g} fps, {result.motion} motion, {audio}")
    return 0


# ---------------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a portrait on held-out frames (--checkpoint), or generated frames against "
        "reference frames (--pred/--target folders or videos)",
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="portrait run to score")
    p.add_argument("--pred", type=Path, default=None,
                   help="generated frames: a folder of images (sorted by name) or a video")
    p.add_argument("--target", type=Path, default=None,
                   help="reference frames, paired with --pred frame by frame")
    p.add_argument("--metrics", nargs="+", default=None, metavar="METRIC",
                   help="--pred/--target: metrics to compute, e.g. psnr ssim lpips fid fvd csim "
                   "ard_deg (default: all; see docs/evaluation.md)")
    p.add_argument("--expression-basis", type=Path, default=None,
                   help="--pred/--target: expression_basis.npz to compare expressions in "
                   "(default: fitted to the target)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="--pred/--target: frames per batch (default: 8)")
    p.add_argument("--data", type=Path, default=None, help="dataset to score on (default: the training one)")
    p.add_argument("--split", default=None, choices=["heldout", "train", "all"], help="default: heldout")
    p.add_argument("--driving", type=Path, default=None,
                   help="also cross-reenact with this video and measure how the output follows it")
    p.add_argument("--out", type=Path, default=None,
                   help="metrics JSON (default: <checkpoint>/eval/metrics.json, or <pred>_metrics.json)")
    p.add_argument("--sheet", type=Path, default=None, help="contact sheet PNG (default beside the JSON)")
    p.add_argument("--max-frames", type=_positive_int, default=None)
    p.add_argument("--no-tracking", action="store_true", help="skip pose/expression/gaze distances")
    p.add_argument("--no-limit", action="store_true",
                   help="cross-reenactment: do not clip the driver's motion to the training range")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    paired = args.pred is not None or args.target is not None
    if paired == (args.checkpoint is not None):
        raise InputError("give either --checkpoint (score a portrait) or --pred and --target")
    if paired and (args.pred is None or args.target is None):
        raise InputError("--pred and --target go together: give both")
    # Options of the other mode would be silently ignored: say so instead.
    other_mode = ("data", "split", "driving", "sheet", "no_limit") if paired else (
        "metrics", "expression_basis", "batch_size")
    misplaced = ["--" + name.replace("_", "-") for name in other_mode if getattr(args, name) not in (None, False)]
    if misplaced:
        mode = "--checkpoint" if paired else "--pred/--target"
        raise InputError(f"{', '.join(misplaced)} only apply to {mode}")

    if not paired:
        from neuralhead.evaluation.evaluate import evaluate_portrait, format_report

        report = evaluate_portrait(
            args.checkpoint,
            data=args.data,
            split=args.split or "heldout",
            driving=args.driving,
            out=args.out,
            sheet=args.sheet,
            max_frames=args.max_frames,
            tracking=not args.no_tracking,
            device=args.device,
            limit=not args.no_limit,
        )
        print(format_report(report))
        return 0

    from neuralhead.evaluation.paired import (
        DEFAULT_BATCH_SIZE,
        PAIRED_METRICS,
        TRACKED_METRICS,
        evaluate_pairs,
        format_table,
    )

    metrics = args.metrics or list(PAIRED_METRICS)
    if args.no_tracking:
        metrics = [name for name in metrics if name not in TRACKED_METRICS]
    pred = args.pred.resolve()
    pairs = evaluate_pairs(
        args.pred,
        args.target,
        metrics=metrics,
        out=args.out or pred.with_name(pred.stem + "_metrics.json"),
        max_frames=args.max_frames,
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        expression_basis=args.expression_basis,
        tracking=not args.no_tracking,
        device=args.device,
    )
    print(format_table(pairs))
    return 0


# ---------------------------------------------------------------------------------- benchmark
def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="time per frame and peak memory of the generators")
    p.add_argument("--model", default="dnp", choices=["dnp"])
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: all present)")
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--iterations", type=_positive_int, default=10)
    p.add_argument("--warmup", type=_positive_int, default=3)
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per configuration (default 600)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/dnp.json"))
    p.set_defaults(func=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    from neuralhead.benchmark import format_results, run_benchmark

    results = run_benchmark(
        model=args.model,
        resolutions=args.resolutions,
        precisions=args.precisions,
        devices=args.devices,
        batch_size=args.batch_size,
        iterations=args.iterations,
        warmup=args.warmup,
        threads=args.threads,
        out=args.out,
        timeout_s=args.timeout,
    )
    print(format_results(results))
    print(f"results written to {args.out}")
    return 0


# ---------------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a self-contained portrait (weights + person data) from a run")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from neuralhead.dnp.portrait import Portrait

    portrait = Portrait.load(args.checkpoint)
    path = portrait.save(args.out)
    print(f"saved portrait (step {portrait.step}) to {path}")
    return 0


# ---------------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="synthesise a clip, then prepare, train, reenact and evaluate DNP on it (CPU, < 10 min)",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--train-minutes", type=float, default=6.0, help="training time (default 6)")
    p.add_argument("--frames", type=_positive_int, default=800, help="frames of the training clip (default 800)")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo output directory")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from neuralhead.demo import DemoOptions, run_demo

    summary = run_demo(
        DemoOptions(
            out=args.out,
            train_minutes=args.train_minutes,
            frames=args.frames,
            device=args.device,
            overwrite=args.overwrite,
        )
    )
    print(summary)
    return 0


# ---------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuralhead", description="Neural head avatars: prepare, train, reenact, evaluate, benchmark."
    )
    parser.add_argument("--version", action="version", version=f"neuralhead {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_reenact(sub)
    _add_evaluate(sub)
    _add_benchmark(sub)
    _add_export(sub)
    from neuralhead.weights_cli import add_weights_parser

    add_weights_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NeuralheadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
