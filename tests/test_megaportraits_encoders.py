"""MegaPortraits encoders: E_app (v_s, e_s), the head-pose network and its pre-training, the
pose-aligned face crop and the expression encoder."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuralhead.errors import InputError
from neuralhead.megaportraits.appearance_encoder import AppearanceEncoder
from neuralhead.megaportraits.config import preset
from neuralhead.megaportraits.motion_encoder import (
    ExpressionEncoder,
    HeadPoseNetwork,
    face_crop,
)
from neuralhead.megaportraits.pose_training import augment_pose_batch, main, train_pose_network

# Parameters at the paper's sizes, counted by hand: the volume path is the stem (18,944), the
# three down-sampling blocks (919,040 + 3,673,088 + 4,721,664), GroupNorm (1,024), the 1x1
# conv to 1536 channels (787,968) and three 3D blocks at 96 channels (3 x 498,240); the e_s
# network is torchvision's ResNet-50 without fc (23,508,032) plus the 1x1 head (1,049,088);
# the expression encoder is ResNet-18 without fc (11,176,512) plus a 512 -> 512 fc (262,656).
EXPECTED_VOLUME_PATH = 11_616_448
EXPECTED_DESCRIPTOR = 24_557_120
EXPECTED_EXPRESSION = 11_439_168
EXPECTED_POSE = 11_179_590  # ResNet-18 without fc plus a 512 -> 6 fc (3,078)
POSE_STEPS = 60


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _assert_gradients_everywhere(module: nn.Module) -> None:
    missing = [
        name
        for name, p in module.named_parameters()
        if p.requires_grad
        and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)
    ]
    assert not missing, f"no gradient reaches {missing[:5]}"


# ----------------------------------------------------------------------------- E_app
def test_appearance_encoder_at_512_gives_the_papers_volume():
    torch.manual_seed(0)
    # The paper's volume and descriptor sizes with narrow 2D widths and no 3D blocks (they keep
    # the shape; the tiny test covers them), so that one forward takes about a second: the
    # full preset's takes 40 s on this CPU.
    config = preset(
        "megaportraits-512",
        appearance_channels=(8, 8, 16, 16),
        appearance_volume_blocks=0,
        descriptor_width=8,
        descriptor_layers=(1, 1, 1, 1),
    )
    encoder = AppearanceEncoder(config).eval()
    with torch.no_grad():
        v_s, e_s = encoder(torch.rand(1, 3, 512, 512))
    assert v_s.shape == (1, 96, 16, 64, 64)
    assert e_s.shape == (1, 512, 4, 4)


def test_parameter_counts_at_the_papers_sizes():
    # Weight standardisation and spectral norm add no parameters (checked at the tiny size)
    # but make building the full-size networks slow, so the count is taken without them.
    plain = dict(spectral_norm=False, weight_standardization=False)
    tiny, tiny_plain = preset("megaportraits-tiny"), preset("megaportraits-tiny", **plain)
    assert _count(AppearanceEncoder(tiny)) == _count(AppearanceEncoder(tiny_plain))
    assert _count(ExpressionEncoder(tiny)) == _count(ExpressionEncoder(tiny_plain))

    encoder = AppearanceEncoder(preset("megaportraits-512", **plain))
    volume_path = _count(encoder) - _count(encoder.descriptor)
    descriptor = _count(encoder.descriptor)
    assert volume_path == EXPECTED_VOLUME_PATH and descriptor == EXPECTED_DESCRIPTOR
    # Implementation notes: about 11.6M for the volume path and 24.6M for the e_s ResNet-50.
    assert abs(volume_path / 11.6e6 - 1) < 0.01 and abs(descriptor / 24.6e6 - 1) < 0.01
    assert _count(ExpressionEncoder(preset("megaportraits-512", **plain))) == EXPECTED_EXPRESSION
    assert _count(HeadPoseNetwork(preset("megaportraits-512"))) == EXPECTED_POSE


def test_appearance_encoder_tiny_shapes_gradients_and_mask():
    torch.manual_seed(0)
    encoder = AppearanceEncoder(preset("megaportraits-tiny"))
    source = torch.rand(2, 3, 64, 64)
    v_s, e_s = encoder(source)
    assert v_s.shape == (2, 8, 4, 8, 8) and e_s.shape == (2, 32, 2, 2)
    (v_s.square().mean() + e_s.square().mean()).backward()
    _assert_gradients_everywhere(encoder)

    # The mask only reaches e_s: an all-zero mask is a black source for the descriptor.
    encoder.eval()
    with torch.no_grad():
        masked = encoder.encode_descriptor(source, torch.zeros(2, 1, 64, 64))
        torch.testing.assert_close(masked, encoder.encode_descriptor(torch.zeros_like(source)))
    with pytest.raises(InputError, match="mask of shape"):
        encoder(source, torch.ones(2, 64, 64))
    with pytest.raises(InputError, match="divisible by 8"):
        encoder(torch.rand(1, 3, 60, 64))
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        encoder(torch.rand(1, 64, 64))


# ----------------------------------------------------------------------------- E_mtn
def test_head_pose_network_outputs_and_gradients():
    torch.manual_seed(0)
    network = HeadPoseNetwork(preset("megaportraits-tiny"))
    image = torch.rand(3, 3, 40, 40)  # any size: resized to the network's 64x64
    raw = network.predict(image)
    assert raw.shape == (3, 6)
    network.pose_mean.copy_(torch.tensor([0.1, 0.2, 0.3, 0.0, 0.1, -1.5]))
    pose = network(image)
    assert pose["rotation"].shape == (3, 3) and pose["translation"].shape == (3, 3)
    torch.testing.assert_close(pose["rotation"], raw[:, :3] + torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(pose["translation"][:, 2], torch.zeros(3))
    # Scale is relative to the training data's mean size; log_scale is the tracker's tz.
    torch.testing.assert_close(pose["log_scale"], raw[:, 5:] - 1.5)
    torch.testing.assert_close(pose["scale"], raw[:, 5:].exp())
    network.zero_grad()
    sum(v.sum() for v in network(image).values()).backward()
    _assert_gradients_everywhere(network)


def test_face_crop_samples_the_face_square():
    # Ramps in x and y: bilinear sampling reproduces the sampled coordinates exactly.
    side, size = 64, 16
    coords = (torch.arange(side) * 2 + 1) / side - 1
    image = torch.stack(
        [coords.expand(side, side), coords[:, None].expand(side, side), torch.zeros(side, side)]
    )[None]
    translation = torch.tensor([[0.1, -0.2, 0.0]], requires_grad=True)
    log_scale = torch.tensor([[math.log(0.1)]])
    crop = face_crop(image, translation, log_scale, size=size)
    unit = 0.2  # a template unit spans 2 exp(tz) normalised image units
    u = (torch.arange(size) * 2 + 1) / size - 1
    torch.testing.assert_close(crop[0, 0, 3], 0.1 + 1.1 * unit * u)
    torch.testing.assert_close(crop[0, 1, :, 5], -0.2 + 0.4 * unit + 1.1 * unit * u)
    crop[:, :2].sum().backward()
    assert translation.grad[0, :2].abs().min() > 0

    with pytest.raises(InputError, match="translation of shape"):
        face_crop(image, torch.zeros(2, 3), log_scale, size=size)
    with pytest.raises(InputError, match="one log-scale per image"):
        face_crop(image, translation, torch.zeros(3), size=size)


def test_face_crop_shrinks_large_crops_without_aliasing():
    # A one-pixel checkerboard averages to grey; naive bilinear subsampling would alias it.
    side = 128
    board = ((torch.arange(side)[:, None] + torch.arange(side)) % 2).float()
    image = board.expand(1, 3, side, side).contiguous()
    crop = face_crop(image, torch.zeros(1, 2), torch.tensor([math.log(0.4)]), size=8)
    assert crop.shape == (1, 3, 8, 8)
    assert (crop[..., 1:-1, 1:-1] - 0.5).abs().max() < 0.1
    # Each image's crop is independent of the rest of the batch.
    images = torch.cat([image, torch.rand(1, 3, side, side)])
    both = face_crop(
        images, torch.zeros(2, 2), torch.tensor([math.log(0.4), math.log(0.05)]), size=8
    )
    torch.testing.assert_close(both[:1], crop)


def test_expression_encoder_shapes_crop_dropout_and_gradients():
    torch.manual_seed(0)
    config = preset("megaportraits-tiny")
    encoder = ExpressionEncoder(config)
    pose_network = HeadPoseNetwork(config).eval()
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        pose = pose_network(image)
    z = encoder(image, pose)
    assert z.shape == (2, config.expression_dim)
    z.square().sum().backward()
    _assert_gradients_everywhere(encoder)
    assert encoder(image).shape == (2, 16)  # an image that is already a face crop
    assert not torch.equal(encoder(image), encoder(image))  # dropout 0.2 in training
    encoder.eval()
    assert torch.equal(encoder(image, pose), encoder(image, pose))
    with pytest.raises(InputError, match="lacks log_scale"):
        encoder(image, {"translation": pose["translation"]})


def test_pose_network_save_and_load(tmp_path):
    torch.manual_seed(0)
    config = preset("megaportraits-tiny")
    network = HeadPoseNetwork(config).eval()
    network.pose_mean.fill_(0.25)
    path = tmp_path / "pose.safetensors"
    network.save(path, steps=3)
    loaded = HeadPoseNetwork(config).load(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # Frozen means frozen: a parent's train() must not switch BatchNorm to batch statistics.
    parent = nn.Sequential(loaded).train()
    assert parent.training and not loaded.training and not loaded.backbone.bn1.training
    image = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded.predict(image), network.predict(image), rtol=0, atol=0)

    with pytest.raises(InputError, match="holds a head-pose network with"):
        HeadPoseNetwork(preset("megaportraits-tiny", pose_width=16)).load(path)
    with pytest.raises(InputError, match="no head-pose weights"):
        HeadPoseNetwork(config).load(tmp_path / "missing.safetensors")


def test_augmentation_moves_labels_with_the_image():
    # A Gaussian blob drawn where the pose's (tx, ty) says: after augmenting, its centroid
    # must sit where the augmented (tx, ty) says, and mirroring must negate yaw and roll.
    side = 64
    coords = (torch.arange(side) * 2 + 1) / side - 1
    pose = torch.tensor([[0.1, 0.3, -0.2, 0.2, -0.1, -1.0], [0.0, -0.1, 0.1, -0.3, 0.25, -1.2]])
    yy, xx = coords[:, None], coords[None, :]
    blobs = torch.exp(
        -((xx - pose[:, 3, None, None]) ** 2 + (yy - pose[:, 4, None, None]) ** 2) / 0.01
    )
    images = blobs[:, None].expand(2, 3, side, side).contiguous()
    generator = torch.Generator().manual_seed(3)
    seen_mirror = set()
    for _ in range(6):
        augmented, new_pose = augment_pose_batch(
            images, pose, generator, max_zoom=0.2, max_shift=0.2
        )
        mass = augmented[:, 0]
        cx = (mass * xx).sum((1, 2)) / mass.sum((1, 2))
        cy = (mass * yy).sum((1, 2)) / mass.sum((1, 2))
        torch.testing.assert_close(cx, new_pose[:, 3], atol=0.02, rtol=0)
        torch.testing.assert_close(cy, new_pose[:, 4], atol=0.02, rtol=0)
        mirrored = new_pose[:, 1].sign() != pose[:, 1].sign()
        torch.testing.assert_close(
            new_pose[:, 2].sign(), torch.where(mirrored, -1, 1) * pose[:, 2].sign()
        )
        assert torch.equal(new_pose[:, 0], pose[:, 0])
        zoom = (new_pose[:, 5] - pose[:, 5]).exp()
        assert ((zoom > 1 / 1.2 - 1e-6) & (zoom < 1.2 + 1e-6)).all()
        seen_mirror.update(mirrored.tolist())
    assert seen_mirror == {True, False}


def test_pose_training_overfits_the_fake_dataset(fake_dataset, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "pose.safetensors"
    result = train_pose_network(
        fake_dataset,
        out,
        config="megaportraits-tiny",
        steps=POSE_STEPS,
        batch_size=8,
        lr=3e-3,
        image_size=32,
        augment=False,
        progress=False,
    )
    assert out.is_file() and len(result.losses) == POSE_STEPS
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert result.heldout_frames == 4 and math.isfinite(result.heldout_error_deg)
    assert set(result.heldout_angle_errors_deg) == {"pitch", "yaw", "roll"}
    network = HeadPoseNetwork(preset("megaportraits-tiny", pose_image_size=32)).load(out)
    torch.testing.assert_close(network.pose_mean[5], torch.tensor(-1.2))


def test_pose_training_command(fake_dataset, tmp_path, capsys):
    out = tmp_path / "pose.safetensors"
    args = [str(fake_dataset), "--out", str(out), "--preset", "megaportraits-tiny"]
    assert main([*args, "--steps", "2", "--batch-size", "4", "--image-size", "32"]) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()
    with pytest.raises(InputError, match=r"\.safetensors"):
        main([str(fake_dataset), "--out", str(tmp_path / "pose.pth"), "--steps", "1"])
