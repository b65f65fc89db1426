"""ArcFace: the published layout, embeddings, input handling and loading through the registry
(with small files the tests make themselves; the released weights are not available here)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from neuralhead import weights
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.pretrained.arcface import ARCH_BLOCKS, ArcFace, weights_name


@pytest.fixture(scope="module")
def model() -> ArcFace:
    torch.manual_seed(0)
    return ArcFace(arch="r18")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    directory.mkdir()
    monkeypatch.setenv("NEURALHEAD_WEIGHTS", str(directory))
    return directory


def test_state_dict_has_the_published_names_and_shapes(model):
    # Names and shapes from insightface's recognition/arcface_torch/backbones/iresnet.py,
    # which wrote the released backbone.pth files.
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "conv1.weight": (64, 3, 3, 3),
        "bn1.running_var": (64,),
        "prelu.weight": (64,),
        "layer1.0.bn1.weight": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.0.prelu.weight": (64,),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.bn3.bias": (64,),
        "layer1.0.downsample.0.weight": (64, 64, 1, 1),
        "layer1.0.downsample.1.running_mean": (64,),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer4.1.bn3.weight": (512,),
        "bn2.weight": (512,),
        "fc.weight": (512, 512 * 7 * 7),
        "fc.bias": (512,),
        "features.weight": (512,),
        "features.running_mean": (512,),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    assert "layer1.1.downsample.0.weight" not in shapes


@pytest.mark.parametrize("arch", list(ARCH_BLOCKS))
def test_block_counts_per_depth(arch):
    with torch.device("meta"):
        network = ArcFace(arch=arch)
    names = network.state_dict().keys()
    for stage, blocks in enumerate(ARCH_BLOCKS[arch], start=1):
        assert f"layer{stage}.{blocks - 1}.bn3.weight" in names
        assert f"layer{stage}.{blocks}.bn3.weight" not in names
    if arch == "r100":
        # 49 blocks of 18 tensors, 4 shortcuts of 6, stem 7, head 12.
        assert len(names) == 49 * 18 + 4 * 6 + 7 + 12


def test_embeddings_are_unit_length_and_differ_between_images(model):
    torch.manual_seed(1)
    images = torch.rand(3, 3, 64, 80)
    out = model(images)
    assert out.shape == (3, 512)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert (out[0] @ out[1]).abs() < 0.999
    assert torch.allclose(model(images[:1]), out[:1], atol=1e-5)


def test_input_is_resized_to_112_and_mapped_to_minus_one_one(model):
    seen = []
    handle = model.conv1.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        model(torch.zeros(1, 3, 200, 160))
        model(torch.ones(1, 3, 112, 112))
    finally:
        handle.remove()
    assert seen[0].shape == (1, 3, 112, 112)
    assert torch.allclose(seen[0], torch.full_like(seen[0], -1.0))
    assert torch.allclose(seen[1], torch.ones_like(seen[1]))


def test_gradients_reach_the_input_but_not_the_frozen_weights(model):
    torch.manual_seed(2)
    a = torch.rand(2, 3, 112, 112, requires_grad=True)
    b = torch.rand(2, 3, 112, 112)
    loss = 1 - (model(a) * model(b)).sum(dim=1).mean()
    loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_stays_in_eval_mode(model):
    model.train()
    assert not model.training and not model.features.training


def test_bad_input_is_refused(model):
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 112, 112))
    with pytest.raises(InputError, match="unknown ArcFace arch 'r42'"):
        ArcFace(arch="r42")


def test_missing_file_says_where_it_is_published_and_how_to_convert(cache):
    with pytest.raises(WeightsMissingError) as info:
        ArcFace.from_pretrained()
    message = str(info.value)
    assert "arcface-r100-ms1mv3.safetensors not found" in message
    assert "ms1mv3_arcface_r100_fp16/backbone.pth" in message
    assert "save_file" in message and str(cache) in message


def test_round_trip_through_the_registry(model, cache, tmp_path):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(cache / f"{weights_name('r18')}.safetensors"))
    images = torch.rand(2, 3, 112, 112)
    loaded = ArcFace.from_pretrained(arch="r18")
    assert loaded.arch == "r18"
    assert torch.equal(loaded(images), model(images))
    explicit = ArcFace.from_pretrained(cache, arch="r18")
    assert torch.equal(explicit.fc.weight, model.fc.weight)


def test_the_documented_conversion_command_produces_a_loadable_file(model, cache, monkeypatch):
    # Run the command of the registry's `obtain` text on a backbone.pth as arcface_torch saves
    # it (a pickled state dict), then load the result.
    entry = weights.get_weights(weights_name("r18"))
    code = re.search(r'python -c "(.+?)"', entry.obtain).group(1)
    torch.save(model.state_dict(), cache / "backbone.pth")
    monkeypatch.chdir(cache)
    exec(code, {})
    loaded = ArcFace.from_pretrained(arch="r18")
    assert torch.equal(loaded.layer3[0].bn1.running_var, model.layer3[0].bn1.running_var)
