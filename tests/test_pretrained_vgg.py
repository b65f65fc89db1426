"""VGG19, VGG16 and VGGFace feature networks: layer selection, shapes, parameter names of the
published files, input normalisation, and loading through the weights registry (with small
files the tests make themselves)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from neuralhead import weights
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.pretrained.vgg import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VGG16,
    VGG19,
    vgg_layer_names,
)
from neuralhead.pretrained.vggface import VGGFACE_MEAN, VGGFace

# Indices of the convolutions in torchvision's vgg19().features / vgg16().features.
VGG19_CONVS = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
CHANNELS = (64, 64, 128, 128) + (256,) * 4 + (512,) * 8


def _torchvision_shapes(convs: tuple[int, ...], channels: tuple[int, ...]) -> dict[str, tuple]:
    shapes, cin = {}, 3
    for index, cout in zip(convs, channels):
        shapes[f"features.{index}.weight"] = (cout, cin, 3, 3)
        shapes[f"features.{index}.bias"] = (cout,)
        cin = cout
    return shapes


def _shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_vgg19_default_layers_have_the_right_shapes():
    torch.manual_seed(0)
    model = VGG19()
    assert model.layers == ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    features = model(torch.rand(2, 3, 32, 48))
    assert [tuple(f.shape) for f in features] == [
        (2, 64, 32, 48),
        (2, 128, 16, 24),
        (2, 256, 8, 12),
        (2, 512, 4, 6),
        (2, 512, 2, 3),
    ]
    assert model.out_channels() == [64, 128, 256, 512, 512]
    # ReLU outputs of a sensibly initialised network: non-negative and not all zero.
    assert all((f >= 0).all() and f.abs().sum() > 0 for f in features)


def test_layers_come_back_in_the_requested_order_and_only_as_deep_as_needed():
    torch.manual_seed(0)
    model = VGG19(["relu2_1", "conv1_1", "pool1"])
    # conv1_1 relu1_1 conv1_2 relu1_2 pool1 conv2_1 relu2_1: seven modules, three convs.
    assert len(model.features) == 7
    assert max(int(k.split(".")[1]) for k in model.state_dict()) == 5
    relu2_1, conv1_1, pool1 = model(torch.rand(1, 3, 8, 8))
    assert relu2_1.shape == (1, 128, 4, 4)
    assert conv1_1.shape == (1, 64, 8, 8) and (conv1_1 < 0).any()
    assert pool1.shape == (1, 64, 4, 4)


def test_layer_names_follow_the_paper_tables():
    names = vgg_layer_names((2, 2, 4, 4, 4))
    assert len(names) == 37 and names[34] == "conv5_4" and names[36] == "pool5"
    assert vgg_layer_names((2, 2, 3, 3, 3))[29] == "relu5_3"


def test_unknown_layer_lists_the_valid_ones():
    with pytest.raises(InputError, match="unknown layer.*'relu6_1'.*valid: conv1_1, relu1_1"):
        VGG19(["relu1_1", "relu6_1"])
    with pytest.raises(InputError, match="relu5_4, pool5"):
        VGG19(["fc7"])
    with pytest.raises(InputError, match="relu5_3, pool5"):
        VGGFace(["relu5_4"])
    with pytest.raises(InputError, match="at least one layer"):
        VGG16([])


def test_bad_images_are_refused():
    model = VGG16(["relu3_3"])
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 16, 16))
    with pytest.raises(InputError, match="at least 4x4"):
        model(torch.rand(1, 3, 3, 16))


def test_parameter_names_match_torchvision():
    vgg19 = VGG19(["pool5"])
    assert _shapes(vgg19) == _torchvision_shapes(VGG19_CONVS, CHANNELS)
    assert tuple(vgg19.state_dict()["features.34.weight"].shape) == (512, 512, 3, 3)
    vgg16 = VGG16(["pool5"])
    channels16 = (64, 64, 128, 128, 256, 256, 256) + (512,) * 6
    assert _shapes(vgg16) == _torchvision_shapes(VGG16_CONVS, channels16)
    assert tuple(vgg16.state_dict()["features.28.weight"].shape) == (512, 512, 3, 3)


def test_parameter_names_match_vgg_face_dag():
    shapes = _shapes(VGGFace(["pool5"]))
    assert len(shapes) == 26
    assert shapes["conv1_1.weight"] == (64, 3, 3, 3)
    assert shapes["conv3_3.bias"] == (256,)
    assert shapes["conv5_3.weight"] == (512, 512, 3, 3)
    assert [k for k in shapes if k.endswith(".weight")][-1] == "conv5_3.weight"


def test_input_normalisation_matches_the_published_preprocessing():
    image = torch.full((1, 3, 4, 4), 0.5)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(VGG19().normalize(image)[0, :, 0, 0], (0.5 - mean) / std)
    # vgg_face_dag: RGB on the 0-255 scale minus the training mean, no division.
    expected = torch.tensor(
        [127.5 - 129.186279296875, 127.5 - 104.76238250732422, 127.5 - 93.59396362304688]
    )
    torch.testing.assert_close(VGGFace().normalize(image)[0, :, 0, 0], expected)
    assert VGGFACE_MEAN[0] > VGGFACE_MEAN[1] > VGGFACE_MEAN[2]  # red first: RGB order


def test_gradients_reach_the_input():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 16, 16, requires_grad=True)
    sum(f.sum() for f in VGGFace(["relu1_2", "relu3_1"])(image)).backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0


def test_width_multiplier_shrinks_every_layer():
    model = VGG16(["relu1_1", "relu5_3"], width=1 / 16)
    assert model.out_channels() == [4, 32]
    assert [f.shape[1] for f in model(torch.rand(1, 3, 16, 16))] == [4, 32]


# ----------------------------------------------------------------------------- registry
@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A private copy of the registry and an empty cache directory in tmp_path."""
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_REGISTRY", dict(weights._REGISTRY))
    monkeypatch.setattr(weights, "_VERIFIED", {})
    return tmp_path


