"""ResNet-18/34/50: torchvision's parameter names and shapes, forward shapes, the GroupNorm and
weight-standardised variants, and loading through the weights registry (with small files the
tests make themselves)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
from torch import nn

from neuralhead import weights
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.nn.resnet import ResNet, imagenet_normalize, resnet18, resnet34, resnet50


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _on_meta(build, **options) -> ResNet:
    """Build without allocating or initialising real weights (only names and shapes matter)."""
    with torch.device("meta"):
        return build(**options)


def test_resnet18_state_dict_matches_torchvision():
    shapes = _shapes(_on_meta(resnet18))
    # torchvision's resnet18(): stem 6 entries, 8 blocks of 12, 3 shortcuts of 6, fc 2.
    assert len(shapes) == 122
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["bn1.running_mean"] == (64,)
    assert shapes["layer1.0.conv1.weight"] == (64, 64, 3, 3)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert shapes["layer2.0.downsample.1.num_batches_tracked"] == ()
    assert shapes["layer4.1.bn2.running_var"] == (512,)
    assert shapes["fc.weight"] == (1000, 512) and shapes["fc.bias"] == (1000,)
    assert "layer1.0.downsample.0.weight" not in shapes
    assert sum(p.numel() for p in _on_meta(resnet18).parameters()) == 11_689_512


def test_resnet50_state_dict_matches_torchvision():
    model = _on_meta(resnet50)
    shapes = _shapes(model)
    # Stem 6, 16 bottlenecks of 18, 4 shortcuts of 6 (layer1's widens 64 -> 256), fc 2.
    assert len(shapes) == 320
    assert shapes["layer1.0.downsample.1.running_mean"] == (256,)
    assert shapes["layer3.5.bn3.num_batches_tracked"] == ()
    assert shapes["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert shapes["layer4.1.bn2.running_var"] == (512,)
    assert shapes["fc.weight"] == (1000, 2048)
    # v1.5: the bottleneck strides in its 3x3 convolution.
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert len(_shapes(_on_meta(resnet34))) == 218


def test_forward_shapes():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 64, 48)
    small = resnet18(width=16, num_classes=7)
    assert small.features(image).shape == (2, 128, 2, 2)
    assert small(image).shape == (2, 7)
    big = resnet50(num_classes=None, width=8).eval()
    assert big.feature_channels == 256
    assert big.features(torch.rand(1, 3, 64, 64)).shape == (1, 256, 2, 2)
    with pytest.raises(InputError, match="without a head"):
        big(torch.rand(1, 3, 64, 64))


def test_group_norm_and_weight_standardised_variant():
    torch.manual_seed(0)
    model = ResNet(
        "bottleneck",
        (1, 1, 1, 1),
        width=16,
        norm="group",
        groups=8,
        weight_standardization=True,
        num_classes=3,
    )
    shapes = _shapes(model)
    assert isinstance(model.bn1, nn.GroupNorm) and model.bn1.num_groups == 8
    assert not any("running" in key for key in shapes)
    # A.1: the stem is not standardised, the other convolutions are.
    assert "conv1.weight" in shapes
    standardised = model.layer1[0].conv2.weight
    assert "layer1.0.conv2.parametrizations.weight.original" in shapes
    torch.testing.assert_close(standardised.mean(dim=(1, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0)
    out = model(torch.rand(2, 3, 32, 32))
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_dropout_acts_before_the_head_in_training_only():
    torch.manual_seed(0)
    model = resnet18(width=8, num_classes=4, dropout=0.5)
    image = torch.rand(2, 3, 32, 32)
    assert not torch.equal(model(image), model(image))
    model.eval()
    assert torch.equal(model(image), model(image))


def test_zero_init_residual_starts_blocks_at_identity():
    model = resnet18(width=8, zero_init_residual=True)
    assert all(block.bn2.weight.abs().sum() == 0 for block in model.layer1)
    x = torch.rand(1, 8, 8, 8)
    block = model.layer1[0]
    torch.testing.assert_close(block(x), torch.relu(x))


def test_bad_options_and_inputs_are_refused():
    with pytest.raises(InputError, match="four stages"):
        ResNet("basic", (2, 2, 2))
    with pytest.raises(InputError, match="unknown ResNet block"):
        ResNet("wide", (2, 2, 2, 2))
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        resnet18(width=8).features(torch.rand(1, 1, 32, 32))


def test_imagenet_normalize():
    out = imagenet_normalize(torch.full((1, 3, 2, 2), 0.5))
    expected = torch.tensor([(0.5 - 0.485) / 0.229, (0.5 - 0.456) / 0.224, (0.5 - 0.406) / 0.225])
    torch.testing.assert_close(out[0, :, 1, 1], expected)


# ----------------------------------------------------------------------------- registry
@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A private copy of the registry and an empty cache directory in tmp_path."""
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_REGISTRY", dict(weights._REGISTRY))
    monkeypatch.setattr(weights, "_VERIFIED", {})
    return tmp_path


