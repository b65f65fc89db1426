"""Paired evaluation of two folders or videos of frames, and ``neuralhead evaluate --pred``.

Networks are tiny random stand-ins with the published networks' call signatures; faces for
the tracked metrics are rendered from the synthetic astronaut portrait with known poses.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.cli import main
from neuralhead.errors import InputError
from neuralhead.evaluation.paired import (
    PAIRED_METRICS,
    TRACKED_METRICS,
    evaluate_pairs,
    format_table,
)
from neuralhead.media.video import VideoWriter
from neuralhead.metrics import csim, l1_255, psnr, ssim
from neuralhead.metrics import fid as fid_module
from neuralhead.metrics.identity import five_points_from_mesh
from neuralhead.metrics.lpips import LPIPS


class TinyIdentityNet(nn.Module):
    """ArcFace's call signature at a tiny size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1), dim=-1)


class TinyVideoNet(nn.Module):
    """I3D's ``features`` signature at a tiny size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, stride=2)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool3d(torch.relu(self.conv(video)), 1).flatten(1)


class TinyImageNet(nn.Module):
    """An FID feature network's call signature, 8 features instead of 2048."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)


def _smooth_frames(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Gradients with a moving blob: smooth enough for H.264 to keep them nearly intact."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    frames = []
    for i in range(n):
        cx, cy = 0.3 + 0.4 * i / max(n - 1, 1), 0.5 + 0.1 * rng.standard_normal()
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02)
        image = np.stack([0.2 + 0.5 * xx, 0.3 + 0.4 * yy, 0.2 + 0.6 * blob], -1)
        frames.append((np.clip(image, 0, 1) * 255).astype(np.uint8))
    return frames


def _noisy(frames: list[np.ndarray], seed: int = 1, amount: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        np.clip(f.astype(int) + rng.integers(-amount, amount + 1, f.shape), 0, 255).astype(np.uint8)
        for f in frames
    ]


def _write_folder(folder: Path, frames: list[np.ndarray], names: list[str] | None = None) -> Path:
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        name = names[i] if names else f"{i:04d}.png"
        cv2.imwrite(str(folder / name), frame[:, :, ::-1])
    return folder


