"""MegaPortraits base-model training: augmentation, samples, losses, steps, runs and resumption.

Everything runs on two fake prepared videos of tests/fake_data.py (32x32 frames brought to
64x64, a synthetic face mesh in the landmarks, foreground masks) with megaportraits-tiny and
a random head-pose network saved to a file, as a pre-trained one would be.
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
from torch import nn

from neuralhead import cli
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.megaportraits.augmentation import (
    ColorJitter,
    DriverAugmentation,
    PairAugmentation,
    elastic_warp,
)
from neuralhead.megaportraits.base_model import MegaPortraitsBase
from neuralhead.megaportraits.config import preset
from neuralhead.megaportraits.dataset import MegaPortraitsPairs
from neuralhead.megaportraits.losses import (
    MegaPortraitsLoss,
    contrastive_ranking,
    foreground,
    pyramid_levels,
)
from neuralhead.megaportraits.motion_encoder import HeadPoseNetwork
from neuralhead.megaportraits.trainer import (
    MegaPortraitsTask,
    MegaPortraitsTrainOptions,
    load_loss_networks,
)
from neuralhead.pretrained.gaze import GazeBlinkConfig, GazeBlinkNet
from neuralhead.training import checkpoint as ckpt
from neuralhead.training.engine import Engine, EngineOptions

SIZE = 64


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    """Two fake videos: the cycle-consistency pairs need frames of another video."""
    root = tmp_path_factory.mktemp("megaportraits")
    return [make_dataset(root / "a", seed=0, audio=False), make_dataset(root / "b", seed=1)]


@pytest.fixture(scope="module")
def pose_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pose") / "pose.safetensors"
    HeadPoseNetwork(preset("megaportraits-tiny")).save(path)
    return path


@pytest.fixture
def no_weights(tmp_path, monkeypatch) -> None:
    """An empty weight cache: VGG19, VGGFace and the gaze network are absent."""
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "weights"))


# ---------------------------------------------------------------------------- augmentation
def _images(seed: int = 0, batch: int = 2, size: int = 24) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_driver_augmentation_keeps_shape_and_range_and_follows_the_seed() -> None:
    crops = _images()
    augment = DriverAugmentation()
    first = augment(crops, torch.Generator().manual_seed(5))
    again = augment(crops, torch.Generator().manual_seed(5))
    other = augment(crops, torch.Generator().manual_seed(6))
    assert first.shape == crops.shape
    assert 0 <= float(first.min()) and float(first.max()) <= 1
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        augment(crops[:, :1])


def test_elastic_warp_is_the_identity_without_offsets_and_moves_pixels_with_them() -> None:
    images = _images()
    still = elastic_warp(images, offsets=torch.zeros(2, 2, 9, 9))
    assert torch.allclose(still, images, atol=1e-5)
    # A uniform offset of one lattice cell (2/8 of the normalised width = 3 of 24 pixels)
    # makes every output pixel read the one 3 columns to its right.
    shifted = elastic_warp(
        images, offsets=torch.cat([torch.ones(2, 1, 9, 9), torch.zeros(2, 1, 9, 9)], 1)
    )
    assert torch.allclose(shifted[..., :-3], images[..., 3:], atol=1e-5)
    warped = elastic_warp(images, generator=torch.Generator().manual_seed(0))
    assert 0 < float((warped - images).abs().mean()) < 0.2


def test_color_jitter_extremes() -> None:
    images = _images()
    assert torch.allclose(ColorJitter(0, 0, 0, 0)(images), images, atol=1e-5)
    grey = ColorJitter(grayscale_probability=1.0)(images, torch.Generator().manual_seed(0))
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    # Brightness 0.5 scales by a factor in [0.5, 1.5]; the first draw of this seed is known.
    jitter = ColorJitter(brightness=0.5, contrast=0, saturation=0, hue=0)
    params = jitter.draw(2, torch.Generator().manual_seed(1))
    factor = params[:, 0].view(2, 1, 1, 1)
    assert torch.allclose(jitter.apply(images, params), (images * factor).clamp(0, 1), atol=1e-5)
    with pytest.raises(InputError, match="hue"):
        ColorJitter(hue=0.7)


def test_pair_augmentation_flips_images_masks_and_landmarks_together() -> None:
    images, masks = _images(), torch.rand(2, 1, 24, 24)
    landmarks = torch.tensor([[[3.0, 5.0], [20.0, 7.0]]]).repeat(2, 1, 1)
    augment = PairAugmentation(jitter=ColorJitter(0, 0, 0, 0), flip_probability=1.0)
    params = augment.draw(2, torch.Generator().manual_seed(0))
    flipped, flipped_masks, flipped_points = augment.apply(params, images, masks, landmarks)
    assert torch.allclose(flipped, images.flip(-1), atol=1e-5)
    assert torch.equal(flipped_masks, masks.flip(-1))
    assert torch.equal(flipped_points[..., 0], 24 - landmarks[..., 0])
    assert torch.equal(flipped_points[..., 1], landmarks[..., 1])
    kept = PairAugmentation(jitter=ColorJitter(0, 0, 0, 0), flip_probability=0.0)
    same, _, _ = kept.apply(kept.draw(2), images)
    assert torch.allclose(same, images, atol=1e-5)


# ---------------------------------------------------------------------------- dataset
def test_samples_pair_two_frames_of_a_video_with_two_of_another(videos) -> None:
    pairs = MegaPortraitsPairs(videos, SIZE)
    num_train = json.loads((videos[0] / "meta.json").read_text())["split"]["num_train"]
    assert len(pairs) == 2 * num_train and pairs.num_videos == 2
    batch = pairs.batch([3, num_train + 5, 7], torch.Generator().manual_seed(0))
    for role in ("driver", "source", "other_source", "other_driver"):
        assert batch[role].shape == (3, 3, SIZE, SIZE), role
        assert batch[f"{role}_mask"].shape == (3, 1, SIZE, SIZE), role
        assert batch[f"{role}_landmarks"].shape == (3, 478, 2), role
        for key in (role, f"{role}_mask"):
            assert 0 <= float(batch[key].min()) and float(batch[key].max()) <= 1, key
        assert int(batch[f"{role}_frame"].max()) < num_train  # never a held-out frame
    assert batch["video"].tolist() == [0, 1, 0]
    assert (batch["other_video"] != batch["video"]).all()
    assert (batch["source_frame"] != batch["driver_frame"]).all()
    assert (batch["other_source_frame"] != batch["other_driver_frame"]).all()
    # Landmarks are brought from the 32-pixel crops to 64 pixels.
    raw = np.load(videos[0] / "landmarks.npy")[int(batch["driver_frame"][0]), :, :2]
    assert torch.allclose(batch["driver_landmarks"][0], torch.from_numpy(raw) * 2, atol=1e-4)
    again = pairs.batch([3, num_train + 5, 7], torch.Generator().manual_seed(0))
    assert all(torch.equal(batch[k], again[k]) for k in batch)

    heldout = MegaPortraitsPairs(videos, SIZE, "heldout")
    assert len(heldout) == 2 * (40 - num_train)
    assert int(heldout.batch([0])["driver_frame"][0]) >= num_train
    with pytest.raises(InputError, match="at least two prepared videos"):
        MegaPortraitsPairs(videos[:1], SIZE)
    single = MegaPortraitsPairs(videos[:1], SIZE, cross_pairs=False)
    assert "other_source" not in single.batch([0])


# ---------------------------------------------------------------------------- losses
class _Features(nn.Module):
    """A small stand-in feature network (two feature maps), enough to exercise the terms."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.relu(self.a(x))
        return [h, torch.relu(self.b(h))]


