"""HeadGAN training: self-reenactment pairs, G / D steps, runs, resumption and the export.

Everything runs on the fake prepared dataset of tests/fake_data.py (32x32 frames, a synthetic
face mesh in its landmarks, audio) with a HeadGAN far smaller than headgan-tiny.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import make_dataset
from safetensors.torch import load_file

from neuralhead import cli
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.headgan.config import preset
from neuralhead.headgan.dataset import MOUTH_LANDMARKS, AudioStatistics, HeadGANPairs
from neuralhead.headgan.face_model import MorphableModel, build_face_model
from neuralhead.headgan.fitting import fit_frames, project
from neuralhead.headgan.generator import HeadGANGenerator
from neuralhead.headgan.renderer import render_ncc
from neuralhead.headgan.trainer import HeadGANTask, HeadGANTrainOptions, flow_image, load_vgg
from neuralhead.training import checkpoint as ckpt
from neuralhead.training.engine import Engine, EngineOptions

SIZE = 64
SMALL = dict(
    image_size=SIZE,
    base_channels=4,
    spade_hidden_channels=8,
    discriminator_channels=8,
    discriminator_max_channels=16,
)
SMALL_ARGS = [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    """Two fake videos (two "people"), so that the face model has an identity basis."""
    root = tmp_path_factory.mktemp("headgan")
    return [make_dataset(root / "a", seed=0), make_dataset(root / "b", seed=1)]


@pytest.fixture(scope="module")
def pairs(videos) -> HeadGANPairs:
    return HeadGANPairs(videos, build_face_model(videos), preset("headgan-tiny", **SMALL))


@pytest.fixture
def no_weights(tmp_path, monkeypatch) -> None:
    """An empty weight cache: the VGG19 file is absent, as on a fresh machine."""
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "weights"))


def test_samples_have_the_contract_shapes_and_ranges(pairs, videos) -> None:
    torch.manual_seed(0)
    sample = pairs[7]
    for key in ("reference_image", "reference_render", "target"):
        assert sample[key].shape == (3, SIZE, SIZE), key
    assert sample["driving"].shape == (9, SIZE, SIZE)
    assert sample["audio"].shape == (300,) and sample["audio"].dtype == torch.float32
    for key in ("reference_image", "reference_render", "target", "driving"):
        assert 0.0 <= float(sample[key].min()) and float(sample[key].max()) <= 1.0, key
    # Self-reenactment: the reference is another frame of the target's own video.
    video, frame = pairs.locate(7)
    assert (int(sample["video"]), int(sample["frame"])) == (video, frame)
    assert int(sample["reference_frame"]) != frame
    assert int(sample["reference_frame"]) in pairs.valid_frames(video)
    # Frames are upsampled from 32 to 64 px and the mouth centre with them.
    landmarks = np.load(videos[video] / "landmarks.npy")
    expected = landmarks[frame, list(MOUTH_LANDMARKS), :2].mean(0) * SIZE / 32
    assert np.allclose(sample["mouth_center"].numpy(), expected, atol=1e-4)
    # Both videos' training frames are samples; the held-out end never is.
    num_train = json.loads((videos[0] / "meta.json").read_text())["split"]["num_train"]
    assert len(pairs) == 2 * num_train
    assert max(pairs.locate(i)[1] for i in range(len(pairs))) == num_train - 1


def test_driving_stack_ends_with_the_current_frames_render(pairs, videos) -> None:
    batch = pairs.pairs([(1, 10, 3), (0, 0, 5)])
    renders = pairs.render([1, 1, 1, 0], [8, 9, 10, 0])
    assert float((renders.sum(1) > 0).float().mean()) > 0.05  # the face is drawn
    assert torch.equal(batch["driving"][0], renders[:3].reshape(9, SIZE, SIZE))
    assert torch.equal(batch["driving"][0, -3:], renders[2])
    # At the clip's start t-1 and t-2 repeat frame 0.
    assert torch.equal(batch["driving"][1], renders[3].repeat(3, 1, 1))
    # Rendered alone rather than in a batch: equal up to float rounding.
    assert torch.allclose(batch["reference_render"][0], pairs.render([1], [3])[0], atol=1e-6)
    # The render is Eq. 1 with one identity fitted to the whole clip and frame t's expression.
    model = pairs.face_model
    fit = fit_frames(model, np.load(videos[1] / "landmarks.npy"), 32, share_identity=True)
    vertices = project(model.shape(fit.identity[:1], fit.expression[10:11]), fit.camera[10], SIZE)
    direct = render_ncc(vertices, model.triangles, model.vertex_colors, SIZE)
    assert torch.allclose(batch["driving"][0, -3:], direct[0], atol=1e-5)


def test_audio_is_standardised_per_video_over_its_training_frames(pairs) -> None:
    audio = pairs.batch(list(range(len(pairs))))["audio"]
    first = audio[: len(pairs) // 2]  # video 0's training frames
    varying = first.std(0) > 1e-3
    assert int(varying.sum()) > 100
    assert torch.allclose(first.mean(0), torch.zeros(300), atol=1e-4)
    assert torch.allclose(first[:, varying].std(0, unbiased=False), torch.ones(1), atol=1e-3)


def test_audio_statistics_pool_and_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 2, (30, 5)), rng.normal(-1, 1, (10, 5))
    pooled = AudioStatistics.pooled(
        [AudioStatistics.from_features(a), AudioStatistics.from_features(b)]
    )
    both = np.concatenate([a, b])
    assert np.allclose(pooled.mean, both.mean(0)) and np.allclose(pooled.std, both.std(0))
    pooled.save(tmp_path / "stats.npz")
    loaded = AudioStatistics.load(tmp_path / "stats.npz")
    assert np.allclose(loaded.standardize(both), pooled.standardize(both))
    assert loaded.count == 40
    with pytest.raises(InputError, match="300 values per frame, the statistics 5"):
        loaded.standardize(np.zeros((2, 300)))


def test_silent_videos_need_the_noaudio_preset(tmp_path) -> None:
    silent = make_dataset(tmp_path / "silent", audio=False)
    model = build_face_model([silent])
    with pytest.raises(InputError, match="has none: train with a -noaudio preset"):
        HeadGANPairs([silent], model, preset("headgan-tiny", **SMALL))
    sample = HeadGANPairs([silent], model, preset("headgan-tiny-noaudio", **SMALL))[0]
    assert torch.equal(sample["audio"], torch.zeros(300))


def test_vgg_is_left_out_only_when_no_file_was_named(tmp_path, no_weights, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert load_vgg(None) is None
    assert "WITHOUT the VGG terms" in caplog.text
    with pytest.raises(WeightsMissingError):
        load_vgg(str(tmp_path / "nowhere"))


def test_flow_image_colours_direction_and_length() -> None:
    flow = torch.zeros(2, 4, 4)
    flow[0, :, 2:] = 3.0  # right half moves right
    image = flow_image(flow)
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8
    assert image[:, :2].max() == 0  # no motion is black
    assert image[:, 2:].max() == 255


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.named_parameters() if not torch.equal(before[k], v)]


def test_generator_and_discriminator_steps_update_only_their_own_weights(
    tmp_path, videos, no_weights
) -> None:
    torch.manual_seed(0)
    engine = Engine.create(tmp_path / "run", EngineOptions(device="cpu", progress=False))
    config = preset("headgan-tiny", **SMALL)
    options = HeadGANTrainOptions(preset="headgan-tiny", batch_size=2, d_every=2)
    task = HeadGANTask(engine, videos, options, config, build_face_model(videos))
    assert task.vgg is None
    g, d = task.raw_generator, task.raw_discriminators
    g0, d0 = _snapshot(g), _snapshot(d)
    stats = task.train_step(0)  # a G step and a D step
    assert {"loss", "loss_l1", "loss_warp_l1", "loss_gan", "loss_d", "loss_d_mouth"} <= set(stats)
    assert "loss_vgg" not in stats
    assert len(_changed(g0, g)) > 0.9 * len(g0)
    assert len(_changed(d0, d)) > 0.9 * len(d0)
    g1, d1 = _snapshot(g), _snapshot(d)
    stats = task.train_step(1)  # d_every=2: a G step only
    assert "loss_d" not in stats
    assert _changed(d1, d) == []
    assert len(_changed(g1, g)) > 0.9 * len(g1)
    assert all(p.requires_grad for p in d.parameters())

    metrics = task.evaluate(2)
    assert set(metrics) == {
        f"{name}_{metric}"
        for name in ("heldout", "warped", "baseline")
        for metric in ("l1", "psnr")
    }
    assert 0 < metrics["baseline_l1"] < 255
    sheet = task.preview(2)
    assert sheet.ndim == 3 and sheet.shape[1] > 6 * SIZE


def _train(*args: object) -> None:
    command = ["train", "headgan", *map(str, args), "--preset", "headgan-tiny", *SMALL_ARGS]
    command += ["--batch-size", "2", "--device", "cpu", "--no-progress", "--seed", "3"]
    command += ["--checkpoint-every", "2", "--log-every", "2", "--eval-every", "4"]
    command += ["--preview-every", "4", "--eval-frames", "2"]
    assert cli.main(command) == 0


def _latest(run: Path) -> tuple[int, dict[str, torch.Tensor]]:
    path = ckpt.latest_checkpoint(run / "checkpoints")
    assert path is not None
    step = json.loads((path / "state.json").read_text())["step"]
    return step, load_file(path / "modules.safetensors")


def test_a_run_checkpoints_resumes_exactly_and_exports_for_inference(
    tmp_path, videos, no_weights
) -> None:
    torch.manual_seed(0)
    run = tmp_path / "run"
    _train(*videos, "--run-dir", run, "--max-steps", 4)
    step, at_4 = _latest(run)
    assert step == 4
    assert (run / "face_model.npz").is_file() and (run / "previews" / "latest.png").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "headgan" and config["vgg_loss"] is False
    evals = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "eval" and e["heldout_l1"] > 0 for e in evals)

    # What inference loads from the run directory.
    export = run / "headgan"
    generator = HeadGANGenerator.from_pretrained(export)
    assert generator.config.image_size == SIZE and generator.config.base_channels == 4
    for name, value in generator.state_dict().items():
        assert torch.equal(value, at_4[f"generator.{name}"]), name
    face_model = MorphableModel.load(export / "face_model.npz")
    assert face_model.num_identity == 1 and face_model.num_vertices == 468
    stats = AudioStatistics.load(export / "audio_stats.npz")
    assert stats.mean.shape == (300,) and stats.count > 0

    # Resuming continues from step 4 and lands where an uninterrupted run does.
    resume = ["train", "headgan", "--resume", str(run), "--max-steps", "6", "--no-progress"]
    assert cli.main(resume) == 0
    step, resumed = _latest(run)
    assert step == 6
    assert "resumed from step_00000004" in (run / "log.txt").read_text()
    straight = tmp_path / "straight"
    _train(*videos, "--run-dir", straight, "--max-steps", 6)
    _, uninterrupted = _latest(straight)
    assert resumed.keys() == uninterrupted.keys()
    assert [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])] == []


def test_bad_runs_are_refused_with_a_clear_message(tmp_path, videos, capsys) -> None:
    assert cli.main(["train", "headgan", "--preset", "headgan-tiny"]) == 2
    assert "give prepared DATA_DIRs" in capsys.readouterr().err
    args = ["train", "headgan", str(videos[0]), "--run-dir", str(tmp_path / "r")]
    assert cli.main([*args, "--preset", "headgan-512"]) == 2
    assert "unknown HeadGAN preset" in capsys.readouterr().err
    assert cli.main(["train", "headgan", "--resume", str(tmp_path / "none")]) == 2
    assert "cannot resume" in capsys.readouterr().err