def _write_video(path: Path, frames: list[np.ndarray]) -> Path:
    with VideoWriter(path, 25, crf=0) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def _tensor(frames: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255


# ------------------------------------------------------------------ folders and videos
def test_folders_of_images(tmp_path):
    torch.manual_seed(0)
    target = _smooth_frames(5)
    pred = _noisy(target)
    lpips, identity = LPIPS(), TinyIdentityNet()
    report = evaluate_pairs(
        _write_folder(tmp_path / "pred", pred),
        _write_folder(tmp_path / "target", target),
        metrics=["l1_255", "psnr", "ssim", "lpips", "csim"],
        networks={"lpips": lpips, "csim": identity},
        batch_size=2,  # batches of 2, 2 and 1 frames
        out=tmp_path / "out" / "metrics.json",
        tracking=False,  # no faces here: CSIM on whole frames, as before alignment
        progress=False,
    )
    p, t = _tensor(pred), _tensor(target)
    with torch.no_grad():
        expected = {
            "l1_255": l1_255(p, t).mean(),
            "psnr": psnr(p, t).mean(),
            "ssim": ssim(p, t).mean(),
            "lpips": lpips(p, t).mean(),
            "csim": csim(p, t, identity).mean(),
        }
    assert list(report["metrics"]) == list(expected)
    for name, value in expected.items():
        assert report["metrics"][name] == pytest.approx(float(value), rel=1e-5), name
    assert report["num_frames"] == 5 and report["size"] == [32, 32]
    assert report["unavailable"] == {} and "tracking" not in report
    assert report["csim_frames"] == 5 and report["csim_aligned"] is False
    assert report["csim_unaligned_reason"] == "face tracking is disabled"
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == {k: v for k, v in report.items() if k != "json"}
    table = format_table(report)
    assert "5 frame pairs at 32x32" in table
    assert "csim: whole frames, not aligned (face tracking is disabled)" in table
    assert any(line.startswith("psnr") and line.endswith("higher") for line in table.splitlines())
    assert any(line.startswith("lpips") and line.endswith("lower") for line in table.splitlines())


def test_a_video_against_a_folder_and_against_itself(tmp_path):
    frames = _smooth_frames(6, size=48)
    video = _write_video(tmp_path / "pred.mp4", frames)
    folder = _write_folder(tmp_path / "target", frames)
    pixels = ["l1_255", "psnr", "ssim"]
    report = evaluate_pairs(video, folder, metrics=pixels, progress=False)
    assert report["pred_kind"] == "video" and report["target_kind"] == "folder of 6 images"
    assert report["num_frames"] == 6 and report["size"] == [48, 48]
    # Only the colour conversion of the video stands between the two.
    assert report["metrics"]["psnr"] > 30 and report["metrics"]["ssim"] > 0.9
    same = evaluate_pairs(video, video, metrics=pixels, progress=False)
    assert same["metrics"]["l1_255"] == 0 and same["metrics"]["ssim"] == pytest.approx(1.0)
    first = evaluate_pairs(video, folder, metrics=pixels, max_frames=2, progress=False)
    assert first["num_frames"] == 2


def test_mismatched_inputs_are_refused(tmp_path):
    frames = _smooth_frames(4)
    four = _write_folder(tmp_path / "four", frames)
    three = _write_folder(tmp_path / "three", frames[:3])
    renamed = _write_folder(tmp_path / "renamed", frames, [f"f{i}.png" for i in range(4)])
    video = _write_video(tmp_path / "three.mp4", frames[:3])
    small = _write_folder(tmp_path / "small", [f[:16, :16] for f in frames])
    (tmp_path / "empty").mkdir()

    def run(pred: Path, target: Path, **kwargs):
        return evaluate_pairs(pred, target, metrics=["psnr"], progress=False, **kwargs)

    with pytest.raises(InputError, match="holds 3 images and .* 4; the folders must hold the same"):
        run(three, four)
    with pytest.raises(InputError, match=r"0000\.png stands where .*f0\.png does"):
        run(four, renamed)
    with pytest.raises(InputError, match=r"three\.mp4 has 3 frames and .*four more"):
        run(video, four)
    with pytest.raises(InputError, match="frame 0: .* is 32x32 and .* 16x16"):
        run(four, small)
    with pytest.raises(InputError, match="no images"):
        run(tmp_path / "empty", four)
    with pytest.raises(InputError, match="video file not found"):
        run(tmp_path / "missing.mp4", four)
    with pytest.raises(InputError, match="unknown metric.*nope"):
        evaluate_pairs(four, four, metrics=["psnr", "nope"], progress=False)
    with pytest.raises(InputError, match="SSIM needs images of at least 11x11"):
        tiny = _write_folder(tmp_path / "tiny", [f[:8, :8] for f in frames])
        evaluate_pairs(tiny, tiny, metrics=["ssim"], progress=False)


def test_metrics_without_weights_are_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "empty"))
    folder = _write_folder(tmp_path / "frames", _smooth_frames(3))
    report = evaluate_pairs(
        folder, folder, metrics=["psnr", "lpips", "fid", "csim", "fvd"], progress=False
    )
    assert list(report["metrics"]) == ["psnr"]
    assert list(report["unavailable"]) == ["lpips", "csim", "fid", "fvd"]
    assert "vgg16-397923af.pth not found" in report["unavailable"]["lpips"]
    assert "pt_inception-2015-12-05-6726825d.pth not found" in report["unavailable"]["fid"]
    assert "arcface" in report["unavailable"]["csim"]
    assert "rgb_imagenet.pt not found" in report["unavailable"]["fvd"]
    assert "fvd: unavailable (i3d-rgb-imagenet" in format_table(report)


