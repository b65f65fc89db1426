"""Audio embeddings (Whisper and the substitute), their dataset cache, and E_aud."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import make_dataset
from torch import nn

from neuralhead.emoportraits.audio_embedding import (
    CACHE_DIR,
    SubstituteEmbedder,
    WhisperEmbedder,
    dataset_audio_embeddings,
    load_audio_embedder,
    to_video_frames,
)
from neuralhead.emoportraits.audio_encoder import SpeechEncoderConfig, SpeechExpressionEncoder
from neuralhead.errors import InputError, WeightsMissingError


def _speech(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.1 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return (tone + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised one-layer Whisper (d_model 32) saved as safetensors."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=64,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("whisper") / "tiny-random"
    WhisperModel(config).save_pretrained(path, safe_serialization=True)
    WhisperFeatureExtractor().save_pretrained(path)
    return path


# -- substitute ---------------------------------------------------------------------------


def test_substitute_shape_and_determinism() -> None:
    waveform = _speech(3.2)
    embedder = load_audio_embedder()
    assert isinstance(embedder, SubstituteEmbedder)
    assert (embedder.name, embedder.dim) == ("substitute-384", 384)
    first = embedder.embed(waveform, 16000, 80, 25.0)
    assert first.shape == (80, 384) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(first, SubstituteEmbedder().embed(waveform.copy(), 16000, 80, 25.0))
    # Audio shorter or longer than the video still gives one row per frame.
    assert embedder.embed(waveform[:8000], 16000, 80, 25.0).shape == (80, 384)
    assert embedder.embed(waveform, 16000, 10, 25.0).shape == (10, 384)
    assert embedder.embed(np.zeros(0, np.float32), 16000, 3, 25.0).shape == (3, 384)


def test_substitute_follows_the_sound_in_time() -> None:
    """Silence for 1.6 s, then noise: frames before the onset look alike, after it differ."""
    waveform = np.zeros(int(3.2 * 16000), np.float32)
    waveform[int(1.6 * 16000) :] = 0.1 * np.random.default_rng(0).standard_normal(int(1.6 * 16000))
    embedding = SubstituteEmbedder(dim=80).embed(waveform, 16000, 80, 25.0)
    energy = embedding.mean(dim=1)
    assert energy[:38].max() < energy[42:].min()
    assert torch.allclose(embedding[5], embedding[30])


def test_substitute_resamples_other_rates() -> None:
    waveform = _speech(2.0, rate=16000)
    at_48k = np.interp(np.arange(96000) / 48000, np.arange(32000) / 16000, waveform)
    reference = SubstituteEmbedder(dim=80).embed(waveform, 16000, 50, 25.0)
    resampled = SubstituteEmbedder(dim=80).embed(at_48k.astype(np.float32), 48000, 50, 25.0)
    assert resampled.shape == reference.shape
    assert (resampled - reference).abs().mean() < 0.1 * reference.abs().mean()


def test_embedder_specs_and_bad_input() -> None:
    assert load_audio_embedder("substitute").dim == 384
    small = load_audio_embedder("substitute:16")
    assert (small.dim, small.name) == (16, "substitute-16")
    assert small.embed(_speech(0.4), 16000, 10, 25.0).shape == (10, 16)
    for spec in ("bogus", "substitute:x", "substitute:0", "whisper:"):
        with pytest.raises(InputError, match="audio embedder"):
            load_audio_embedder(spec)
    with pytest.raises(InputError, match="mono"):
        small.embed(np.zeros((2, 100), np.float32), 16000, 2, 25.0)
    with pytest.raises(InputError, match="fps"):
        small.embed(np.zeros(100, np.float32), 16000, 2, 0.0)


def test_to_video_frames_averages_and_interpolates() -> None:
    steps = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    # 50 steps/s to 25 fps: frame i averages steps 2i and 2i + 1.
    assert torch.equal(
        to_video_frames(steps, 50.0, 5, 25.0)[:, 0], torch.tensor([0.5, 2.5, 4.5, 6.5, 8.5])
    )
    # 100 fps: no step inside most frames; interpolated at (i + 0.5) / 100 s = step (i + 0.5) / 2.
    fast = to_video_frames(steps, 50.0, 6, 100.0)[:, 0]
    assert torch.allclose(fast, torch.tensor([0.0, 0.75, 1.0, 1.75, 2.0, 2.75]))


# -- Whisper ------------------------------------------------------------------------------


def test_whisper_round_trip(tiny_whisper: Path) -> None:
    embedder = load_audio_embedder(f"whisper:{tiny_whisper}")
    assert isinstance(embedder, WhisperEmbedder)
    assert (embedder.name, embedder.dim, embedder.rate) == ("whisper-tiny-random", 32, 50.0)
    waveform = _speech(3.2)
    embedding = embedder.embed(waveform, 16000, 80, 25.0)
    assert embedding.shape == (80, 32) and embedding.dtype == torch.float32

    # By hand: the padded 30 s window through the encoder, steps 2i and 2i + 1 averaged.
    features = embedder.feature_extractor(waveform, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        hidden = embedder.encoder(features.input_features).last_hidden_state[0]
    assert hidden.shape == (1500, 32)
    expected = hidden[:160].reshape(80, 2, 32).mean(dim=1)
    assert torch.allclose(embedding, expected, atol=1e-5)


def test_whisper_windows_of_30_seconds(tiny_whisper: Path) -> None:
    embedder = WhisperEmbedder(tiny_whisper)
    waveform = _speech(30.5)
    steps = embedder.encode(waveform)
    assert steps.shape == (math.ceil(30.5 * 50), 32)
    assert torch.allclose(steps[:1500], embedder.encode(waveform[:480000]), atol=1e-5)
    assert torch.allclose(steps[1500:], embedder.encode(waveform[480000:]), atol=1e-5)


def test_whisper_missing_or_incomplete_directory(tmp_path: Path, tiny_whisper: Path) -> None:
    with pytest.raises(WeightsMissingError, match="does not exist.*hf download openai/whisper"):
        load_audio_embedder(f"whisper:{tmp_path / 'nowhere'}")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((tiny_whisper / "config.json").read_text())
    (partial / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(WeightsMissingError, match="preprocessor_config.json, model.safetensors"):
        WhisperEmbedder(partial)


# -- dataset cache ------------------------------------------------------------------------


class _Counting:
    def __init__(self, inner: SubstituteEmbedder) -> None:
        self.inner, self.name, self.dim, self.calls = inner, inner.name, inner.dim, 0

    def embed(
        self, waveform: np.ndarray, sample_rate: int, num_frames: int, fps: float
    ) -> torch.Tensor:
        self.calls += 1
        return self.inner.embed(waveform, sample_rate, num_frames, fps)


def test_dataset_embeddings_cached_and_reused(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", num_frames=20, size=16)
    embedder = _Counting(SubstituteEmbedder(dim=16))
    first = dataset_audio_embeddings(root, embedder)
    assert first.shape == (20, 16) and embedder.calls == 1
    assert (root / CACHE_DIR / "substitute-16.safetensors").is_file()
    assert torch.equal(dataset_audio_embeddings(root, embedder), first)
    assert embedder.calls == 1
    assert dataset_audio_embeddings(root, embedder, cache=False).shape == (20, 16)
    assert embedder.calls == 2

    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["num_frames"] = 15
    meta_path.write_text(json.dumps(meta))
    shorter = dataset_audio_embeddings(root, embedder)
    assert shorter.shape == (15, 16) and embedder.calls == 3


def test_dataset_without_audio(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "silent", num_frames=5, size=16, audio=False)
    with pytest.raises(InputError, match="no audio"):
        dataset_audio_embeddings(root, SubstituteEmbedder(dim=8))


# -- E_aud --------------------------------------------------------------------------------


def _encoder(**overrides: object) -> SpeechExpressionEncoder:
    torch.manual_seed(0)
    options = {"audio_dim": 12, "expression_dim": 6, "hidden_dim": 16, "audio_context": 2}
    options.update(overrides)
    return SpeechExpressionEncoder(SpeechEncoderConfig(**options))


def test_encoder_shapes_and_start_near_z0() -> None:
    model = _encoder()
    audio, z0 = torch.randn(2, 7, 12), torch.randn(2, 6)
    out = model(audio, z0)
    assert out.shape == (2, 7, 6)
    # An untrained encoder returns about z0 for every frame (module docstring).
    assert (out - z0[:, None]).abs().max() < 0.05 * z0.abs().max()
    assert model(audio[:, :1], z0).shape == (2, 1, 6)


def test_encoder_is_autoregressive() -> None:
    model = _encoder(audio_context=0)
    with torch.no_grad():
        for parameter in model.parameters():
            nn.init.normal_(parameter, std=0.3)
    audio, z0 = torch.randn(1, 6, 12), torch.randn(1, 6)
    with torch.no_grad():
        out = model(audio, z0)
        changed = audio.clone()
        changed[:, 2] += 1.0
        out_changed = model(changed, z0)
        # Frame t is MLP_b's base plus MLP_c of its audio and MLP_a of frame t - 1's output.
        z_base = z0 + model.mlp_b(z0)
        for t in range(1, 6):
            a_t = model.mlp_a(out[:, t - 1])
            expected = z_base + model.mlp_c(model.mlp_c_audio(audio[:, t]) + model.mlp_c_state(a_t))
            assert torch.allclose(out[:, t], expected, atol=1e-5)
    difference = (out_changed - out).abs().amax(dim=2)[0]
    assert torch.equal(difference[:2], torch.zeros(2))
    assert (difference[2:] > 1e-6).all()


def test_encoder_audio_context_reaches_back() -> None:
    model = _encoder(audio_context=2)
    audio, z0 = torch.randn(1, 8, 12), torch.randn(1, 6)
    changed = audio.clone()
    changed[:, 5] += 1.0
    with torch.no_grad():
        difference = (model(changed, z0) - model(audio, z0)).abs().amax(dim=2)[0]
    assert torch.equal(difference[:3], torch.zeros(3))
    assert (difference[3:] > 0).all()


def test_encoder_gradients_reach_every_parameter() -> None:
    model = _encoder()
    model(torch.randn(2, 4, 12), torch.randn(2, 6)).square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_encoder_save_load_round_trip(tmp_path: Path) -> None:
    model = _encoder(embedder="whisper:/models/whisper-base")
    model.save_pretrained(tmp_path / "speech")
    loaded = SpeechExpressionEncoder.from_pretrained(tmp_path / "speech")
    assert loaded.config == model.config
    audio, z0 = torch.randn(1, 5, 12), torch.randn(1, 6)
    with torch.no_grad():
        assert torch.equal(loaded(audio, z0), model(audio, z0))


def test_encoder_rejects_bad_shapes() -> None:
    model = _encoder()
    with pytest.raises(InputError, match=r"\(B, T, 12\)"):
        model(torch.randn(1, 4, 10), torch.randn(1, 6))
    with pytest.raises(InputError, match="z0"):
        model(torch.randn(2, 4, 12), torch.randn(1, 6))
    with pytest.raises(InputError, match="num_layers"):
        SpeechEncoderConfig(num_layers=1)
