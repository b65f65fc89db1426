"""EMOPortraits' audio-to-rotation GAN (supplementary Sec. 3): model, losses, generation, training."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import make_dataset
from torch import nn

from neuralhead.data.format import DatasetFiles
from neuralhead.emoportraits import rotation_training
from neuralhead.emoportraits.checkpoints import ROTATION_SUBDIR
from neuralhead.emoportraits.rotation_generator import (
    GlobalContentDiscriminator,
    LocalTemporalDiscriminator,
    RotationGenerator,
    angular_acceleration,
    angular_speed,
    apply_relative,
    build_discriminators,
    critic_loss,
    generate_head_motion,
    generator_loss,
    relative_sequence,
    remove_drift,
    rotation_preset,
    smooth_head_motion,
)
from neuralhead.emoportraits.rotation_training import (
    RotationTrainOptions,
    train_rotation_generator,
)
from neuralhead.errors import InputError
from neuralhead.geometry.rotation import euler_to_matrix, rotation_6d_to_matrix, rotation_angle
from neuralhead.training.engine import EngineOptions

AUDIO_DIM = 8


def tiny_config(**overrides):
    return rotation_preset("rotation-tiny", audio_dim=AUDIO_DIM, **overrides)


def random_poses(frames: int, generator: torch.Generator) -> torch.Tensor:
    """Poses with yaw inside ±80° (where Euler angles are unique), pitch/roll inside ±90°."""
    angles = (torch.rand(frames, 3, generator=generator) - 0.5) * torch.tensor([3.0, 2.8, 3.0])
    return torch.cat([angles, torch.randn(frames, 3, generator=generator)], dim=1)


def yaw_poses(yaw: torch.Tensor) -> torch.Tensor:
    pose = torch.zeros(len(yaw), 6, dtype=yaw.dtype)
    pose[:, 1] = yaw
    return pose


# ------------------------------------------------------------------------------ generator
def test_generator_shapes_and_untrained_output_near_identity() -> None:
    torch.manual_seed(0)
    generator = RotationGenerator(tiny_config())
    out = generator(torch.randn(3, 20, AUDIO_DIM))
    assert out.shape == (3, 20, 9)
    rotation = rotation_6d_to_matrix(out[..., :6])
    eye = torch.eye(3).expand_as(rotation)
    torch.testing.assert_close(rotation.transpose(-1, -2) @ rotation, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(3, 20), atol=1e-5, rtol=0)
    # The output already is the 6D of a proper rotation, relative to frame 0.
    torch.testing.assert_close(out[..., :3], rotation[..., 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 0], torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 0]).expand(3, 9))
    assert torch.rad2deg(rotation_angle(eye, rotation)).max() < 3.0
    assert out[..., 6:].abs().max() < 0.05
    # Any length works, and the audio matters.
    assert generator(torch.randn(1, 5, AUDIO_DIM)).shape == (1, 5, 9)
    generator.eval()
    audio = torch.randn(1, 20, AUDIO_DIM)
    assert not torch.allclose(generator(audio), generator(audio.flip(1)))


def test_generator_rejects_bad_input_and_config() -> None:
    generator = RotationGenerator(tiny_config())
    with pytest.raises(InputError, match=r"\(B, T, 8\)"):
        generator(torch.randn(2, 10, 7))
    with pytest.raises(InputError, match="window_overlap"):
        RotationGenerator(tiny_config(window_overlap=16))
    with pytest.raises(InputError, match="unknown rotation-generator preset"):
        rotation_preset("rotation-huge")
    with pytest.raises(InputError, match="bad rotation-generator override"):
        rotation_preset("rotation", no_such_field=1)


def test_generator_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    generator = RotationGenerator(tiny_config(embedder="substitute:8")).eval()
    generator.save_pretrained(tmp_path / "rotation")
    loaded = RotationGenerator.from_pretrained(tmp_path / "rotation").eval()
    assert loaded.config == generator.config
    audio = torch.randn(2, 12, AUDIO_DIM)
    torch.testing.assert_close(loaded(audio), generator(audio))


# ------------------------------------------------------------------------- pose sequences
def test_relative_sequence_round_trip_on_random_poses() -> None:
    g = torch.Generator().manual_seed(1)
    pose = random_poses(40, g)
    relative = relative_sequence(pose)
    assert relative.shape == (40, 9)
    torch.testing.assert_close(relative[0], torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 0]))
    torch.testing.assert_close(apply_relative(pose[0], relative), pose, atol=2e-5, rtol=0)
    # The motion is the head's own (R_0^T R_t): the same relative sequence from another start.
    other = apply_relative(random_poses(1, g)[0], relative)
    torch.testing.assert_close(relative_sequence(other), relative, atol=2e-5, rtol=0)
    # Batched.
    batch = torch.stack([pose, random_poses(40, g)])
    torch.testing.assert_close(
        apply_relative(batch[:, 0], relative_sequence(batch)), batch, atol=2e-5, rtol=0
    )


def test_relative_sequence_convention_by_hand() -> None:
    """A pure yaw of 0.3 then 0.5 rad: relative rotation is a yaw of 0.2; translation differs."""
    pose = torch.tensor([[0.0, 0.3, 0.0, 0.1, 0.2, -1.0], [0.0, 0.5, 0.0, 0.4, 0.2, -0.5]])
    relative = relative_sequence(pose)
    expected = euler_to_matrix(torch.tensor([0.0, 0.2, 0.0]))
    torch.testing.assert_close(rotation_6d_to_matrix(relative[1, :6]), expected)
    torch.testing.assert_close(relative[1, 6:], torch.tensor([0.3, 0.0, 0.5]))
    with pytest.raises(InputError, match=r"\(T, 6\)"):
        relative_sequence(torch.zeros(5, 3))
    with pytest.raises(InputError, match=r"\(T, 9\)"):
        apply_relative(torch.zeros(6), torch.zeros(5, 6))


def test_angular_speed_and_acceleration_by_hand() -> None:
    fps, rate = 25.0, 0.01  # rad per frame
    frames = torch.arange(50, dtype=torch.float64)
    constant = yaw_poses(0.1 + rate * frames)
    assert angular_speed(constant, fps) == pytest.approx(math.degrees(rate) * fps, rel=1e-6)
    assert angular_acceleration(constant, fps) == pytest.approx(0.0, abs=1e-4)
    # yaw = a t² / 2 (t in frames): the per-frame motion grows by a each frame.
    a = 0.002
    accelerating = yaw_poses(a * frames**2 / 2)
    assert angular_acceleration(accelerating, fps) == pytest.approx(
        math.degrees(a) * fps**2, rel=1e-5
    )
    # The per-frame steps a (t + 1/2), t = 0..48, average to a * 49 / 2.
    assert angular_speed(accelerating, fps) == pytest.approx(
        math.degrees(a * 49 / 2) * fps, rel=1e-5
    )
    with pytest.raises(InputError, match="at least 3 frames"):
        angular_acceleration(constant[:2], fps)


def test_smoothing_keeps_linear_motion_and_calms_jitter() -> None:
    frames = torch.arange(60, dtype=torch.float32)
    linear = yaw_poses(0.01 * frames)
    smoothed = smooth_head_motion(linear, 2.0)
    torch.testing.assert_close(smoothed[8:-8], linear[8:-8], atol=1e-5, rtol=0)
    jitter = linear.clone()
    jitter[::2, 0] += 0.05
    calmed = smooth_head_motion(jitter, 2.0)
    assert angular_acceleration(calmed, 25) < 0.1 * angular_acceleration(jitter, 25)
    batch = smooth_head_motion(torch.stack([jitter, linear]), 2.0)
    torch.testing.assert_close(batch, torch.stack([calmed, smoothed]))
    assert smooth_head_motion(jitter, 0.0) is jitter
    with pytest.raises(InputError, match=">= 0"):
        smooth_head_motion(jitter, -1.0)


class ConstantYawGenerator(nn.Module):
    """Stands in for a generator whose every window turns the head at a fixed rate."""

    def __init__(self, config, rate: float) -> None:
        super().__init__()
        self.config, self.rate = config, rate
        self.calls: list[int] = []

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        frames = audio.shape[1]
        self.calls.append(frames)
        yaw = self.rate * torch.arange(frames, dtype=torch.float32)
        return relative_sequence(yaw_poses(yaw))[None]


def test_generate_head_motion_chains_windows_exactly() -> None:
    config = tiny_config()  # windows of 16 frames overlapping by 4
    stub = ConstantYawGenerator(config, rate=0.02)
    reference = torch.tensor([0.1, -0.2, 0.05, 0.3, -0.1, -1.0])
    audio = torch.zeros(45, AUDIO_DIM)
    pose = generate_head_motion(stub, audio, reference_pose=reference, drift_seconds=0.0)
    assert stub.calls == [16, 16, 16, 16]  # starts 0, 12, 24 and 29 (aligned to the end)
    assert pose.shape == (45, 6)
    # Consistent windows chain into one uninterrupted turn about the head's own y axis.
    expected = apply_relative(reference, relative_sequence(yaw_poses(0.02 * torch.arange(45.0))))
    torch.testing.assert_close(pose, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pose[:, 3:], reference[3:].expand(45, 3))


def test_remove_drift_keeps_fast_motion_and_the_first_frame() -> None:
    t = torch.arange(400, dtype=torch.float64)
    oscillation = 0.05 * torch.sin(2 * math.pi * t / 10)
    pose = yaw_poses(0.1 + 0.003 * t + oscillation)
    pose[:, 3] = 0.001 * t
    out = remove_drift(pose, pose[0], 25.0)
    torch.testing.assert_close(out[0], pose[0])
    interior = slice(75, -75)  # beyond 3 sigma of the ends
    yaw = out[interior, 1]
    slope = torch.linalg.lstsq(torch.stack([t[interior], torch.ones_like(yaw)], 1), yaw[:, None])
    assert abs(float(slope.solution[0, 0])) < 1e-4  # the 0.003 rad/frame drift is gone
    torch.testing.assert_close(yaw - yaw.mean(), oscillation[interior], atol=2e-3, rtol=0)
    assert out[interior, 3].std() < 1e-6  # a steady slide is drift too
    assert remove_drift(pose, pose[0], 0.0) is pose


def test_generate_head_motion_with_the_network_is_continuous() -> None:
    torch.manual_seed(0)
    generator = RotationGenerator(tiny_config())
    reference = torch.tensor([0.0, 0.3, 0.0, 0.0, 0.0, -1.0])
    # A trained generator would move: make the untrained one move visibly.
    with torch.no_grad():
        generator.head[-1].weight.mul_(200.0)
    audio = torch.randn(70, AUDIO_DIM)
    pose = generate_head_motion(generator, audio, reference_pose=reference)
    assert pose.shape == (70, 6)
    assert generator.training  # mode restored
    torch.testing.assert_close(pose[0], reference)
    steps = rotation_angle(euler_to_matrix(pose[:-1, :3]), euler_to_matrix(pose[1:, :3]))
    within = generator.eval()(audio[None, :16])[0]
    inside = rotation_angle(
        rotation_6d_to_matrix(within[:-1, :6]), rotation_6d_to_matrix(within[1:, :6])
    )
    # No jump at the window boundaries (frames 12, 16, 24, 28, ...): every step is of the size
    # of the steps inside one window.
    assert steps.max() < 2.5 * inside.max()
    smoothed = generate_head_motion(generator, audio, reference_pose=reference, smoothing=2.0)
    assert angular_acceleration(smoothed, 25) < angular_acceleration(pose, 25)
    with pytest.raises(InputError, match=r"\(T, 8\)"):
        generate_head_motion(generator, torch.randn(10, 4), reference_pose=reference)
    with pytest.raises(InputError, match=r"reference_pose must be \(6,\)"):
        generate_head_motion(generator, audio, reference_pose=torch.zeros(3))


# --------------------------------------------------------------------------- discriminators
def test_discriminator_shapes_and_local_receptive_field() -> None:
    torch.manual_seed(0)
    local = LocalTemporalDiscriminator(patch_frames=8, num_layers=2, base_channels=4)
    global_ = GlobalContentDiscriminator(AUDIO_DIM, num_blocks=2, base_channels=4, hidden_dim=8)
    x = torch.randn(2, 20, 9)
    audio = torch.randn(2, 20, AUDIO_DIM)
    logits = local(x)
    assert logits.shape == (2, 1, 20 - 8 + 1)
    assert global_(x, audio).shape == (2,)
    changed = x.clone()
    changed[:, 10] += 1.0
    moved = (local(changed) - logits).abs()[0, 0] > 1e-7
    # Patch p judges frames p..p+7: frame 10 lies in patches 3..10 only.
    assert moved.nonzero().flatten().tolist() == list(range(3, 11))
    # The global critic depends on the audio, through its mean and spread over time.
    assert not torch.allclose(global_(x, audio), global_(x, audio * 2))
    with pytest.raises(InputError, match=r"audio of shape \(2, 20, 8\)"):
        global_(x, audio[:, :10])
    with pytest.raises(InputError, match=r"\(B, T, 9\)"):
        local(torch.randn(2, 20, 6))


class LinearCritic(nn.Module):
    """D(x) = <w, x> per sample: its input gradient is w everywhere."""

    def __init__(self, norm: float, frames: int = 10) -> None:
        super().__init__()
        w = torch.randn(frames, 9, generator=torch.Generator().manual_seed(3))
        self.w = nn.Parameter(w / w.norm() * norm)

    def forward(self, x: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        return (x * self.w).sum(dim=(1, 2))


def test_wgan_gp_losses_on_linear_critics() -> None:
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(4, 10, 9, generator=g), torch.randn(4, 10, 9, generator=g)
    audio = torch.randn(4, 10, AUDIO_DIM, generator=g)
    unit, double = LinearCritic(1.0), LinearCritic(2.0)
    with torch.no_grad():
        gap = float(unit(real).mean() - unit(fake).mean())
        fake_score = float(unit(fake).mean())
    total, terms = critic_loss(unit, unit, real, fake, audio)
    total, terms = total.detach(), {k: v.detach() for k, v in terms.items()}
    # A unit-norm input gradient costs no penalty; the loss is -gap per critic.
    assert float(terms["local_gp"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["local_gap"]) == pytest.approx(gap, rel=1e-5)
    assert float(total) == pytest.approx(-2 * gap, rel=1e-5)
    # Gradient norm 2: penalty 10 * (2 - 1)^2 for each critic.
    total, terms = critic_loss(double, double, real, fake, audio, gp_weight=10.0)
    total, terms = total.detach(), {k: v.detach() for k, v in terms.items()}
    assert float(terms["global_gp"]) == pytest.approx(10.0, rel=1e-5)
    assert float(total) == pytest.approx(-2 * 2 * gap + 20.0, rel=1e-5)
    # L_G (Eq. 9) = -E[D(fake)] per critic, weighted by lambda_adv.
    config = tiny_config(lambda_rot=0.0, lambda_trans=0.0, lambda_smooth=0.0, lambda_adv=0.5)
    g_total, g_terms = generator_loss(fake, real, audio, unit, unit, config)
    g_total, g_terms = g_total.detach(), {k: v.detach() for k, v in g_terms.items()}
    assert float(g_terms["adv_local"]) == pytest.approx(-fake_score, rel=1e-5)
    assert float(g_total) == pytest.approx(0.5 * 2 * float(g_terms["adv_global"]), rel=1e-5)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    config = tiny_config()
    generator = RotationGenerator(config)
    local, global_ = build_discriminators(config)
    audio = torch.randn(2, 16, AUDIO_DIM)
    real = relative_sequence(0.1 * torch.randn(2, 16, 6))
    pred = generator(audio)
    total, terms = generator_loss(pred, real, audio, local, global_, config)
    assert set(terms) == {"rot", "trans", "adv_local", "adv_global", "smooth"}
    total.backward()
    for name, p in generator.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    local.zero_grad()
    global_.zero_grad()
    d_total, _ = critic_loss(local, global_, real, pred, audio)
    d_total.backward()
    # A critic's output bias adds the same to E[D(real)] and E[D(fake)], so the Wasserstein
    # estimate ignores it and the penalty does not see it: its gradient vanishes by design.
    score_biases = {
        (local, f"network.layers.{len(local.network.layers) - 1}.bias"),
        (global_, "network.head.2.bias"),
    }
    for module in (local, global_):
        for name, p in module.named_parameters():
            if (module, name) in score_biases:
                assert p.grad.abs().max() < 1e-6, name
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, name


# -------------------------------------------------------------------------------- training
class FakeEmbedder:
    """Per-frame features from the frame index (the tests never need real speech)."""

    name = "fake-8"
    dim = AUDIO_DIM

    def embed(
        self, waveform: np.ndarray, sample_rate: int, num_frames: int, fps: float
    ) -> torch.Tensor:
        t = torch.arange(num_frames, dtype=torch.float32)[:, None] / fps
        return torch.sin(t * torch.arange(1, self.dim + 1) + float(np.abs(waveform).mean()))


def fake_dataset_embeddings(dataset_dir, embedder, *, cache: bool = True) -> torch.Tensor:
    files = DatasetFiles.open(dataset_dir)
    if not files.has_audio:
        raise InputError(f"dataset {files.root} has no audio")
    return embedder.embed(np.ones(4), 16000, files.num_frames, files.fps)


def test_training_checkpoint_resume_and_export(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(rotation_training, "dataset_audio_embeddings", fake_dataset_embeddings)
    data = make_dataset(tmp_path / "clip", num_frames=64, heldout_fraction=0.3)
    valid = np.ones(64, bool)
    valid[5:8] = False  # frames without a face are interpolated
    np.save(data / "valid.npy", valid)
    run_dir = tmp_path / "run"
    options = RotationTrainOptions(
        preset="rotation-tiny",
        audio_embedder="substitute:8",
        model_overrides={"critic_steps": 2},
    )
    engine = EngineOptions(
        max_steps=2, log_every=1, preview_every=1, eval_every=1, checkpoint_every=1,
        progress=False,
    )  # fmt: skip
    train_rotation_generator([data], run_dir, options, engine, embedder=FakeEmbedder())

    run = json.loads((run_dir / "config.json").read_text())
    assert run["model"] == "emoportraits-rotation"
    assert run["model_config"]["embedder"] == "substitute:8"
    assert run["model_config"]["audio_dim"] == AUDIO_DIM and run["model_config"]["fps"] == 25.0
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    train = [s for s in stats if s["kind"] == "train"]
    evals = [s for s in stats if s["kind"] == "eval"]
    assert [s["step"] for s in train] == [1, 2]
    assert [s["step"] for s in evals] == [0, 1, 2]  # a new run is measured before training
    for key in (
        "loss",
        "loss_rot",
        "loss_trans",
        "loss_adv_local",
        "loss_smooth",
        "loss_d",
        "local_gp",
    ):
        assert math.isfinite(train[-1][key]), key
    for key in (
        "heldout_l1_rot", "heldout_l1_trans", "speed_real", "speed_generated", "speed_ratio",
        "speed_smoothed", "speed_real_smoothed", "accel_real", "accel_generated",
        "accel_smoothed", "accel_real_smoothed",
    ):  # fmt: skip
        assert math.isfinite(evals[-1][key]), key
    assert evals[-1]["speed_real"] > 0
    assert (run_dir / "previews" / "latest.png").is_file()
    generator = RotationGenerator.from_pretrained(run_dir / ROTATION_SUBDIR)
    assert generator.config.audio_dim == AUDIO_DIM

    # A new run refuses a used directory; resuming continues from the last checkpoint.
    with pytest.raises(InputError, match="already exists"):
        train_rotation_generator([data], run_dir, options, engine, embedder=FakeEmbedder())
    # Resumed through the command line, which reloads the run's embedder spec.
    specs = []
    monkeypatch.setattr(
        rotation_training, "load_audio_embedder", lambda spec: specs.append(spec) or FakeEmbedder()
    )
    parser = argparse.ArgumentParser()
    rotation_training.add_arguments(parser)
    args = parser.parse_args(
        ["--resume", str(run_dir), "--max-steps", "3", "--log-every", "1", "--eval-every", "100",
         "--preview-every", "100", "--no-progress"]
    )  # fmt: skip
    assert rotation_training.run(args) == 0
    assert f"run directory: {run_dir}" in capsys.readouterr().out
    assert specs == ["substitute:8"]
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats if s["kind"] == "train"] == [1, 2, 3]
    resumed = RotationGenerator.from_pretrained(run_dir / ROTATION_SUBDIR)
    assert not torch.equal(resumed.head[-1].weight, generator.head[-1].weight)


def test_training_task_preview_and_data_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(rotation_training, "dataset_audio_embeddings", fake_dataset_embeddings)
    silent = make_dataset(tmp_path / "silent", num_frames=20, audio=False)
    with pytest.raises(InputError, match="no audio"):
        rotation_training.load_clip(silent, FakeEmbedder())
    clip = rotation_training.load_clip(
        make_dataset(tmp_path / "clip", num_frames=40), FakeEmbedder()
    )
    windows = rotation_training.RotationWindows([clip], "train", 16, 4)
    assert windows.items == [(0, 0), (0, 4), (0, 8), (0, 12), (0, 16), (0, 20)]  # 36 train frames
    audio, pose = windows.load(windows.items[:2])
    assert audio.shape == (2, 16, AUDIO_DIM) and pose.shape == (2, 16, 6)
    torch.testing.assert_close(pose[1], clip.pose[4:20])
    short = make_dataset(tmp_path / "short", num_frames=12)
    options = RotationTrainOptions(preset="rotation-tiny")
    with pytest.raises(InputError, match="no training window"):
        train_rotation_generator(
            [short], tmp_path / "run", options, EngineOptions(max_steps=1, progress=False),
            embedder=FakeEmbedder(),
        )  # fmt: skip


def test_command_line_arguments() -> None:
    parser = argparse.ArgumentParser()
    rotation_training.add_arguments(parser)
    args = parser.parse_args(
        ["a", "b", "--audio-embedder", "substitute:8", "--preset", "rotation-tiny",
         "--set", "lambda_adv=0.2", "--max-steps", "5"]
    )  # fmt: skip
    assert args.data_dirs == [Path("a"), Path("b")]
    assert args.audio_embedder == "substitute:8" and args.preset == "rotation-tiny"
    assert args.overrides == [("lambda_adv", 0.2)] and args.max_steps == 5
    with pytest.raises(InputError, match="DATA_DIR"):
        rotation_training.run(parser.parse_args([]))