def _codes(batch: int = 3, dim: int = 8) -> list[torch.Tensor]:
    return [torch.randn(batch, dim, generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_generator_loss_is_the_weighted_sum_of_its_terms(videos) -> None:
    torch.manual_seed(0)
    config = preset("megaportraits-tiny")
    gaze = GazeBlinkNet(GazeBlinkConfig(width=1 / 16, eye_dim=8, keypoint_dim=4, head_hidden=4))
    loss = MegaPortraitsLoss(
        config, vgg19=_Features(), vggface=_Features(), gaze=gaze, l1_weight=3.0
    )
    batch = MegaPortraitsPairs(videos, SIZE).batch([1, 2, 3], torch.Generator().manual_seed(0))
    target = foreground(batch["driver"], batch["driver_mask"])
    pred = torch.rand_like(target, requires_grad=True)
    discriminator = [[torch.randn(3, 4, 8, 8), torch.randn(3, 1, 8, 8)]]
    fake = [[f + 1 for f in discriminator[0]]]
    total, terms = loss.generator_loss(
        pred,
        target,
        landmarks=batch["driver_landmarks"],
        d_fake=fake,
        d_real=discriminator,
        z_pred=_codes()[0],
        z_cross_pred=_codes()[1],
        z_driver=_codes()[2],
        z_other_driver=_codes()[3],
    )
    expected = {"vgg19", "vggface", "gaze", "adversarial", "feature_matching", "contrastive", "l1"}
    assert set(terms) == expected
    weights = loss.weights
    assert (weights["vgg19"], weights["vggface"], weights["gaze"]) == (20.0, 4.0, 5.0)
    assert (weights["adversarial"], weights["feature_matching"], weights["contrastive"]) == (
        1,
        40,
        2,
    )
    assert torch.isclose(total, sum(weights[k] * terms[k] for k in terms))
    assert torch.isclose(terms["feature_matching"], torch.tensor(1.0))
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    d_total, d_terms = loss.discriminator_loss(discriminator, fake)
    assert set(d_terms) == {"discriminator"} and d_total > 0


def test_missing_networks_leave_their_terms_out_with_one_warning(
    tmp_path, no_weights, caplog
) -> None:
    config = preset("megaportraits-tiny")
    with caplog.at_level(logging.WARNING):
        networks = load_loss_networks(config, MegaPortraitsTrainOptions())
    assert networks == {"vgg19": None, "vggface": None, "gaze": None}
    assert caplog.text.count("trains WITHOUT") == 3
    for term in ("L_IN", "L_face", "L_gaze"):
        assert term in caplog.text
    with pytest.raises(WeightsMissingError):
        load_loss_networks(config, MegaPortraitsTrainOptions(vgg_weights=str(tmp_path / "no")))
    loss = MegaPortraitsLoss(config)
    assert loss.unavailable == ["vgg19", "vggface", "gaze"]
    pred, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    with pytest.raises(InputError, match="every generator term"):
        loss.generator_loss(pred, target)
    logits = [[torch.randn(2, 4, 4, 4), torch.randn(2, 1, 4, 4)]]
    _, terms = loss.generator_loss(pred, target, d_fake=logits, d_real=logits)
    assert set(terms) == {"adversarial", "feature_matching"}
    with pytest.raises(InputError, match="together"):
        loss.generator_loss(pred, target, d_fake=logits, d_real=logits, z_pred=_codes()[0])


def test_contrastive_ranking_counts_positive_pairs_above_negative_ones() -> None:
    basis = torch.eye(4)
    driver, other = basis[0:1], basis[1:2]
    near_driver = torch.tensor([[1.0, 0.2, 0.0, 0.0]])
    near_other = torch.tensor([[0.2, 1.0, 0.0, 0.0]])
    # Both outputs carry the driver's motion: all 4 comparisons of Eq. 7 are won.
    assert float(contrastive_ranking(near_driver, near_driver, driver, other)) == 1.0
    # Both carry the other driver's: all lost.
    assert float(contrastive_ranking(near_other, near_other, driver, other)) == 0.0
    # One each: (z_s->d, z_d) beats both negatives, (z_s*->d, z_d) loses to both.
    assert float(contrastive_ranking(near_driver, near_other, driver, other)) == 0.5
    # The loss agrees: lower when the positives win.
    loss = MegaPortraitsLoss(preset("megaportraits-tiny"))
    logits = [[torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)]]
    image = torch.zeros(1, 3, 8, 8)

    def contrastive(a: torch.Tensor, b: torch.Tensor) -> float:
        _, terms = loss.generator_loss(
            image, image, d_fake=logits, d_real=logits, z_pred=a, z_cross_pred=b,
            z_driver=driver, z_other_driver=other,
        )  # fmt: skip
        return float(terms["contrastive"])

    assert contrastive(near_driver, near_driver) < contrastive(near_other, near_other)


def test_foreground_and_pyramid_levels() -> None:
    image = torch.full((1, 3, 4, 4), 0.7)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    out = foreground(image, mask, background=0.25)
    assert torch.allclose(out[..., :2], image[..., :2]) and torch.allclose(
        out[..., 2:], torch.tensor(0.25)
    )
    with pytest.raises(InputError, match="mask"):
        foreground(image, mask[:, :, :2])
    assert [pyramid_levels(s) for s in (16, 32, 64, 128, 512)] == [1, 1, 2, 3, 3]
    assert pyramid_levels(512, 1) == 1


# ---------------------------------------------------------------------------- training
def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: nn.Module) -> list[str]:
    return [k for k, v in module.named_parameters() if not torch.equal(before[k], v)]


