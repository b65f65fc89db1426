"""Driving, reenacting, exporting and evaluating DNP portraits, end to end on a tiny dataset."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralhead.data.format import DatasetFiles
from neuralhead.dnp.driving import (
    DrivingParameters,
    absolute_motion,
    audio_context,
    limit_to_training_range,
    relative_motion,
    replayed_motion,
)
from neuralhead.dnp.pipeline import ReenactOptions, reenact, render_frames
from neuralhead.dnp.portrait import Portrait, PortraitData
from neuralhead.dnp.trainer import DNPTrainOptions, train_dnp
from neuralhead.errors import InputError
from neuralhead.evaluation.baseline import NearestNeighbourBaseline
from neuralhead.evaluation.evaluate import evaluate_portrait, format_report
from neuralhead.geometry.rotation import euler_to_matrix
from neuralhead.inference.reenact import checkpoint_kind
from neuralhead.media.audio import write_wav
from neuralhead.media.video import is_marked_synthetic, probe_video
from neuralhead.metrics.pose import rotation_angle_deg
from neuralhead.training.engine import EngineOptions


def _train(data: Path, run: Path, preset: str = "dnp-test", steps: int = 12) -> Path:
    engine = EngineOptions(max_steps=steps, log_every=4, preview_every=6, eval_every=6, checkpoint_every=6,
                           progress=False, device="cpu")
    return train_dnp(data, run, DNPTrainOptions(preset=preset, batch_size=2), engine)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    from fake_data import make_dataset

    root = tmp_path_factory.mktemp("dnp")
    data = make_dataset(root / "data")
    return data, _train(data, root / "run")


@pytest.fixture(scope="module")
def portrait_data(trained) -> PortraitData:
    return PortraitData.from_dataset(DatasetFiles.open(trained[0]))


# ------------------------------------------------------------------------------- motion mapping
def test_relative_motion_of_the_portrait_itself_returns_its_reference(portrait_data):
    d = portrait_data
    ref = d.reference
    params = relative_motion(d, d.pose, d.gaze, d.canonical, reference=ref, limit=False)
    np.testing.assert_allclose(params.pose[ref], d.pose[ref], atol=1e-5)
    np.testing.assert_allclose(params.gaze[ref], d.gaze[ref], atol=1e-6)
    np.testing.assert_allclose(params.expression[ref], d.expression[ref], atol=1e-4)


def test_relative_motion_transfers_rotation_changes(portrait_data):
    d = portrait_data
    n = 5
    driver_pose = np.zeros((n, 6), np.float32)
    driver_pose[:, 1] = np.radians([0, 5, 10, 15, 20])  # the driver turns its head (yaw)
    driver_pose[:, 5] = -1.0
    canonical = np.repeat(d.canonical[:1], n, axis=0)
    params = relative_motion(d, driver_pose, np.zeros((n, 2)), canonical, reference=0, limit=False)
    target_ref = euler_to_matrix(torch.from_numpy(d.pose[d.reference, :3]).double())
    out = euler_to_matrix(torch.from_numpy(params.pose[:, :3]).double())
    delta = out @ target_ref.T
    expected = euler_to_matrix(torch.from_numpy(driver_pose[:, :3]).double())
    np.testing.assert_allclose(rotation_angle_deg(delta, expected).numpy(), 0, atol=1e-3)
    # The same face in every frame means no expression change.
    np.testing.assert_allclose(params.expression, np.repeat(d.expression[d.reference][None], n, 0), atol=1e-4)


def test_relative_translation_is_measured_in_face_sizes(portrait_data):
    d = portrait_data
    driver_pose = np.zeros((2, 6), np.float32)
    driver_pose[:, 5] = d.pose[d.reference, 5] + math.log(2.0)  # driver's face twice as large
    driver_pose[1, 3] = 0.2
    canonical = np.repeat(d.canonical[:1], 2, axis=0)
    params = relative_motion(d, driver_pose, np.zeros((2, 2)), canonical, limit=False)
    assert params.pose[1, 3] - params.pose[0, 3] == pytest.approx(0.1, abs=1e-5)
    assert params.pose[1, 5] == pytest.approx(params.pose[0, 5], abs=1e-6)


def test_relative_motion_maps_deformations_through_the_basis(portrait_data):
    d = portrait_data
    mode = d.basis.components[0].reshape(-1, 3) * d.basis.stddev[0]
    canonical = np.stack([d.canonical[0], d.canonical[0].copy()])
    canonical[1, :468] += mode  # one standard deviation along the first component
    pose = np.repeat(d.pose[:1], 2, axis=0)
    params = relative_motion(d, pose, np.zeros((2, 2)), canonical, limit=False)
    change = params.expression[1] - params.expression[0]
    assert change[0] == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(change[1:], 0, atol=1e-3)


def test_limit_keeps_values_near_the_training_range(portrait_data):
    d = portrait_data
    wild = DrivingParameters(
        pose=np.full((3, 6), 10.0, np.float32),
        gaze=np.full((3, 2), -10.0, np.float32),
        expression=np.full((3, d.expression.shape[1]), 50.0, np.float32),
    )
    limited = limit_to_training_range(d, wild)
    assert (limited.pose <= d.pose.max(0) + 0.25 * d.pose.std(0) + 1e-6).all()
    assert (limited.gaze >= d.gaze.min(0) - 0.25 * d.gaze.std(0) - 1e-6).all()
    assert (limited.expression <= d.expression.max(0) + 0.25 * d.expression.std(0) + 1e-5).all()


def test_absolute_motion_reproduces_the_dataset_coefficients(portrait_data):
    d = portrait_data
    params = absolute_motion(d, d.pose, d.gaze, d.canonical)
    np.testing.assert_allclose(params.expression, d.expression, atol=1e-4)
    np.testing.assert_array_equal(params.pose, d.pose)


def test_replayed_motion_is_continuous_and_starts_at_the_reference(portrait_data):
    d = portrait_data
    params = replayed_motion(d, 3 * len(d.frames))
    np.testing.assert_array_equal(params.pose[0], d.pose[d.reference])
    rows = [int(np.flatnonzero((d.pose == p).all(1))[0]) for p in params.pose]
    assert max(abs(a - b) for a, b in zip(rows[:-1], rows[1:])) == 1  # never jumps


def test_audio_context_stacks_neighbouring_windows():
    windows = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((10, 16, 3), np.float32)
    ctx = audio_context(windows, frames=8)
    assert ctx.shape == (10, 8, 16, 3)
    np.testing.assert_array_equal(ctx[5, :, 0, 0], [2, 3, 4, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(ctx[0, :, 0, 0], [0, 0, 0, 0, 1, 2, 3, 4])  # clamped at the start


def test_nearest_neighbour_finds_exact_matches(portrait_data):
    d = portrait_data
    rows = NearestNeighbourBaseline(d).nearest(d.pose[[3, 7]], d.gaze[[3, 7]], d.expression[[3, 7]])
    np.testing.assert_array_equal(rows, [3, 7])


# ------------------------------------------------------------------------------- pipelines
def test_self_reenactment_video(trained, tmp_path):
    data, run = trained
    out = tmp_path / "self.mp4"
    result = reenact(run, data, out, ReenactOptions(split="heldout", side_by_side=True, progress=False))
    assert result.motion == "absolute" and result.has_audio
    info = probe_video(out)
    assert info.num_frames == 4 and info.has_audio
    assert (info.width, info.height) == (64, 32)  # driver | output
    assert is_marked_synthetic(out)


def test_reenact_from_a_parameter_file(trained, tmp_path, portrait_data):
    data, run = trained
    params = tmp_path / "params.npz"
    d = portrait_data
    np.savez(params, pose=d.pose[:6], gaze=d.gaze[:6], expression=d.expression[:6], fps=np.float64(10.0))
    result = reenact(run, params, tmp_path / "p.mp4", ReenactOptions(progress=False))
    assert result.motion == "absolute" and result.num_frames == 6 and not result.has_audio
    assert probe_video(tmp_path / "p.mp4").fps == pytest.approx(10.0)
    np.savez(tmp_path / "bad.npz", pose=d.pose[:6])
    with pytest.raises(InputError, match="needs arrays pose, gaze and expression or canonical"):
        reenact(run, tmp_path / "bad.npz", tmp_path / "q.mp4", ReenactOptions(progress=False))


def test_audio_drives_only_audio_portraits(trained, tmp_path):
    data, run = trained
    wav = tmp_path / "speech.wav"
    write_wav(wav, 0.2 * np.sin(np.arange(16000) * 0.07), 16000)
    with pytest.raises(InputError, match="expression-driven"):
        reenact(run, wav, tmp_path / "a.mp4", ReenactOptions(progress=False))
    audio_run = _train(data, tmp_path / "audio_run", preset="dnp-test-audio", steps=6)
    result = reenact(audio_run, wav, tmp_path / "a.mp4", ReenactOptions(progress=False))
    info = probe_video(tmp_path / "a.mp4")
    assert result.motion == "replayed" and info.has_audio
    assert info.num_frames == 25  # one second of speech at the portrait's 25 fps
    assert info.duration == pytest.approx(1.0, abs=0.05)


def test_export_round_trip(trained, tmp_path, portrait_data):
    data, run = trained
    loaded = Portrait.load(run)
    exported = loaded.save(tmp_path / "export")
    again = Portrait.load(exported)
    params = absolute_motion(portrait_data, portrait_data.pose[:3], portrait_data.gaze[:3], portrait_data.canonical[:3])
    a = list(render_frames(loaded, params, progress=False))
    b = list(render_frames(again, params, progress=False))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert checkpoint_kind(run) == "dnp" and checkpoint_kind(exported) == "dnp"


def test_checkpoint_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        checkpoint_kind(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model": "headgan"}))
    with pytest.raises(InputError, match="cannot reenact"):
        checkpoint_kind(tmp_path / "other")
    with pytest.raises(InputError, match="neither a training run"):
        Portrait.load(tmp_path)


def test_evaluate_reports_model_and_baseline(trained, tmp_path):
    data, run = trained
    report = evaluate_portrait(run, data, "heldout", out=tmp_path / "m.json", tracking=False, progress=False)
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["num_frames"] == 4 and saved["resolution"] == 32
    for method in ("model", "nearest_neighbour"):
        values = saved["methods"][method]
        assert 0 <= values["l1_255"] <= 255 and values["psnr"] > 0 and -1 <= values["ssim"] <= 1
    assert "lpips" in saved["unavailable"] and "fid" in saved["unavailable"]
    assert Path(saved["sheet"]).is_file()
    text = format_report(report)
    assert "nearest_neighbour" in text and "unavailable" in text


def test_cli_reenact_rejects_an_image(trained, tmp_path):
    import cv2

    data, run = trained
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    proc = subprocess.run(
        [sys.executable, "-m", "neuralhead", "reenact", "--checkpoint", str(run), "--driving", str(image),
         "--out", str(tmp_path / "x.mp4")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {image} is an image, not a video"
    assert "Traceback" not in proc.stderr
