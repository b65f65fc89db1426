"""EMOPortraits main-model training: samples, mixed batches, L_main's inputs, steps, runs.

Everything runs on fake prepared videos of tests/fake_data.py (two main videos and one of the
second set, 32x32 frames brought to 64x64, with masks and face-mesh landmarks) with
emoportraits-tiny and a random head-pose network saved to a file, as a pre-trained one would be.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch
from fake_data import make_dataset
from safetensors.torch import load_file
from torch import nn

from neuralhead.emoportraits import trainer as emo_trainer
from neuralhead.emoportraits.checkpoints import load_main_model
from neuralhead.emoportraits.config import preset
from neuralhead.emoportraits.dataset import EMOPortraitsPairs, MixedStepSampler
from neuralhead.emoportraits.losses import canonical_volume_loss
from neuralhead.emoportraits.trainer import (
    EMOPortraitsTask,
    EMOPortraitsTrainOptions,
    add_arguments,
    mismatch_parameters,
    resolve_region_masks,
    run,
)
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.megaportraits import trainer as mp_trainer
from neuralhead.megaportraits.losses import foreground
from neuralhead.megaportraits.motion_encoder import HeadPoseNetwork
from neuralhead.pretrained.gaze import GazeBlinkConfig, GazeBlinkNet
from neuralhead.training import checkpoint as ckpt
from neuralhead.training.engine import Engine, EngineOptions

SIZE = 64
L_MAIN_TERMS = {
    "vgg19", "vggface", "gaze", "adversarial", "feature_matching", "contrastive", "mismatch",
    "canonical", "eyes", "mouth", "ears",
}  # fmt: skip


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    """Two main videos and one of the second set."""
    root = tmp_path_factory.mktemp("emoportraits")
    return [
        make_dataset(root / name, num_frames=20, seed=k, audio=False)
        for k, name in enumerate("abc")
    ]


@pytest.fixture(scope="module")
def pose_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pose") / "pose.safetensors"
    HeadPoseNetwork(preset("emoportraits-tiny")).save(path)
    return path


@pytest.fixture
def no_weights(tmp_path, monkeypatch) -> None:
    """An empty weight cache: no perceptual networks and no face parser."""
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "weights"))


class _Features(nn.Module):
    """A small stand-in feature network (two feature maps) for the perceptual terms."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.relu(self.a(x))
        return [h, torch.relu(self.b(h))]


