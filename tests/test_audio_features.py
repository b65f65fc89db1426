"""Audio features: shapes, spectral sanity, streaming equals one-shot, frame windows and the
extractor registry with plugins loaded from "module:Class" strings."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from neuralhead.errors import InputError
from neuralhead.features import (
    AudioFeatureExtractor,
    LogMelExtractor,
    MFCCExtractor,
    extract_features_from_file,
    frame_windows,
    get_audio_extractor,
    register_audio_extractor,
    registered_audio_extractors,
)
from neuralhead.features.audio import mel_filterbank
from neuralhead.media import load_audio, write_wav


def tone(freq: float, seconds: float, sample_rate: int = 16000) -> np.ndarray:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize(("name", "dim"), [("logmel", 29), ("mfcc", 39)])
@pytest.mark.parametrize("num_samples", [0, 1, 319, 320, 321, 16000])
def test_shapes_and_step_count(name, dim, num_samples):
    extractor = get_audio_extractor(name)
    assert (extractor.name, extractor.dim, extractor.sample_rate) == (name, dim, 16000)
    assert extractor.hop == 320 and extractor.rate == 50.0
    waveform = np.random.default_rng(0).uniform(-0.5, 0.5, num_samples).astype(np.float32)
    features = extractor(waveform)
    assert features.dtype == np.float32
    assert features.shape == (num_samples // 320 + 1, dim)
    assert np.isfinite(features).all()


def test_tone_lands_in_its_mel_band():
    extractor = LogMelExtractor()
    features = extractor(tone(440, 1.0))
    bin_440 = round(440 * 512 / 16000)
    expected = int(np.argmax(mel_filterbank(29, 512, 16000, 0, 8000)[:, bin_440]))
    inner = features[5:-5]
    assert (inner.argmax(axis=1) == expected).all()
    # Far from 440 Hz only the window's side lobes remain.
    assert inner[:, expected].mean() - inner[:, -1].mean() > 10


def test_silence_gives_the_flat_minimum():
    features = LogMelExtractor()(np.zeros(8000, np.float32))
    np.testing.assert_allclose(features, np.log(1e-6), rtol=1e-6)


def test_step_k_is_centred_on_sample_k_times_hop():
    extractor = LogMelExtractor()
    waveform = np.zeros(16000, np.float32)
    waveform[320 * 20] = 1.0  # a click at step 20's centre
    energy = extractor(waveform).max(axis=1)
    assert energy.argmax() == 20
    assert energy[19] == energy[21]  # symmetric: the window is centred on the step


def test_mfcc_deltas_of_a_steady_tone_vanish():
    features = MFCCExtractor()(tone(440, 1.0))
    inner = features[8:-8]
    assert np.abs(inner[:, 13:]).max() < 0.05 * np.abs(inner[:, :13]).max()


@pytest.mark.parametrize("name", ["logmel", "mfcc"])
@pytest.mark.parametrize("chunk_seconds", [0.05, 0.37, 1.0, 30.0])
def test_streaming_equals_one_shot(tmp_path, name, chunk_seconds):
    path = tmp_path / "speechlike.wav"
    rng = np.random.default_rng(0)
    # 22.05 kHz, so that resampling is part of what is streamed.
    waveform = np.concatenate(
        [tone(300, 1.0, 22050), rng.uniform(-0.3, 0.3, 30000), tone(900, 0.7, 22050)]
    )
    write_wav(path, waveform, 22050)
    extractor = get_audio_extractor(name)
    one_shot = extractor(load_audio(path, extractor.sample_rate))
    streamed = extract_features_from_file(path, extractor, chunk_seconds=chunk_seconds)
    assert streamed.shape == one_shot.shape
    np.testing.assert_allclose(streamed, one_shot, atol=1e-4, rtol=1e-5)


class _WindowSum(AudioFeatureExtractor):
    """Sums exactly the samples in ``[c - context, c + context)``: any misplaced chunk
    boundary in the streaming shows up as a wrong value."""

    name = "window-sum"
    dim = 1

    def __init__(self, context: int, hop: int) -> None:
        self.context, self.hop = context, hop

    def __call__(self, waveform):
        padded = np.concatenate(
            [[0.0], np.cumsum(np.pad(waveform, self.context), dtype=np.float64)]
        )
        centres = np.arange(self.num_steps(len(waveform))) * self.hop + self.context
        sums = padded[centres + self.context] - padded[centres - self.context]
        return sums[:, None].astype(np.float32)


@pytest.mark.parametrize(
    ("context", "hop"), [(0, 320), (1, 320), (319, 320), (320, 320), (967, 160)]
)
@pytest.mark.parametrize("chunk_seconds", [0.013, 0.1, 0.77])
def test_streaming_respects_any_context(tmp_path, context, hop, chunk_seconds):
    path = tmp_path / "noise.wav"
    write_wav(path, np.random.default_rng(3).uniform(-0.5, 0.5, 12345), 16000)
    extractor = _WindowSum(context, hop)
    expected = extractor(load_audio(path))
    streamed = extract_features_from_file(path, extractor, chunk_seconds=chunk_seconds)
    np.testing.assert_allclose(streamed, expected, atol=1e-4)


class _WholeSignal(AudioFeatureExtractor):
    """Normalised by the whole signal's peak, so its ``context`` cannot be bounded."""

    name = "whole"
    dim = 1

    def __call__(self, waveform):
        peak = max(float(np.abs(waveform).max(initial=0.0)), 1e-9)
        steps = self.num_steps(len(waveform))
        padded = np.pad(waveform, (0, steps * self.hop - len(waveform)))
        return (padded[:: self.hop] / peak)[:steps, None].astype(np.float32)