def test_a_step_updates_generator_and_discriminator_but_not_the_pose_network(
    tmp_path, videos, pose_file, no_weights
) -> None:
    torch.manual_seed(0)
    engine = Engine.create(
        tmp_path / "run", EngineOptions(device="cpu", progress=False, max_steps=10)
    )
    options = MegaPortraitsTrainOptions(
        preset="megaportraits-tiny", pose_network=str(pose_file), eval_samples=2
    )
    config = preset("megaportraits-tiny")
    task = MegaPortraitsTask(engine, videos, options, config)
    g, d = task.raw_model, task.raw_discriminator
    pose = {k: v.clone() for k, v in g.head_pose.state_dict().items()}
    g0, d0 = _snapshot(g), _snapshot(d)
    stats = task.train_step(0)
    expected = {"loss", "loss_adversarial", "loss_feature_matching", "loss_contrastive"}
    assert expected | {"loss_discriminator", "l1_255", "ranking", "lr"} <= set(stats)
    assert not {"loss_vgg19", "loss_vggface", "loss_gaze"} & set(stats)
    trainable = [k for k, p in g.named_parameters() if p.requires_grad]
    assert all(k.startswith("head_pose.") for k in set(g0) - set(trainable))
    changed = set(_changed(g0, g))
    assert changed and changed <= set(trainable)
    assert len(changed) > 0.9 * len(trainable)
    assert len(_changed(d0, d)) > 0.9 * len(d0)
    assert all(torch.equal(v, pose[k]) for k, v in g.head_pose.state_dict().items())
    assert task.g_scheduler.get_last_lr()[0] < config.lr

    metrics = task.evaluate(1)
    assert set(metrics) == {
        "heldout_l1", "heldout_psnr", "baseline_l1", "baseline_psnr", "heldout_ranking"
    }  # fmt: skip
    assert 0 < metrics["heldout_l1"] < 255 and 0 <= metrics["heldout_ranking"] <= 1
    sheet = task.preview(1)
    assert sheet.ndim == 3 and sheet.shape[1] > 7 * SIZE


