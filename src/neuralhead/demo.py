"""``neuralhead demo``: the whole DNP pipeline on a clip the project makes itself.

1. **Synthesise** a talking-portrait clip from scikit-image's public-domain astronaut along a
   scripted trajectory of head pose, expression and gaze (:mod:`neuralhead.data.synthetic`),
   and a second clip along a trajectory never seen in training.
2. **Prepare** both with the face tracker, exactly as a user's video would be.
3. **Train** a CPU-sized Dynamic Neural Portrait (``dnp-tiny``, 128x128) on the first clip,
   its last 10% held out, for a fixed time.
4. **Reenact** the portrait with the unseen trajectory, side by side with its ground truth.
5. **Evaluate** held-out and unseen-trajectory frames against ground truth, beside the
   nearest-neighbour baseline, and the tracker itself against the scripted parameters.

Outputs in ``--out``: ``reenactment.mp4``, ``contact_sheet.png`` (held-out frames: ground
truth | generated | error, with the baseline), ``contact_sheet_novel.png`` and
``metrics.json``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuralhead.errors import InputError
from neuralhead.fileio import write_json_atomic


@dataclass
class DemoOptions:
    out: Path = Path("demo_out")
    train_minutes: float = 6.0
    frames: int = 800  # training clip length (25 fps): 32 s, the last 3.2 s held out
    novel_frames: int = 150  # the unseen driving trajectory
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True


def _stage(text: str) -> None:
    print(f"\n== {text}", flush=True)


def tracker_accuracy(tracked_pose: np.ndarray, tracked_gaze: np.ndarray, trajectory: Any) -> dict[str, float]:
    """Mean absolute error (degrees) of the tracked head rotation and gaze vs the script.

    The script's angles are relative to the source photo's own head pose, and the tracker's
    gaze is relative to the template's eyes; both offsets are constant, so the median
    difference is removed first.
    """

    def mae(tracked: np.ndarray, truth: np.ndarray) -> np.ndarray:
        diff = np.degrees(tracked - truth)
        return np.abs(diff - np.median(diff, axis=0)).mean(axis=0)

    pose_err = mae(tracked_pose[:, :3], trajectory.pose)
    gaze_err = mae(tracked_gaze, trajectory.gaze)
    return {
        "pitch_deg": float(pose_err[0]),
        "yaw_deg": float(pose_err[1]),
        "roll_deg": float(pose_err[2]),
        "gaze_yaw_deg": float(gaze_err[0]),
        "gaze_pitch_deg": float(gaze_err[1]),
    }


def run_demo(options: DemoOptions) -> str:
    """Run the demo; returns a short summary (also written to ``metrics.json``)."""
    from neuralhead.data.prepare import PrepareOptions, prepare_video
    from neuralhead.data.synthetic import default_portrait, scripted_trajectory, synthesize_clip
    from neuralhead.dnp.pipeline import ReenactOptions, reenact
    from neuralhead.dnp.trainer import DNPTrainOptions, train_dnp
    from neuralhead.evaluation.evaluate import evaluate_portrait, format_report
    from neuralhead.training.engine import EngineOptions

    out = Path(options.out)
    if out.exists() and any(out.iterdir()):
        if not options.overwrite:
            raise InputError(f"{out} is not empty: pass --overwrite or choose another --out")
        if not (out / "metrics.json").exists() and not (out / "clips").exists():
            raise InputError(f"refusing to overwrite {out}: it does not look like a demo output")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    timings: dict[str, float] = {}

    _stage("1/5 synthesising a talking-portrait clip from the astronaut photo (public domain)")
    t0 = time.time()
    portrait = default_portrait(256)
    train_traj = scripted_trajectory(options.frames, seed=0)
    novel_traj = scripted_trajectory(options.novel_frames, seed=1)
    clips = out / "clips"
    clips.mkdir()
    synthesize_clip(clips / "train.mp4", train_traj, portrait)
    synthesize_clip(clips / "novel.mp4", novel_traj, portrait)
    timings["synthesise_s"] = time.time() - t0

    _stage("2/5 preparing the clips (face tracking, crops, parameters, audio features)")
    t0 = time.time()
    data = out / "data"
    train_data = prepare_video(clips / "train.mp4", data / "train", PrepareOptions(size=256), options.progress)
    novel_data = prepare_video(
        clips / "novel.mp4",
        data / "novel",
        PrepareOptions(size=256, heldout_fraction=0.0, expression_basis=str(data / "train")),
        options.progress,
    )
    timings["prepare_s"] = time.time() - t0

    _stage(f"3/5 training Dynamic Neural Portraits (dnp-tiny, 128px) for {options.train_minutes:g} minutes")
    t0 = time.time()
    run_dir = out / "run"
    engine = EngineOptions(
        max_steps=1_000_000,
        time_budget_minutes=options.train_minutes,
        log_every=50,
        preview_every=500,
        eval_every=500,
        checkpoint_every=1000,
        device=options.device,
        progress=options.progress,
    )
    # A higher learning rate than the default suits this small model and short run.
    train_dnp(data / "train", run_dir, DNPTrainOptions(preset="dnp-tiny", batch_size=4, lr=1e-3), engine)
    timings["train_s"] = time.time() - t0

    _stage("4/5 reenacting with a trajectory never seen in training")
    t0 = time.time()
    video = reenact(
        run_dir,
        novel_data.root,
        out / "reenactment.mp4",
        ReenactOptions(motion="absolute", side_by_side=True, progress=options.progress),
    )
    timings["reenact_s"] = time.time() - t0

    _stage("5/5 evaluating against ground truth")
    t0 = time.time()
    heldout = evaluate_portrait(
        run_dir, train_data.root, "heldout", out=out / "eval" / "heldout.json",
        sheet=out / "contact_sheet.png", progress=options.progress,
    )  # fmt: skip
    novel = evaluate_portrait(
        run_dir, novel_data.root, "all", out=out / "eval" / "novel.json",
        sheet=out / "contact_sheet_novel.png", progress=options.progress,
    )  # fmt: skip
    accuracy = tracker_accuracy(
        train_data.array("pose", mmap=False), train_data.array("gaze", mmap=False), train_traj
    )
    timings["evaluate_s"] = time.time() - t0
    timings["total_s"] = time.time() - started

    model, nn = heldout["methods"]["model"], heldout["methods"].get("nearest_neighbour", {})
    beats = bool(nn) and model["psnr"] > nn["psnr"]
    metrics = {
        "heldout": heldout,
        "novel_trajectory": novel,
        "tracker_vs_script": accuracy,
        "model_beats_nearest_neighbour_psnr": beats,
        "reenactment_video": str(video.path),
        "timings": timings,
    }
    write_json_atomic(out / "metrics.json", metrics)
    lines = [
        "",
        "held-out frames of the training clip:",
        format_report(heldout),
        "",
        "trajectory never seen in training:",
        format_report(novel),
        "",
        "tracker vs scripted ground truth (mean abs. error, deg): "
        + ", ".join(f"{k[:-4]} {v:.2f}" for k, v in accuracy.items()),
        f"held-out PSNR: model {model['psnr']:.2f} dB vs nearest neighbour {nn.get('psnr', float('nan')):.2f} dB"
        + (" (model better)" if beats else " (model NOT better)"),
        f"outputs: {video.path}, {out / 'contact_sheet.png'}, {out / 'metrics.json'}",
        f"total time {timings['total_s'] / 60:.1f} min",
    ]
    return "\n".join(lines)