def test_extractor_without_context_gets_the_whole_file(tmp_path):
    path = tmp_path / "a.wav"
    write_wav(path, tone(200, 3.0), 16000)
    extractor = _WholeSignal()
    streamed = extract_features_from_file(path, extractor, chunk_seconds=0.5)
    np.testing.assert_array_equal(streamed, extractor(load_audio(path)))


@pytest.mark.parametrize(("fps", "rate"), [(25.0, 50.0), (30.0, 50.0), (29.97, 50.0), (20.0, 50.0)])
def test_frame_windows_alignment(fps, rate):
    num_steps = 200
    ramp = np.arange(num_steps, dtype=np.float32)[:, None].repeat(3, axis=1)
    num_frames = int(num_steps / rate * fps)
    windows = frame_windows(ramp, rate, fps, num_frames, window=16)
    assert windows.shape == (num_frames, 16, 3)
    for i in range(num_frames):
        centre = int(np.floor(i * rate / fps + 0.5))
        expected = np.clip(np.arange(centre - 8, centre + 8), 0, num_steps - 1)
        np.testing.assert_array_equal(windows[i, :, 0], expected)
        assert windows[i, 8, 0] == centre
    # Frame 0 at 25 fps and 50 steps/s: steps -8..-1 do not exist and repeat step 0.
    if fps == 25.0:
        np.testing.assert_array_equal(windows[0, :9, 0], 0)
        np.testing.assert_array_equal(windows[10, :, 0], np.arange(12, 28))


def test_frame_windows_repeat_the_last_step():
    features = np.arange(10, dtype=np.float32)[:, None]
    windows = frame_windows(features, 50.0, 25.0, 5, window=4)
    np.testing.assert_array_equal(windows[4, :, 0], [6, 7, 8, 9])
    windows = frame_windows(features, 50.0, 25.0, 8, window=4)
    np.testing.assert_array_equal(windows[7, :, 0], [9, 9, 9, 9])


_PLUGIN = """
import numpy as np
from neuralhead.features import AudioFeatureExtractor


class ConstantExtractor(AudioFeatureExtractor):
    name = "constant"
    dim = 3
    context = 0

    def __init__(self, value=1.0):
        self.value = value

    def __call__(self, waveform):
        return np.full((self.num_steps(len(waveform)), self.dim), self.value, np.float32)


class NotAnExtractor:
    pass
"""


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "nh_test_plugin.py").write_text(textwrap.dedent(_PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "nh_test_plugin"


def test_plugin_by_module_and_class(plugin_module, tmp_path):
    extractor = get_audio_extractor(f"{plugin_module}:ConstantExtractor", value=2.5)
    assert extractor.name == "constant"
    features = extractor(np.zeros(1000, np.float32))
    assert features.shape == (4, 3) and (features == 2.5).all()
    path = tmp_path / "x.wav"
    write_wav(path, tone(100, 1.0), 16000)
    assert extract_features_from_file(path, extractor, chunk_seconds=0.3).shape == (51, 3)


def test_plugin_errors(plugin_module):
    with pytest.raises(InputError, match="not an AudioFeatureExtractor"):
        get_audio_extractor(f"{plugin_module}:NotAnExtractor")
    with pytest.raises(InputError, match="has no Missing"):
        get_audio_extractor(f"{plugin_module}:Missing")
    with pytest.raises(InputError) as error:
        get_audio_extractor("no_such_package_xyz.models:DeepSpeech")
    assert str(error.value).startswith("could not import audio feature extractor")
    assert "\n" not in str(error.value)


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(InputError) as error:
        get_audio_extractor("deepspeech")
    message = str(error.value)
    assert "unknown audio feature extractor 'deepspeech'" in message
    assert "logmel" in message and "mfcc" in message and "\n" not in message


def test_register_rejects_duplicates_and_colons():
    assert {"logmel", "mfcc"} <= set(registered_audio_extractors())
    with pytest.raises(ValueError, match="already registered"):
        register_audio_extractor("logmel", LogMelExtractor)
    with pytest.raises(ValueError, match=":"):
        register_audio_extractor("a:b", LogMelExtractor)