def test_fid_and_fvd_over_the_sets(tmp_path, monkeypatch):
    # FID at 8 feature dimensions instead of 2048: the same code, without a 15 s square root.
    monkeypatch.setattr(fid_module, "FEATURE_DIM", 8)
    torch.manual_seed(1)
    target = _smooth_frames(33, size=16)
    folders = (_write_folder(tmp_path / "p", _noisy(target)), _write_folder(tmp_path / "t", target))
    networks = {"fid": TinyImageNet(), "fvd": TinyVideoNet()}
    report = evaluate_pairs(*folders, metrics=["fid", "fvd"], networks=networks, progress=False)
    assert report["metrics"]["fid"] > 0 and report["metrics"]["fvd"] > 0
    same = evaluate_pairs(
        folders[1], folders[1], metrics=["fid", "fvd"], networks=networks, progress=False
    )
    assert same["metrics"]["fid"] == pytest.approx(0, abs=1e-9)
    assert same["metrics"]["fvd"] == pytest.approx(0, abs=1e-9)
    short = evaluate_pairs(
        *folders, metrics=["fvd"], networks=networks, max_frames=31, progress=False
    )
    assert (
        "at least 2 clips of 16 frames per stream, got 1 generated and 1 real"
        in short["unavailable"]["fvd"]
    )


