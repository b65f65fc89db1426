"""The MegaPortraits gaze + blink network (App. B.5), its eye crops, its distillation and the
gaze loss, at tiny sizes with random weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from neuralhead import weights
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.losses.gaze import DEFAULT_LAYER_WEIGHTS, GazeLoss
from neuralhead.pretrained import gaze_distill
from neuralhead.pretrained.gaze import (
    MESH_EYE_CORNERS,
    GazeBlinkConfig,
    GazeBlinkNet,
    crop_eyes,
    normalize_keypoints,
)
from neuralhead.pretrained.gaze_distill import (
    distill_gaze_network,
    main,
    one_cycle_lr,
    read_labels,
    resume_path,
)
from neuralhead.pretrained.vgg import IMAGENET_STD

TINY = GazeBlinkConfig(num_keypoints=5, width=1 / 16)
(LEFT_OUTER, LEFT_INNER), (RIGHT_OUTER, RIGHT_INNER) = MESH_EYE_CORNERS


def _eyes(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(batch, 3, 36, 60, generator=g),
        torch.rand(batch, 3, 36, 60, generator=g),
        torch.rand(batch, 5, 2, generator=g) * 2 - 1,
    )


def _ramp(height: int, width: int) -> torch.Tensor:
    """An image whose red and green channels are each pixel centre's x and y in pixels."""
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return torch.stack([xs, ys, torch.zeros(height, width)])[None]


def _mesh(batch: int, left: tuple, right: tuple) -> torch.Tensor:
    """478 landmarks at the origin except the eye corners: ``left`` / ``right`` are each
    eye's ((outer x, y), (inner x, y)) in pixels."""
    landmarks = torch.zeros(batch, 478, 2)
    for (outer, inner), corners in [
        ((LEFT_OUTER, LEFT_INNER), left),
        ((RIGHT_OUTER, RIGHT_INNER), right),
    ]:
        landmarks[:, outer] = torch.tensor(corners[0], dtype=torch.float32)
        landmarks[:, inner] = torch.tensor(corners[1], dtype=torch.float32)
    return landmarks


# ----------------------------------------------------------------------------- network
def test_forward_shapes_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = GazeBlinkNet(TINY)
    left, right, keypoints = _eyes(2)
    out = net(left, right, keypoints)
    assert out.gaze.shape == (2, 2) and out.blink.shape == (2, 1)
    assert out.eye_code.shape == (2, 256)
    expected = [(2, 4, 36, 60), (2, 8, 18, 30), (2, 16, 9, 15), (2, 32, 4, 7), (2, 32, 2, 3)]
    assert [tuple(f.shape) for f in out.left_features] == expected
    assert [tuple(f.shape) for f in out.right_features] == expected
    (out.gaze.square().sum() + out.blink.square().sum()).backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_eyes_are_encoded_by_one_shared_backbone_and_summed():
    torch.manual_seed(0)
    net = GazeBlinkNet(TINY)
    left, right, keypoints = _eyes(2)
    swapped = net(right, left, keypoints)
    straight = net(left, right, keypoints)
    # Sum of the two eye codes: swapping the eyes changes neither code nor predictions.
    torch.testing.assert_close(swapped.eye_code, straight.eye_code)
    torch.testing.assert_close(swapped.gaze, straight.gaze)
    torch.testing.assert_close(swapped.left_features[0], straight.right_features[0])
    # Keypoints feed the gaze head only.
    moved = net(left, right, keypoints.flip(1))
    torch.testing.assert_close(moved.blink, straight.blink)
    assert not torch.allclose(moved.gaze, straight.gaze)


def test_bad_inputs_are_refused():
    net = GazeBlinkNet(TINY)
    left, right, keypoints = _eyes(2)
    with pytest.raises(InputError, match=r"keypoints shaped \(2, 5, 2\)"):
        net(left, right, keypoints[:, :4])
    with pytest.raises(InputError, match="two eye images of one shape"):
        net(left, right[:1], keypoints)
    with pytest.raises(InputError, match="at least 32x32"):
        GazeBlinkNet(GazeBlinkConfig(eye_size=(16, 60)))