def test_registry_entries():
    r18 = weights.get_weights("resnet18-imagenet")
    assert r18.filename == "resnet18-f37072fd.pth" and r18.sha256.startswith("f37072fd")
    assert r18.url == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    r50 = weights.get_weights("resnet50-imagenet")
    assert r50.filename == "resnet50-0676ba61.pth" and r50.sha256.startswith("0676ba61")
    assert _on_meta(resnet18).imagenet_weights_name == "resnet18-imagenet"
    assert _on_meta(resnet50).imagenet_weights_name == "resnet50-imagenet"
    assert _on_meta(resnet34).imagenet_weights_name is None
    assert _on_meta(resnet18, norm="group").imagenet_weights_name is None
    assert _on_meta(resnet50, width=32).imagenet_weights_name is None


def test_resnet18_round_trip_through_the_registry(registry):
    torch.manual_seed(1)
    original = resnet18().eval()
    path = registry / "resnet18-f37072fd.pth"
    torch.save(original.state_dict(), path)
    data = path.read_bytes()
    weights._REGISTRY["resnet18-imagenet"] = dataclasses.replace(
        weights.get_weights("resnet18-imagenet"),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )
    image = torch.rand(1, 3, 32, 32)

    loaded = resnet18().load_imagenet(path).eval()
    torch.testing.assert_close(loaded(image), original(image), rtol=0, atol=0)

    # A network with its own head takes the trunk and keeps its head.
    headed = resnet18(num_classes=6)
    head = headed.fc.weight.clone()
    headed.load_imagenet(path).eval()
    torch.testing.assert_close(headed.features(image), original.features(image), rtol=0, atol=0)
    assert torch.equal(headed.fc.weight, head)

    cache = weights.cache_dir()
    cache.mkdir()
    (cache / path.name).write_bytes(data)
    from_cache = resnet18(num_classes=None).load_imagenet().eval()
    torch.testing.assert_close(from_cache.features(image), original.features(image), rtol=0, atol=0)


def test_incompatible_networks_and_missing_files_are_explained(registry):
    with pytest.raises(InputError, match="no ImageNet weights.*norm 'group'"):
        _on_meta(resnet18, norm="group").load_imagenet()
    with pytest.raises(WeightsMissingError) as missing:
        _on_meta(resnet50).load_imagenet()
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in str(missing.value)
    state = resnet18(width=8).state_dict()
    del state["layer4.1.conv2.weight"]
    with pytest.raises(InputError, match="lack layer4.1.conv2.weight"):
        resnet18(width=8).load_published(state)
    with pytest.raises(
        InputError,
        match=r"conv1.weight has shape \(8, 3, 7, 7\) in the weights but \(16, 3, 7, 7\)",
    ):
        resnet18(width=16).load_published(resnet18(width=8).state_dict())
