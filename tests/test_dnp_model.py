"""Dynamic Neural Portraits, the model: encoding, presets, shapes, gradients, Eq. 4, persistence."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fake_data import make_dataset
from torch import nn

from neuralhead.data.dataset import PortraitDataset
from neuralhead.dnp.audio_network import AudioAttention
from neuralhead.dnp.config import PRESETS, DNPConfig, preset
from neuralhead.dnp.losses import reconstruction_loss
from neuralhead.dnp.model import DNPOutput, DynamicNeuralPortrait
from neuralhead.dnp.trainer import DNPTrainOptions, build_config
from neuralhead.errors import InputError
from neuralhead.nn.positional_encoding import PositionalEncoding
from neuralhead.nn.pretrained import PretrainedModel

TINY = ["dnp-test", "dnp-test-audio", "dnp-tiny", "dnp-tiny-audio"]
ALL = sorted(PRESETS) + ["dnp-test-audio"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("dnp") / "data")


def _inputs(config: DNPConfig, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "pose": torch.randn(batch, 6, generator=g),
        "gaze": torch.randn(batch, 2, generator=g),
        "expression": torch.randn(batch, config.num_expression, generator=g),
        "frame_index": torch.randint(0, config.num_latents, (batch,), generator=g),
    }
    if config.driver == "audio":
        shape = (batch, config.audio_attention_frames, config.audio_window, config.audio_dim)
        inputs["audio"] = torch.randn(*shape, generator=g)
    return inputs


def _model(name: str, seed: int = 0, **overrides) -> DynamicNeuralPortrait:
    torch.manual_seed(seed)
    return DynamicNeuralPortrait(preset(name, num_latents=5, **overrides))


# ------------------------------------------------------------------ positional encoding (Eq. 3)
def test_positional_encoding_hand_computed():
    # Layout per input component: [x, sin(2^0 πx) .. sin(2^{N-1} πx), cos(2^0 πx) .. cos(...)].
    out = PositionalEncoding(1, 2)(torch.tensor([[0.25]]))
    s = math.sqrt(0.5)
    expected = torch.tensor([[0.25, s, 1.0, s, 0.0]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_positional_encoding_components_are_blocks():
    enc = PositionalEncoding(2, 3)
    x = torch.tensor([[0.1, -0.7]])
    out = enc(x)
    assert out.shape == (1, 2 * 7)
    for i in range(2):
        torch.testing.assert_close(
            out[:, 7 * i : 7 * (i + 1)], PositionalEncoding(1, 3)(x[:, i : i + 1])
        )


@pytest.mark.parametrize(
    "in_features, n, include_input", [(1, 2, True), (2, 8, True), (6, 3, True), (3, 4, False)]
)
def test_positional_encoding_out_features(in_features, n, include_input):
    enc = PositionalEncoding(in_features, n, include_input=include_input)
    assert enc.out_features == in_features * (2 * n + int(include_input))
    assert enc(torch.zeros(4, 5, in_features)).shape == (4, 5, enc.out_features)


# ------------------------------------------------------------------ presets: build, shapes, gradients
@pytest.mark.parametrize("name", ALL)
def test_every_preset_builds_with_the_right_shapes(name):
    config = preset(name, num_latents=3)
    b = 2
    if name in TINY:
        model = DynamicNeuralPortrait(config)
        with torch.no_grad():
            out = model(**_inputs(config, b))
    else:
        # The large presets run on the meta device: shapes without the arithmetic.
        with torch.device("meta"):
            model = DynamicNeuralPortrait(config)
            out = model(**_meta_inputs(config, b))
    h, hf = config.image_size, config.feature_size
    assert out.image.shape == (b, 3, h, h)
    assert out.rgb.shape == (b, 3, hf, hf)
    assert out.features.shape == (b, config.feature_channels, hf, hf)
    assert len(model.decoder.stages) == int(math.log2(h // hf))


def _meta_inputs(config: DNPConfig, b: int) -> dict[str, torch.Tensor]:
    return {
        "pose": torch.zeros(b, 6),
        "gaze": torch.zeros(b, 2),
        "expression": torch.zeros(b, config.num_expression),
        "frame_index": torch.zeros(b, dtype=torch.long),
    }


def _backward(model: DynamicNeuralPortrait, inputs: dict[str, torch.Tensor]) -> DNPOutput:
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    target = torch.rand_like(out.image) * 2 - 1
    reconstruction_loss(out, target)["total"].backward()
    return out


def _without_grad(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


@pytest.mark.parametrize("name", [n for n in TINY if not n.endswith("-audio")])
def test_expression_driver_gradients_reach_every_parameter(name):
    model = _model(name)
    inputs = _inputs(model.config, 3)
    out = _backward(model, inputs)
    assert torch.isfinite(out.image).all()
    assert _without_grad(model) == []
    # Of the latent codes v_i, exactly those of the frames in the batch are trained.
    rows = model.latents.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    assert rows == sorted(set(inputs["frame_index"].tolist()))


@pytest.mark.parametrize("name", [n for n in TINY if n.endswith("-audio")])
def test_audio_driver_gradients_reach_every_parameter(name):
    model = _model(name)
    inputs = _inputs(model.config)
    model.audio_attention_active.fill_(False)
    _backward(model, inputs)
    # Before the switch-on step α_i = a_i: the attention filter is not used, hence no gradient.
    assert sorted(_without_grad(model)) == sorted(
        f"audio_att.{n}" for n, _ in model.audio_att.named_parameters()
    )
    assert all(p.grad is None for p in model.audio_att.parameters())
    model.audio_attention_active.fill_(True)
    _backward(model, inputs)
    assert _without_grad(model) == []


# ------------------------------------------------------------------ the coordinate MLP (Eq. 2)
def test_factorised_first_layer_equals_concatenated_form():
    model = _model("dnp-test")
    mlp = model.mlp
    layer = mlp.layers[0]
    cond = model.conditioning(**{k: v for k, v in _inputs(model.config, 3).items()})
    coords = mlp.coord_encoding(mlp.coords)  # (P, Cx)
    plain = nn.Linear(coords.shape[1] + cond.shape[1], layer.coord.out_features)
    with torch.no_grad():
        plain.weight.copy_(torch.cat([layer.coord.weight, layer.cond.weight], 1))
        plain.bias.copy_(layer.coord.bias)
    p = coords.shape[0]
    concatenated = torch.cat([coords[None].expand(3, -1, -1), cond[:, None].expand(-1, p, -1)], -1)
    torch.testing.assert_close(layer(coords, cond), plain(concatenated), atol=1e-5, rtol=1e-5)


def test_coordinate_mlp_equals_per_pixel_evaluation():
    """The whole F (with a skip layer) evaluated pixel by pixel on [γ(x), cond] as in Eq. 2."""
    model = _model("dnp-tiny", feature_size=8, image_size=16)
    mlp = model.mlp
    assert mlp.skips == (2,)
    cond = model.conditioning(**_inputs(model.config, 2))
    g = mlp.grid_size
    features, rgb = mlp(cond)
    for row, col in [(0, 0), (0, g - 1), (g - 1, 0), (3, 5)]:
        x = torch.tensor([(col + 0.5) / g, (row + 0.5) / g])  # x ∈ [0, 1]^2, x along the width
        inp = torch.cat([mlp.coord_encoding(x)[None].expand(2, -1), cond], 1)
        h = None
        for i, layer in enumerate(mlp.layers):
            if i == 0:
                h = inp @ torch.cat([layer.coord.weight, layer.cond.weight], 1).T + layer.coord.bias
            elif i in mlp.skips:
                w = torch.cat([layer.hidden.weight, layer.coord.weight, layer.cond.weight], 1)
                h = torch.cat([h, inp], 1) @ w.T + layer.coord.bias
            else:
                h = layer(h)
            h = torch.relu(h)
        torch.testing.assert_close(
            features[:, :, row, col], mlp.feature_head(h), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(rgb[:, :, row, col], mlp.rgb_head(h), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ audio attention (Sec. 3.3)
def test_attention_weights_sum_to_one():
    torch.manual_seed(0)
    att = AudioAttention(16, 8)
    w = att.weights(torch.randn(5, 8, 16) * 3)
    assert w.shape == (5, 8)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(5))


def test_alpha_is_a_convex_combination_of_the_eight_codes():
    model = _model("dnp-test-audio")
    audio = _inputs(model.config, 4)["audio"]
    windows = (audio - model.audio_mean) / model.audio_std
    codes = model.audio_net(windows.flatten(0, 1)).view(4, 8, -1)
    model.audio_attention_active.fill_(True)
    alpha = model.drive_code(None, audio)
    w = model.audio_att.weights(codes)
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    torch.testing.assert_close(alpha, (w[..., None] * codes).sum(1))
    lo, hi = codes.min(1).values, codes.max(1).values
    assert ((alpha >= lo - 1e-6) & (alpha <= hi + 1e-6)).all()
    assert not torch.allclose(alpha, codes[:, 3])
    # Switched off, α_i is the frame's own code a_i (position u - 1 of i-u+1 .. i+u).
    model.audio_attention_active.fill_(False)
    torch.testing.assert_close(model.drive_code(None, audio), codes[:, 3])


# ------------------------------------------------------------------ Eq. 4
def test_reconstruction_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 8, 8, generator=g)
    rgb = torch.randn(2, 3, 2, 2, generator=g)
    target = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    terms = reconstruction_loss(
        DNPOutput(image=image, rgb=rgb, features=torch.zeros(2, 1, 2, 2)), target
    )
    small = target.reshape(2, 3, 2, 4, 2, 4).mean((3, 5))  # I'_i: 4x4 blocks averaged
    rec = ((image - target) ** 2).mean()
    rec_low = ((rgb - small) ** 2).mean()
    torch.testing.assert_close(terms["rec"], rec)
    torch.testing.assert_close(terms["rec_lowres"], rec_low)
    torch.testing.assert_close(terms["total"], rec + rec_low)
    # Not a nearest-neighbour down-scaling.
    nearest = F.interpolate(target, size=(2, 2), mode="nearest")
    assert not torch.allclose(terms["rec_lowres"], ((rgb - nearest) ** 2).mean())

    no_rgb = reconstruction_loss(DNPOutput(image=image, rgb=None, features=torch.zeros(1)), target)
    assert set(no_rgb) == {"rec", "total"}
    torch.testing.assert_close(no_rgb["total"], rec)


def test_loss_falls_when_overfitting_eight_frames(data):
    dataset = PortraitDataset(data, "train", cache=True, progress=False)
    config = build_config(dataset, DNPTrainOptions(preset="dnp-test"))
    batch = dataset.batch(list(range(0, 32, 4)))
    torch.manual_seed(0)
    model = DynamicNeuralPortrait(config)
    model.set_input_statistics(batch["pose"], batch["gaze"], batch["expression"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        out = model(batch["pose"], batch["gaze"], batch["expression"], frame_index=batch["index"])
        terms = reconstruction_loss(out, batch["image"])
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        losses.append({k: float(v.detach()) for k, v in terms.items()})
    first, last = losses[0], losses[-1]
    assert last["total"] < first["total"] / 8, (first, last)
    assert last["rec"] < first["rec"] / 4 and last["rec_lowres"] < first["rec_lowres"] / 4


# ------------------------------------------------------------------ save_pretrained / from_pretrained
@pytest.mark.parametrize("name", ["dnp-test", "dnp-test-audio"])
def test_pretrained_round_trip(tmp_path, name):
    model = _model(name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    stats = torch.randn(20, 6, generator=g), torch.randn(20, 2, generator=g)
    expr = torch.randn(20, model.config.num_expression, generator=g)
    audio = torch.randn(20, 16, 29, generator=g) if name.endswith("audio") else None
    model.set_input_statistics(*stats, expr, audio)
    if name.endswith("audio"):
        model.audio_attention_active.fill_(True)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = DynamicNeuralPortrait.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    inputs = _inputs(model.config, 3)
    with torch.no_grad():
        out_a, out_b = model.eval()(**inputs), loaded.eval()(**inputs)
    assert torch.equal(out_a.image, out_b.image) and torch.equal(out_a.rgb, out_b.rgb)


class _OtherModel(PretrainedModel):
    config_class = DNPConfig


def test_from_pretrained_rejects_other_classes_and_missing_files(tmp_path):
    DynamicNeuralPortrait(preset("dnp-test")).save_pretrained(tmp_path / "dnp")
    with pytest.raises(InputError, match="DynamicNeuralPortrait, not a _OtherModel"):
        _OtherModel.from_pretrained(tmp_path / "dnp")

    other = tmp_path / "other"
    _OtherModel(preset("dnp-test")).save_pretrained(other)
    with pytest.raises(InputError, match="holds a _OtherModel"):
        DynamicNeuralPortrait.from_pretrained(other)

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="does not hold a saved model"):
        DynamicNeuralPortrait.from_pretrained(tmp_path / "empty")
    (tmp_path / "dnp" / "model.safetensors").unlink()
    with pytest.raises(InputError, match="model.safetensors"):
        DynamicNeuralPortrait.from_pretrained(tmp_path / "dnp")


def test_unknown_config_fields_raise_input_error(tmp_path):
    DynamicNeuralPortrait(preset("dnp-test")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mlp_wdth"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="unknown DNPConfig fields: mlp_wdth"):
        DynamicNeuralPortrait.from_pretrained(tmp_path)


# ------------------------------------------------------------------ invalid configs
@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"image_size": 96, "feature_size": 32, "decoder_channels": (8,)},
            "must be a power of two, got 96/32",
        ),
        (
            {"image_size": 32, "feature_size": 64, "decoder_channels": ()},
            "must be a power of two, got 32/64",
        ),
        ({"decoder_channels": (16,)}, "decoder_channels needs 2 entries for 8 -> 32, got 1"),
        ({"decoder_channels": (16, 8, 4)}, "decoder_channels needs 2 entries"),
        ({"driver": "video"}, "driver must be 'expression' or 'audio', got 'video'"),
        ({"mlp_skips": (2,)}, r"mlp_skips must index hidden layers 0\.\.1"),
    ],
)
def test_invalid_configs_raise_value_error(fields, message):
    with pytest.raises(ValueError, match=message):
        replace(PRESETS["dnp-test"], **fields)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(KeyError) as info:
        preset("dnp-2048")
    message = str(info.value)
    assert "unknown DNP preset 'dnp-2048'" in message
    for name in ALL + ["dnp-1024-audio"]:
        assert name in message


def test_build_config_turns_bad_presets_and_overrides_into_input_errors(data):
    dataset = PortraitDataset(data, "train", progress=False)
    config = build_config(dataset, DNPTrainOptions(preset="dnp-test-audio"))
    assert (config.num_expression, config.num_latents, config.audio_dim) == (4, 36, 29)
    with pytest.raises(InputError, match="available: dnp-1024"):
        build_config(dataset, DNPTrainOptions(preset="nope"))
    with pytest.raises(InputError, match="power of two"):
        build_config(
            dataset, DNPTrainOptions(preset="dnp-test", model_overrides={"feature_size": 12})
        )
    with pytest.raises(InputError, match="mlp_wdth"):
        build_config(dataset, DNPTrainOptions(preset="dnp-test", model_overrides={"mlp_wdth": 3}))