def test_normalize_keypoints():
    pixels = torch.tensor([[[0.0, 0.0, 7.0], [100.0, 50.0, 7.0], [25.0, 37.5, 7.0]]])
    expected = torch.tensor([[[-1.0, -1.0], [1.0, 1.0], [-0.5, 0.5]]])
    torch.testing.assert_close(normalize_keypoints(pixels, 50, 100), expected)


# ----------------------------------------------------------------------------- eye crops
def test_crops_are_centred_on_the_eyes_and_twice_their_width():
    image = _ramp(40, 80)
    # Left eye (image right) from x=50 to x=70, right eye from x=10 to x=30, both at y=20.
    landmarks = _mesh(1, left=((70, 20), (50, 20)), right=((10, 20), (30, 20)))
    left, right = crop_eyes(image, landmarks, size=(6, 10))
    assert left.shape == right.shape == (1, 3, 6, 10)
    # 40 px wide crops (2x the corner distance) of 10 columns: centres 4 px apart.
    torch.testing.assert_close(left[0, 0, 0], torch.arange(42.0, 80.0, 4.0))
    torch.testing.assert_close(right[0, 0, 0], torch.arange(2.0, 40.0, 4.0))
    # 24 px high (aspect 6:10) around y=20.
    torch.testing.assert_close(left[0, 1, :, 0], torch.arange(10.0, 32.0, 4.0))


def test_crops_follow_the_eye_line():
    image = _ramp(80, 40)
    # A face turned by 90 degrees: the eye line runs down the image, right eye on top.
    landmarks = _mesh(1, left=((20, 70), (20, 50)), right=((20, 10), (20, 30)))
    left, _ = crop_eyes(image, landmarks, size=(6, 10))
    # The crop's columns run down the image, its rows towards -x.
    torch.testing.assert_close(left[0, 1, 0], torch.arange(42.0, 80.0, 4.0))
    torch.testing.assert_close(left[0, 0, :, 0], torch.arange(30.0, 8.0, -4.0))


def test_crop_gradients_stay_inside_the_eye_boxes():
    image = torch.rand(1, 3, 40, 80, requires_grad=True)
    landmarks = _mesh(1, left=((70, 20), (50, 20)), right=((10, 20), (30, 20)))
    left, right = crop_eyes(image, landmarks)
    (left.sum() + right.sum()).backward()
    grad = image.grad.abs().sum(dim=(0, 1))
    assert grad[20, 60] > 0 and grad[20, 20] > 0
    assert grad[:6].sum() == 0 and grad[35:].sum() == 0  # above and below the 24 px boxes


# ----------------------------------------------------------------------------- weights
def test_round_trip_through_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path))
    torch.manual_seed(3)
    original = GazeBlinkNet(TINY)
    original.save(tmp_path / weights.get_weights("gaze-blink").filename)
    loaded = GazeBlinkNet.from_pretrained()
    assert loaded.config == TINY
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    inputs = _eyes(2)
    a, b = loaded(*inputs), original(*inputs)
    torch.testing.assert_close(a.gaze, b.gaze, rtol=0, atol=0)
    torch.testing.assert_close(a.left_features[3], b.left_features[3], rtol=0, atol=0)


def test_missing_or_foreign_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsMissingError, match="gaze_blink.safetensors not found.*gaze_distill"):
        GazeBlinkNet.from_pretrained()
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "gaze_blink.safetensors"))
    with pytest.raises(InputError, match="not a gaze network file"):
        GazeBlinkNet.from_pretrained()