# --------------------------------------------------------------------- tracked metrics
@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Rendered faces: the target turns nothing and opens its mouth a little; one prediction
    is the same, one is turned 10° in yaw, one opens its mouth wide."""
    from neuralhead.data.synthetic import Trajectory, default_portrait

    portrait = default_portrait(128)
    root = tmp_path_factory.mktemp("faces")

    def render(name: str, yaw_deg: float, jaw: list[float]) -> Path:
        trajectory = Trajectory.neutral(len(jaw))
        trajectory.pose[:, 1] = np.deg2rad(yaw_deg)
        trajectory.jaw_open[:] = jaw
        return _write_folder(root / name, list(portrait.frames(trajectory)))

    return {
        "target": render("target", 0.0, [0.0, 0.1, 0.2, 0.3]),
        "turned": render("turned", 10.0, [0.0, 0.1, 0.2, 0.3]),
        "open": render("open", 0.0, [0.8, 0.9, 1.0, 1.0]),
    }


def test_tracked_metrics_on_rendered_faces(faces):
    tracked = list(TRACKED_METRICS)
    same = evaluate_pairs(faces["target"], faces["target"], metrics=tracked, progress=False)
    assert same["tracking"]["frames_compared"] == 4 and same["unavailable"] == {}
    assert "fitted to the target's frames, 3 components" in same["tracking"]["expression_basis"]
    for name in tracked:
        if name != "are_deg":
            assert same["metrics"][name] == pytest.approx(0, abs=1e-4), name

    # A 10° turn, as the tracker sees it (a few degrees of its own error, which ARD, summing
    # three Euler angles, collects more of than the geodesic angle).
    turned = evaluate_pairs(faces["turned"], faces["target"], metrics=tracked, progress=False)
    assert 7 < turned["metrics"]["rotation_angle_deg"] < 13
    assert 7 < turned["metrics"]["ard_deg"] < 15
    assert turned["metrics"]["are_deg"] > same["metrics"]["are_deg"] + 5

    # An open mouth moves the mouth metrics far more than the turn's tracking noise does.
    opened = evaluate_pairs(faces["open"], faces["target"], metrics=tracked, progress=False)
    for name in ("mouth_shape_error", "mouth_landmark_distance", "expression_distance"):
        assert opened["metrics"][name] > 2.5 * turned["metrics"][name], name
    assert opened["metrics"]["rotation_angle_deg"] < 3


def test_expression_basis_from_a_file_and_frames_without_faces(faces, tmp_path):
    from neuralhead.tracking.expression import ExpressionBasis
    from neuralhead.tracking.template import load_template

    rng = np.random.default_rng(0)
    shapes = load_template().vertices[None] + 0.01 * rng.standard_normal((10, 478, 3))
    ExpressionBasis.fit(shapes.astype(np.float32), 4).save(tmp_path / "basis.npz")
    report = evaluate_pairs(
        faces["open"],
        faces["target"],
        metrics=["expression_distance"],
        expression_basis=tmp_path / "basis.npz",
        progress=False,
    )
    assert report["tracking"]["expression_basis"] == str(tmp_path / "basis.npz")
    assert report["metrics"]["expression_distance"] > 0

    blank = _write_folder(tmp_path / "blank", _smooth_frames(4, size=128))
    report = evaluate_pairs(
        blank,
        faces["target"],
        metrics=["ard_deg", "psnr", "csim"],
        networks={"csim": TinyIdentityNet()},
        progress=False,
    )
    assert (
        report["tracking"]["face_found_pred"] == 0 and report["tracking"]["face_found_target"] == 1
    )
    assert "no frame where the tracker found a face" in report["unavailable"]["ard_deg"]
    assert "psnr" in report["metrics"]
    assert report["csim_frames"] == 0 and "csim" not in report["metrics"]
    assert "no frame pair where the tracker found a face" in report["unavailable"]["csim"]


def test_csim_on_faces_aligned_with_their_own_landmarks(faces, tmp_path):
    from neuralhead.tracking.mediapipe_backend import FaceMeshTracker

    torch.manual_seed(2)
    identity = TinyIdentityNet()
    target = [cv2.imread(str(f))[:, :, ::-1].copy() for f in sorted(faces["target"].iterdir())]
    turned = [cv2.imread(str(f))[:, :, ::-1].copy() for f in sorted(faces["turned"].iterdir())]
    turned[1] = _smooth_frames(1, size=128)[0]  # a frame without a face is left out
    pred = _write_folder(tmp_path / "pred", turned)

    networks = {"csim": identity}
    report = evaluate_pairs(
        pred, faces["target"], metrics=["csim"], networks=networks, batch_size=3, progress=False
    )
    assert report["csim_frames"] == 3 and report["csim_aligned"] is True
    assert "tracking" not in report  # only CSIM asked for: nothing else tracked or kept

    # The same by hand: each sequence tracked on its own, each image aligned with its points.
    kept = [0, 2, 3]
    points = []
    for frames in (turned, target):
        with FaceMeshTracker() as tracker:
            meshes = [tracker.process(frame) for frame in frames]
        points.append(five_points_from_mesh(torch.from_numpy(np.stack([meshes[i] for i in kept]))))
    with torch.no_grad():
        expected = csim(
            _tensor([turned[i] for i in kept]),
            _tensor([target[i] for i in kept]),
            identity,
            pred_points=points[0],
            target_points=points[1],
        )
    assert report["metrics"]["csim"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert "csim: faces aligned to ArcFace's five-point template, over 3 frame pairs" in (
        format_table(report)
    )
    same = evaluate_pairs(
        faces["target"], faces["target"], metrics=["csim"], networks=networks, progress=False
    )
    assert same["csim_frames"] == 4 and same["metrics"]["csim"] == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------------- CLI
def test_cli_writes_json_and_prints_a_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "empty"))
    target = _smooth_frames(3)
    pred = _write_folder(tmp_path / "pred", _noisy(target))
    folder = _write_folder(tmp_path / "target", target)
    out = tmp_path / "m.json"
    code = main(
        ["evaluate", "--pred", str(pred), "--target", str(folder), "--metrics", "psnr", "ssim",
         "lpips", "csim", "--out", str(out)]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    saved = json.loads(out.read_text())
    assert set(saved["metrics"]) == {"psnr", "ssim"} and set(saved["unavailable"]) == {
        "lpips",
        "csim",
    }
    assert "3 frame pairs at 32x32" in captured.out and "lpips: unavailable (" in captured.out
    assert f"metrics: {out}" in captured.out
    assert "evaluating" in captured.err  # the progress bar

    # Default metrics without tracking; the JSON goes beside the prediction.
    assert main(["evaluate", "--pred", str(pred), "--target", str(folder), "--no-tracking"]) == 0
    saved = json.loads((tmp_path / "pred_metrics.json").read_text())
    reported = set(saved["metrics"]) | set(saved["unavailable"])
    assert reported == set(PAIRED_METRICS) - set(TRACKED_METRICS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give either --checkpoint (score a portrait) or --pred and --target"),
        (["--pred", "a"], "--pred and --target go together"),
        (["--pred", "a", "--target", "b", "--checkpoint", "c"], "give either"),
        (
            ["--pred", "a", "--target", "b", "--split", "train"],
            "--split only apply to --checkpoint",
        ),
        (["--checkpoint", "c", "--metrics", "psnr"], "--metrics only apply to --pred/--target"),
    ],
)
def test_cli_mode_errors(args, message, capsys):
    assert main(["evaluate", *args]) == 2
    assert f"error: {message}" in capsys.readouterr().err