def _pin(name: str, path) -> None:
    """Point the registry entry ``name`` at the test's own file (its real digest and size)."""
    data = path.read_bytes()
    weights._REGISTRY[name] = dataclasses.replace(
        weights.get_weights(name), sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )


def test_registry_entries():
    vgg19 = weights.get_weights("vgg19-imagenet")
    assert vgg19.filename == "vgg19-dcbb9e9d.pth"
    # torchvision names its files after the first 8 hex digits of the SHA-256.
    assert vgg19.sha256.startswith("dcbb9e9d") and vgg19.size == 574_673_361
    assert vgg19.url == "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
    vggface = weights.get_weights("vggface")
    assert vggface.sha256 is None and vggface.filename.endswith(".safetensors")
    assert VGG16.weights_name in {e.name for e in weights.registered_weights()}


def test_vgg19_round_trip_through_the_registry(registry):
    torch.manual_seed(1)
    layers = ("relu1_1", "relu3_1")
    original = VGG19(layers)
    state = dict(original.state_dict())
    # Like the published file: deeper layers and the classifier are present and ignored.
    state["features.34.weight"] = torch.zeros(2)
    state["classifier.6.bias"] = torch.zeros(2)
    path = registry / "vgg19-dcbb9e9d.pth"
    torch.save(state, path)
    _pin("vgg19-imagenet", path)

    loaded = VGG19.from_pretrained(path, layers=layers)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    image = torch.rand(2, 3, 16, 16)
    for got, expected in zip(loaded(image), original(image)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    cache = weights.cache_dir()
    cache.mkdir()
    (cache / path.name).write_bytes(path.read_bytes())
    from_cache = VGG19.from_pretrained(layers=layers)
    torch.testing.assert_close(from_cache(image)[1], original(image)[1], rtol=0, atol=0)


def test_incomplete_or_mismatched_weights_are_refused():
    shallow = VGG19(["relu1_1"]).state_dict()
    with pytest.raises(InputError, match="lack features.2.weight"):
        VGG19(["relu2_1"]).load_published(shallow)
    with pytest.raises(InputError, match=r"features.0.weight has shape \(64, 3, 3, 3\)"):
        VGG19(["relu1_1"], width=0.5).load_published(shallow)


def test_vggface_round_trip_through_the_registry(registry):
    torch.manual_seed(2)
    original = VGGFace(["relu1_2", "relu2_1"])
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    state["conv3_1.weight"] = torch.zeros(1)
    state["fc8.bias"] = torch.zeros(2622)
    save_file(state, str(registry / "vgg_face_dag.safetensors"))

    loaded = VGGFace.from_pretrained(registry, layers=["relu1_2", "relu2_1"])
    assert not any(p.requires_grad for p in loaded.parameters())
    image = torch.rand(1, 3, 8, 8)
    for got, expected in zip(loaded(image), original(image)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_missing_files_say_how_to_get_them(registry):
    with pytest.raises(WeightsMissingError) as missing:
        VGG19.from_pretrained()
    message = str(missing.value)
    assert "vgg19-dcbb9e9d.pth not found" in message
    assert "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in message
    assert "neuralhead weights download vgg19-imagenet" in message

    with pytest.raises(WeightsMissingError) as missing:
        VGGFace.from_pretrained()
    message = str(missing.value)
    assert "vgg_face_dag.safetensors not found" in message
    assert "albanie/models/pytorch-mcn/vgg_face_dag.pth" in message
    assert "save_file" in message and "NEURALHEAD_WEIGHTS" in message