# ----------------------------------------------------------------------------- distillation
def _eye_folder(root, count: int = 8, keypoints: int = 5):
    """``count`` random 64x64 eye pairs with random teacher labels."""
    rng = np.random.default_rng(0)
    (root / "eyes").mkdir(parents=True)
    lines = []
    for index in range(count):
        for side in "lr":
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "eyes" / f"{index}_{side}.png")
        record = {
            "left": f"eyes/{index}_l.png",
            "right": f"eyes/{index}_r.png",
            "keypoints": rng.uniform(-1, 1, (keypoints, 2)).tolist(),
            "gaze": rng.uniform(-0.5, 0.5, 2).tolist(),
            "blink": float(rng.uniform()),
        }
        lines.append(json.dumps(record))
    (root / "labels.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_read_labels_checks_the_folder(tmp_path):
    with pytest.raises(InputError, match="no labels.jsonl"):
        read_labels(tmp_path)
    folder = _eye_folder(tmp_path / "eyes_ok", count=2)
    samples = read_labels(folder)
    assert len(samples) == 2 and len(samples[0].keypoints) == 5
    lines = (folder / "labels.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    broken["gaze"] = [0.1]
    (folder / "labels.jsonl").write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(InputError, match=r"labels.jsonl:2: gaze must be two numbers"):
        read_labels(folder)
    broken["gaze"], broken["right"] = [0.1, 0.2], "eyes/missing.png"
    (folder / "labels.jsonl").write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(InputError, match="right eye image .*missing.png not found"):
        read_labels(folder)


def test_one_cycle_schedule():
    assert one_cycle_lr(0, 100, 1.0) == pytest.approx(1 / 25)
    assert one_cycle_lr(10, 100, 1.0) == pytest.approx(1.0)
    assert one_cycle_lr(99, 100, 1.0) == pytest.approx(1 / 25 / 1e4)
    assert one_cycle_lr(5, 100, 1.0) == pytest.approx((1 + 1 / 25) / 2)
    assert all(math.isfinite(one_cycle_lr(s, 2, 1.0)) for s in range(2))


def test_two_steps_write_a_loadable_network(tmp_path):
    folder = _eye_folder(tmp_path / "eyes")
    out = tmp_path / "out" / "gaze_blink.safetensors"
    result = distill_gaze_network(
        folder, out, epochs=1, batch_size=4, width=1 / 16, init="random", progress=False
    )
    assert result.path == out and len(result.epoch_losses) == 1
    assert not resume_path(out).exists()
    net = GazeBlinkNet.from_pretrained(out)
    assert net.config.num_keypoints == 5 and net.config.width == 1 / 16


def test_loss_falls_when_overfitting_a_tiny_batch(tmp_path):
    folder = _eye_folder(tmp_path / "eyes")
    result = distill_gaze_network(
        folder,
        tmp_path / "g.safetensors",
        epochs=24,
        batch_size=8,
        lr=3e-3,
        width=1 / 16,
        init="random",
        progress=False,
    )
    losses = result.epoch_losses
    assert len(losses) == 24 and losses[-1] < 0.5 * losses[0]


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    folder = _eye_folder(tmp_path / "eyes", count=4)
    options = dict(epochs=3, batch_size=2, width=1 / 16, init="random", progress=False)
    straight = distill_gaze_network(folder, tmp_path / "a.safetensors", **options)

    out = tmp_path / "b.safetensors"
    schedule = gaze_distill.one_cycle_lr

    def stop_in_the_last_epoch(step, *args, **kwargs):
        if step == 4:
            raise KeyboardInterrupt
        return schedule(step, *args, **kwargs)

    monkeypatch.setattr(gaze_distill, "one_cycle_lr", stop_in_the_last_epoch)
    with pytest.raises(KeyboardInterrupt):
        distill_gaze_network(folder, out, **options)
    assert resume_path(out).is_file() and not out.exists()
    monkeypatch.setattr(gaze_distill, "one_cycle_lr", schedule)
    with pytest.raises(InputError, match="other options.*lr"):
        distill_gaze_network(folder, out, **{**options, "lr": 1e-3})
    resumed = distill_gaze_network(folder, out, **options)
    assert resumed.epoch_losses == straight.epoch_losses
    a = GazeBlinkNet.load(straight.path).state_dict()
    b = GazeBlinkNet.load(resumed.path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_main_reports_errors_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path / "out.safetensors"), "--init", "random"]) == 2
    assert "error: " in capsys.readouterr().err