class _StripedParser(nn.Module):
    """A stand-in for the face parser: fixed bands as eye, mouth and ear masks."""

    def masks(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = images.shape
        masks = {name: torch.zeros(b, 1, h, w) for name in ("eyes", "mouth", "ears")}
        masks["eyes"][..., h // 3 : h // 3 + 4, :] = 1
        masks["mouth"][..., 2 * h // 3 : 2 * h // 3 + 4, :] = 1
        masks["ears"][..., :4] = 1
        return masks


@pytest.fixture(scope="module")
def task(tmp_path_factory, videos, pose_file) -> EMOPortraitsTask:
    """A task with every term of L_main: small stand-in perceptual networks and parser."""
    tiny_gaze = GazeBlinkConfig(width=1 / 16, eye_dim=8, keypoint_dim=4, head_hidden=4)
    networks = {
        "vgg19": lambda path: _Features(),
        "vggface": lambda path: _Features(),
        "gaze": lambda path: GazeBlinkNet(tiny_gaze),
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mp_trainer, "LOSS_NETWORKS", networks)
        patch.setattr(emo_trainer.FaceParser, "from_pretrained", lambda path: _StripedParser())
        run_dir = tmp_path_factory.mktemp("task") / "run"
        engine = Engine.create(run_dir, EngineOptions(device="cpu", progress=False, max_steps=10))
        options = EMOPortraitsTrainOptions(
            preset="emoportraits-tiny",
            pose_network=str(pose_file),
            secondary_data=[str(videos[2])],
            batch_size=2,
            eval_samples=2,
            region_masks="parser",
        )
        return EMOPortraitsTask(engine, videos[:2], options, EMOPortraitsTask.build_config(options))


# ---------------------------------------------------------------------------- samples
def test_samples_add_a_moved_source_and_second_set_pairs(videos) -> None:
    pairs = EMOPortraitsPairs(videos[:2], SIZE, secondary_dirs=[videos[2]])
    num_train = json.loads((videos[0] / "meta.json").read_text())["split"]["num_train"]
    assert len(pairs) == 2 * num_train and pairs.num_secondary_frames == num_train
    assert (pairs.num_main_videos, pairs.num_secondary_videos) == (2, 1)
    batch = pairs.batch([3, num_train + 5], torch.Generator().manual_seed(0), secondary=[4])
    for role in ("driver", "source", "other_source", "other_driver", "moved_source"):
        assert batch[role].shape == (3, 3, SIZE, SIZE), role
        assert batch[f"{role}_mask"].shape == (3, 1, SIZE, SIZE), role
        assert batch[f"{role}_landmarks"].shape == (3, 478, 2), role
    assert batch["secondary"].tolist() == [False, False, True]
    assert batch["video"].tolist() == [0, 1, 2]
    assert int(batch["driver_frame"][2]) == pairs.locate_secondary(4)[1]
    assert (batch["source_frame"] != batch["driver_frame"]).all()
    again = pairs.batch([3, num_train + 5], torch.Generator().manual_seed(0), secondary=[4])
    assert all(torch.equal(batch[k], again[k]) for k in batch)

    # x_s^m and x_s* always come from a main video other than the driver's.
    generator = torch.Generator().manual_seed(1)
    samples = pairs.draw(range(0, len(pairs), 3), generator, secondary=range(num_train))
    for sample in samples:
        video = sample["driver"][0]
        for role in ("other_source", "other_driver", "moved_source"):
            assert sample[role][0] != video and sample[role][0] < 2, (role, sample)
    assert {s["moved_source"][0] for s in samples if s["driver"][0] == 2} == {0, 1}
    two = EMOPortraitsPairs(videos[:2], SIZE, secondary_dirs=[videos[2], videos[0]])
    assert two.locate_secondary(num_train - 1) == (2, num_train - 1)
    assert two.locate_secondary(num_train) == (3, 0)
    with pytest.raises(IndexError, match="secondary index"):
        two.locate_secondary(2 * num_train)

    alone = EMOPortraitsPairs(videos[:1], SIZE, cross_pairs=False).batch([0])
    assert "moved_source" not in alone and alone["secondary"].tolist() == [False]


def test_every_second_step_ends_with_a_second_set_sample() -> None:
    sampler = MixedStepSampler(num_main=10, num_secondary=4, batch_size=2, seed=0)
    main, secondary = sampler.batch(0)
    assert len(main) == 2 and secondary == []
    steps = [sampler.batch(step) for step in (1, 3, 5, 7)]
    assert all(len(main) == 1 and len(second) == 1 for main, second in steps)
    assert sorted(second[0] for _, second in steps) == [0, 1, 2, 3]  # one epoch of the set
    assert sampler.batch(1)[0] == sampler.main.batch(1)[:1]
    single = MixedStepSampler(num_main=10, num_secondary=4, batch_size=1, seed=0)
    assert [len(single.batch(s)[1]) for s in range(4)] == [0, 1, 0, 1]
    assert single.batch(1)[0] == []
    plain = MixedStepSampler(num_main=10, num_secondary=0, batch_size=1, seed=0)
    assert not any(plain.is_mixed(s) for s in range(4))
    ranks = [MixedStepSampler(10, 4, 2, seed=0, rank=r, world_size=2).batch(1) for r in (0, 1)]
    assert ranks[0][1] != ranks[1][1]


# ---------------------------------------------------------------------------- L_main's inputs
def test_mismatch_weights_follow_the_dataset_and_region_masks_resolve(
    no_weights, caplog, tmp_path
) -> None:
    config = preset("emoportraits-tiny")
    weight, margin = mismatch_parameters(torch.tensor([False, True, False]), config)
    assert weight.tolist() == [1.0, 10.0, 1.0] and margin.tolist() == [0.5, 0.25, 0.5]

    def resolve(**kwargs: object) -> tuple[str, object]:
        return resolve_region_masks(EMOPortraitsTrainOptions(**kwargs))

    with caplog.at_level(logging.WARNING):
        assert resolve() == ("landmarks", None)
    assert caplog.text.count("leaves the ears out") == 1
    assert resolve(region_masks="off") == ("off", None)
    with pytest.raises(WeightsMissingError, match="face-parser"):
        resolve(region_masks="parser")
    with pytest.raises(WeightsMissingError):
        resolve(parser_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(InputError, match="region_masks must be one of"):
        resolve(region_masks="ears")


def test_one_generator_step_reaches_every_trainable_parameter(task) -> None:
    generator = torch.Generator().manual_seed(1)
    batch = task._augment_pairs(task._draw_batch(1, generator), generator)
    model = task.raw_model
    task.raw_step.train()
    model.zero_grad(set_to_none=True)
    out = task.raw_step(batch, generator)
    assert out["moved_image"].shape == out["image"].shape == (2, 3, SIZE, SIZE)
    assert out["canonical_driver"].shape == out["canonical_source"].shape
    target = foreground(batch["driver"], batch["driver_mask"])
    d_fake, d_real = task.raw_discriminator(out["image"]), task.raw_discriminator(target)
    total, terms = task.generator_loss(batch, out, target, d_fake, d_real)
    assert set(terms) == L_MAIN_TERMS and float(terms["canonical"]) > 0
    total.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(
        n.startswith("head_pose.") for n, _ in model.named_parameters() if n not in trainable
    )
    assert [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0] == []

    # L_CV alone trains what builds the canonical volumes, and nothing after them.
    model.zero_grad(set_to_none=True)
    out = task.raw_step(batch, generator)
    canonical_volume_loss(out["canonical_source"], out["canonical_driver"]).backward()
    reached = {
        name.split(".")[0]
        for name, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert reached == {"appearance_encoder", "expression_encoder", "source_warping", "g3d"}
    model.zero_grad(set_to_none=True)


def test_training_steps_log_every_term_and_weigh_second_set_pairs(task, monkeypatch) -> None:
    calls = []
    compute = task.loss.generator_loss

    def spy(*args: object, **kwargs: object) -> tuple[torch.Tensor, dict]:
        calls.append(kwargs)
        return compute(*args, **kwargs)

    monkeypatch.setattr(task.loss, "generator_loss", spy)
    before = {k: v.detach().clone() for k, v in task.raw_model.named_parameters()}
    first, second = task.train_step(0), task.train_step(1)
    for stats in (first, second):
        assert {f"loss_{t}" for t in L_MAIN_TERMS} | {"loss", "loss_discriminator"} <= set(stats)
        assert 0 <= stats["ranking"] <= 1
    main, mixed = calls
    assert main["mismatch_weight"].tolist() == [1.0, 1.0]
    assert mixed["mismatch_weight"].tolist() == [1.0, 10.0]
    assert mixed["mismatch_margin"].tolist() == [0.5, 0.25]
    assert mixed["z_moved_pred"].shape == mixed["z_driver"].shape == (2, 16)
    stripes = _StripedParser().masks(torch.zeros(2, 3, SIZE, SIZE))
    assert all(torch.equal(mixed["region_masks"][k], stripes[k]) for k in stripes)
    changed = [k for k, v in task.raw_model.named_parameters() if not torch.equal(before[k], v)]
    assert all(not k.startswith("head_pose.") for k in changed) and changed

    metrics = task.evaluate(2)
    assert set(metrics) == {
        "heldout_l1", "heldout_psnr", "baseline_l1", "baseline_psnr", "heldout_ranking",
        "heldout_canonical_l1", "heldout_auc_z",
    }  # fmt: skip
    assert metrics["heldout_canonical_l1"] > 0 and 0.5 <= metrics["heldout_auc_z"] <= 1
    samples = task.heldout_samples()
    assert {s["driver"][0] for s in samples} == {0, 1, 2}  # second-set videos are evaluated too
    assert all(s["moved_source"][0] != s["driver"][0] for s in samples)
    sheet = task.preview(2)
    assert sheet.ndim == 3 and sheet.shape[1] > 9 * SIZE  # with x_s^m and x_s*m->d


# ---------------------------------------------------------------------------- runs
def _run(*argv: object) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args([str(a) for a in argv]))


def _latest(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    path = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert path is not None
    return json.loads((path / "state.json").read_text())["step"], load_file(
        path / "modules.safetensors"
    )


def test_a_run_resumes_its_step_count_and_exports_a_loadable_model(
    tmp_path, videos, pose_file, no_weights
) -> None:
    run_dir = tmp_path / "run"
    common = ["--device", "cpu", "--no-progress", "--eval-every", 100, "--preview-every", 100]
    assert _run(
        videos[0], videos[1], "--secondary-data", videos[2], "--preset", "emoportraits-tiny",
        "--pose-network", pose_file, "--run-dir", run_dir, "--max-steps", 1, "--batch-size", 1,
        "--log-every", 1, "--checkpoint-every", 1, "--eval-samples", 1, "--auc-frames", 4,
        "--set", "num_iterations=5", *common,
    ) == 0  # fmt: skip
    assert _latest(run_dir)[0] == 1
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "emoportraits"
    assert config["train"]["region_masks"] == "landmarks"
    assert config["train"]["secondary_data"] == [str(videos[2].resolve())]
    assert config["unavailable_losses"] == ["vgg19", "vggface", "gaze", "ears"]

    assert _run("--resume", run_dir, "--max-steps", 2, *common) == 0
    step, weights = _latest(run_dir)
    assert step == 2
    assert "resumed from step_00000001" in (run_dir / "log.txt").read_text()
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats if s["kind"] == "train"] == [1, 2]
    assert all(
        {"loss_canonical", "loss_eyes", "loss_mouth"} <= set(s)
        for s in stats
        if s["kind"] == "train"
    )
    assert {"heldout_auc_z", "heldout_canonical_l1"} <= set(stats[0])  # evaluated before step 1

    model = load_main_model(run_dir)
    assert model.config.expression_dim == 16
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[f"generator.{name}"]), name


def test_bad_runs_are_refused_with_a_clear_message(tmp_path, videos, pose_file) -> None:
    with pytest.raises(InputError, match="give prepared DATA_DIRs"):
        _run("--preset", "emoportraits-tiny")
    with pytest.raises(InputError, match="cannot resume"):
        _run("--resume", tmp_path / "none", "--device", "cpu")
    other = tmp_path / "mega"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps({"model": "megaportraits", "engine": {"seed": 0, "max_steps": 1}})
    )
    with pytest.raises(InputError, match="not emoportraits"):
        _run("--resume", other, "--device", "cpu")
    with pytest.raises(InputError, match="unknown EMOPortraits preset"):
        _run(
            *videos[:2],
            "--preset",
            "emoportraits-1024",
            "--run-dir",
            tmp_path / "r",
            "--pose-network",
            pose_file,
        )