def test_training_needs_a_pose_network(tmp_path, videos, no_weights) -> None:
    engine = Engine.create(tmp_path / "run", EngineOptions(device="cpu", progress=False))
    options = MegaPortraitsTrainOptions(preset="megaportraits-tiny")
    with pytest.raises(InputError, match="megaportraits-pose"):
        MegaPortraitsTask(engine, videos, options, preset("megaportraits-tiny"))


def _train(*args: object) -> None:
    command = ["train", "megaportraits", *map(str, args), "--preset", "megaportraits-tiny"]
    command += ["--batch-size", "1", "--device", "cpu", "--no-progress", "--seed", "3"]
    command += ["--checkpoint-every", "2", "--log-every", "2", "--eval-every", "3"]
    command += ["--preview-every", "3", "--eval-samples", "1", "--set", "num_iterations=5"]
    assert cli.main(command) == 0


def _latest(run: Path) -> tuple[int, dict[str, torch.Tensor]]:
    path = ckpt.latest_checkpoint(run / "checkpoints")
    assert path is not None
    step = json.loads((path / "state.json").read_text())["step"]
    return step, load_file(path / "modules.safetensors")


def test_a_run_checkpoints_resumes_exactly_and_exports_the_base_model(
    tmp_path, videos, pose_file, no_weights
) -> None:
    torch.manual_seed(0)
    run = tmp_path / "run"
    _train(*videos, "--run-dir", run, "--max-steps", 3, "--pose-network", pose_file)
    step, at_3 = _latest(run)
    assert step == 3
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "megaportraits"
    assert config["unavailable_losses"] == ["vgg19", "vggface", "gaze"]
    evals = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if e["kind"] == "eval"] == [0, 3]  # before the first step too
    assert (run / "previews" / "latest.png").is_file()

    model = MegaPortraitsBase.from_pretrained(run / "megaportraits")
    for name, value in model.state_dict().items():
        assert torch.equal(value, at_3[f"generator.{name}"]), name
    saved_pose = load_file(pose_file)
    assert torch.equal(model.head_pose.pose_mean, saved_pose["pose_mean"])

    resume = ["train", "megaportraits", "--resume", str(run), "--max-steps", "5", "--no-progress"]
    assert cli.main(resume) == 0
    step, resumed = _latest(run)
    assert step == 5
    assert "resumed from step_00000003" in (run / "log.txt").read_text()
    straight = tmp_path / "straight"
    _train(*videos, "--run-dir", straight, "--max-steps", 5, "--pose-network", pose_file)
    _, uninterrupted = _latest(straight)
    assert resumed.keys() == uninterrupted.keys()
    assert [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])] == []


def test_bad_runs_are_refused_with_a_clear_message(tmp_path, videos, pose_file, capsys) -> None:
    assert cli.main(["train", "megaportraits", "--preset", "megaportraits-tiny"]) == 2
    assert "give prepared DATA_DIRs" in capsys.readouterr().err
    args = ["train", "megaportraits", *map(str, videos), "--run-dir", str(tmp_path / "r")]
    assert cli.main([*args, "--preset", "megaportraits-1024"]) == 2
    assert "unknown MegaPortraits preset" in capsys.readouterr().err
    one = ["train", "megaportraits", str(videos[0]), "--preset", "megaportraits-tiny"]
    assert cli.main([*one, "--run-dir", str(tmp_path / "s"), "--pose-network", str(pose_file)]) == 2
    assert "at least two prepared videos" in capsys.readouterr().err
    assert cli.main(["train", "megaportraits", "--resume", str(tmp_path / "none")]) == 2
    assert "cannot resume" in capsys.readouterr().err