# ----------------------------------------------------------------------------- gaze loss
FACE = dict(left=((70, 30), (54, 30)), right=((26, 30), (42, 30)))


@pytest.fixture(scope="module")
def loss_network() -> GazeBlinkNet:
    torch.manual_seed(4)
    return GazeBlinkNet(GazeBlinkConfig(width=1 / 16))


def test_gaze_loss_is_zero_for_identical_images_and_positive_otherwise(loss_network):
    loss = GazeLoss(loss_network, gaze_weight=1.0, blink_weight=1.0)
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 64, 96, generator=g)
    landmarks = _mesh(2, **FACE)
    assert loss(target, target, landmarks).item() == 0.0
    pred = (target + 0.1 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    pred.requires_grad_(True)
    value = loss(pred, target, landmarks)
    assert value.ndim == 0 and value > 0
    value.backward()
    assert pred.grad.abs().sum() > 0
    assert pred.grad[..., :10, :].abs().sum() == 0  # far above the eyes
    assert all(p.grad is None for p in loss_network.parameters())


def test_gaze_loss_equals_the_weighted_feature_distance(loss_network):
    loss = GazeLoss(loss_network, gaze_weight=0.5)
    g = torch.Generator().manual_seed(1)
    target, pred = torch.rand(2, 2, 3, 64, 96, generator=g)
    landmarks = _mesh(2, **FACE)
    keypoints = normalize_keypoints(landmarks, 64, 96)
    got = loss_network(*crop_eyes(pred, landmarks), keypoints)
    want = loss_network(*crop_eyes(target, landmarks), keypoints)
    expected = 0.5 * (got.gaze - want.gaze).abs().mean()
    for w, fp, ft, gp, gt in zip(
        DEFAULT_LAYER_WEIGHTS,
        got.left_features,
        want.left_features,
        got.right_features,
        want.right_features,
    ):
        expected = expected + w * torch.cat([fp - ft, gp - gt]).abs().mean()
    torch.testing.assert_close(loss(pred, target, landmarks), expected)


def test_gaze_loss_by_hand():
    # relu1_1 of a 3-channel first layer that copies its input: the ImageNet-normalised image.
    net = GazeBlinkNet(GazeBlinkConfig(width=3 / 64))
    conv = net.backbone.features[0]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for channel in range(3):
            conv.weight[channel, channel, 1, 1] = 1.0
    loss = GazeLoss(net, layer_weights=(2.0, 0, 0, 0, 0))
    target = 0.5 + 0.4 * torch.rand(1, 3, 64, 96)  # above the ImageNet mean: ReLU passes it
    shift = 0.05
    value = loss(target + shift, target, _mesh(1, **FACE))
    expected = 2.0 * shift * sum(1 / s for s in IMAGENET_STD) / 3
    assert value.item() == pytest.approx(expected, rel=1e-4)


def test_gaze_loss_refuses_bad_inputs(loss_network):
    with pytest.raises(InputError, match="2 layer weights for the network's 5 feature layers"):
        GazeLoss(loss_network, layer_weights=(1.0, 1.0))
    loss = GazeLoss(loss_network)
    image = torch.rand(1, 3, 64, 96)
    with pytest.raises(InputError, match="takes 478 landmarks"):
        loss(image, image, torch.zeros(1, 68, 2))
    with pytest.raises(InputError, match="differ"):
        loss(image, image[..., :90], _mesh(1, **FACE))
    loss.train()
    assert loss.training and not loss.network.training
