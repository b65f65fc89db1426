"""Face parser: the published layout, the class order behind each mask, input handling and
loading through the registry (with a small file the test makes itself; the published one is
not available here)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from neuralhead import weights
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.pretrained.face_parser import CLASSES, REGIONS, FaceParser, region_masks


class _Stop(Exception):
    """Raised by a hook to end a forward pass once its input has been seen."""


@pytest.fixture(scope="module")
def model() -> FaceParser:
    torch.manual_seed(0)
    return FaceParser()


def test_state_dict_has_the_published_names_and_shapes(model):
    # Names and shapes from zllrunning/face-parsing.PyTorch's model.py and resnet.py, which
    # wrote 79999_iter.pth.
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "cp.resnet.conv1.weight": (64, 3, 7, 7),
        "cp.resnet.bn1.running_mean": (64,),
        "cp.resnet.layer1.0.conv1.weight": (64, 64, 3, 3),
        "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "cp.resnet.layer2.0.downsample.1.running_var": (128,),
        "cp.resnet.layer4.1.bn2.bias": (512,),
        "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
        "cp.arm16.conv_atten.weight": (128, 128, 1, 1),
        "cp.arm32.bn_atten.running_mean": (128,),
        "cp.conv_head32.conv.weight": (128, 128, 3, 3),
        "cp.conv_avg.conv.weight": (128, 512, 1, 1),
        "ffm.convblk.conv.weight": (256, 256, 1, 1),
        "ffm.conv1.weight": (64, 256, 1, 1),
        "ffm.conv2.weight": (256, 64, 1, 1),
        "conv_out.conv.conv.weight": (256, 256, 3, 3),
        "conv_out.conv_out.weight": (19, 256, 1, 1),
        "conv_out16.conv_out.weight": (19, 64, 1, 1),
        "conv_out32.conv.bn.weight": (64,),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    assert "cp.resnet.layer1.0.downsample.0.weight" not in shapes
    assert "mean" not in shapes and "std" not in shapes
    # A public port of the release counts 191 tensors in it.
    assert len(shapes) == 191


def test_logits_come_back_at_the_input_size(model):
    torch.manual_seed(1)
    logits = model(torch.rand(2, 3, 40, 56))
    assert logits.shape == (2, 19, 40, 56)
    assert torch.isfinite(logits).all()


def test_input_is_resized_to_512_and_normalised_with_imagenet_statistics(model):
    seen = []

    def capture(_module, args):
        seen.append(args[0])
        raise _Stop

    handle = model.cp.resnet.conv1.register_forward_pre_hook(capture)
    try:
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        with pytest.raises(_Stop):
            model(mean.expand(1, 3, 64, 96).clone())
    finally:
        handle.remove()
    assert seen[0].shape == (1, 3, 512, 512)
    assert seen[0].abs().max() < 1e-5


def test_class_order_is_celebamask_hq_with_background_first():
    assert len(CLASSES) == 19
    assert CLASSES.index("background") == 0
    assert (CLASSES.index("l_eye"), CLASSES.index("r_eye")) == (4, 5)
    assert [CLASSES.index(n) for n in ("mouth", "u_lip", "l_lip")] == [11, 12, 13]
    assert (CLASSES.index("l_ear"), CLASSES.index("r_ear"), CLASSES.index("hair")) == (7, 8, 17)


def test_masks_cover_exactly_their_classes(model, monkeypatch):
    # One pixel per class, in a 1 x 19 image, chosen by hand-built logits.
    labels = torch.arange(19).view(1, 1, 19)
    logits = torch.nn.functional.one_hot(labels, 19).permute(0, 3, 1, 2).float()
    monkeypatch.setattr(model, "forward", lambda images: logits)
    masks = model.masks(torch.rand(1, 3, 1, 19))
    assert set(masks) == {"eyes", "mouth", "ears", "face", "hair", "foreground"}
    covered = {
        region: mask.flatten().nonzero().flatten().tolist() for region, mask in masks.items()
    }
    assert covered["eyes"] == [4, 5]
    assert covered["mouth"] == [11, 12, 13]
    assert covered["ears"] == [7, 8]
    assert covered["hair"] == [17]
    assert covered["face"] == [1, 2, 3, 4, 5, 6, 10, 11, 12, 13]
    assert covered["foreground"] == list(range(1, 19))
    for mask in masks.values():
        assert mask.shape == (1, 1, 1, 19) and mask.dtype == torch.float32


def test_masks_of_a_real_forward_pass_are_binary_and_nested(model):
    torch.manual_seed(2)
    images = torch.rand(2, 3, 24, 32, dtype=torch.float64)
    masks = model.masks(images)
    for mask in masks.values():
        assert mask.shape == (2, 1, 24, 32) and mask.dtype == torch.float64
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for part in ("eyes", "mouth"):
        assert torch.all(masks[part] <= masks["face"])
    for part in ("face", "hair", "ears"):
        assert torch.all(masks[part] <= masks["foreground"])


def test_region_masks_rejects_logits():
    with pytest.raises(InputError, match=r"\(B, H, W\)"):
        region_masks(torch.zeros(1, 19, 4, 4))
    assert set(REGIONS) == set(region_masks(torch.zeros(1, 4, 4, dtype=torch.long)))


def test_bad_input_and_eval_mode(model):
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 4, 32, 32))
    model.train()
    assert not model.training and not model.cp.resnet.bn1.training
    assert not any(p.requires_grad for p in model.parameters())


@pytest.fixture
def published_like_file(model, tmp_path, monkeypatch):
    """79999_iter.pth as published (a pickled state dict), registered with its own digest."""
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_REGISTRY", dict(weights._REGISTRY))
    monkeypatch.setattr(weights, "_VERIFIED", {})
    path = tmp_path / "79999_iter.pth"
    torch.save(model.state_dict(), path)
    data = path.read_bytes()
    entry = weights.get_weights("face-parser-bisenet")
    weights._REGISTRY[entry.name] = dataclasses.replace(
        entry, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    return path


def test_round_trip_through_the_registry(published_like_file, model):
    with pytest.raises(WeightsMissingError, match="79999_iter.pth not found") as info:
        FaceParser.from_pretrained()
    assert "neuralhead weights download face-parser-bisenet" in str(info.value)
    cache = weights.cache_dir()
    cache.mkdir()
    (cache / "79999_iter.pth").write_bytes(published_like_file.read_bytes())
    loaded = FaceParser.from_pretrained()
    images = torch.rand(1, 3, 32, 32)
    assert torch.equal(loaded(images), model(images))
    assert torch.equal(
        FaceParser.from_pretrained(published_like_file).ffm.conv1.weight, model.ffm.conv1.weight
    )


def test_a_file_with_other_names_is_refused(published_like_file, model, tmp_path):
    renamed = {k.replace("cp.arm16", "cp.arm8"): v for k, v in model.state_dict().items()}
    path = tmp_path / "renamed" / "79999_iter.pth"
    path.parent.mkdir()
    torch.save(renamed, path)
    data = path.read_bytes()
    entry = weights.get_weights("face-parser-bisenet")
    weights._REGISTRY[entry.name] = dataclasses.replace(
        entry, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    with pytest.raises(RuntimeError, match="Missing key"):
        FaceParser.from_pretrained(path)
