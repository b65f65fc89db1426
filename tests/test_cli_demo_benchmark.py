"""The demo end to end (at a toy size), the benchmark, and the command line's contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from neuralhead.benchmark import format_results, run_benchmark
from neuralhead.cli import build_parser, main
from neuralhead.demo import DemoOptions, run_demo
from neuralhead.media.video import is_marked_synthetic, probe_video


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(DemoOptions(out=out, train_minutes=0.05, frames=30, novel_frames=12, device="cpu",
                                   progress=False))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"heldout", "novel_trajectory", "tracker_vs_script", "timings"}
    for split in ("heldout", "novel_trajectory"):
        rows = metrics[split]["methods"]
        assert {"model", "nearest_neighbour", "ground_truth_retracked"} <= set(rows)
        assert rows["model"]["psnr"] > 0
    # The tracker recovers the scripted head rotation closely.
    assert metrics["tracker_vs_script"]["yaw_deg"] < 3.0
    video = probe_video(out / "reenactment.mp4")
    assert video.num_frames == 12 and video.has_audio and is_marked_synthetic(out / "reenactment.mp4")
    assert (out / "contact_sheet.png").is_file() and (out / "contact_sheet_novel.png").is_file()
    assert "held-out PSNR" in summary
    # A second run refuses to overwrite without being asked.
    assert main(["demo", "--out", str(out)]) == 2


def test_benchmark_records_time_and_memory(tmp_path):
    results = run_benchmark(resolutions=[256], precisions=["fp32"], iterations=1, warmup=1,
                            out=tmp_path / "b.json", progress=False)
    row = results["results"][0]
    assert row["status"] == "ok" and row["ms_median"] > 0 and row["fps"] > 0
    assert row["peak_memory_mb"] >= 0 and row["parameters"] > 0 and row["paper_ms_v100"] == 11.0
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["machine"]["torch"] and saved["results"][0]["resolution"] == 256
    assert "dnp" in format_results(results)


def test_every_command_has_help():
    parser = build_parser()
    for command in ("demo", "prepare", "train", "reenact", "evaluate", "benchmark", "export", "weights"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "dnp"], "error: give a prepared DATA_DIR to train on, or --resume RUN_DIR"),
        (["evaluate", "--checkpoint", "/nonexistent/run"], "error: checkpoint /nonexistent/run does not exist"),
        (["reenact", "--checkpoint", "/nonexistent/run", "--driving", "x.mp4", "--out", "y.mp4"],
         "error: checkpoint /nonexistent/run does not exist"),
        (["prepare", "/nonexistent/video.mp4", "out"], "error: video file not found: /nonexistent/video.mp4"),
    ],
)
def test_errors_are_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "neuralhead", *args], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message
