"""HeadGAN's 300-d audio features (Sec. 3.2): short-term features checked by hand, the
mean/std layout, frame alignment, the recogniser plugin and its offline substitute."""

from __future__ import annotations

import math
import textwrap
import tracemalloc

import numpy as np
import pytest

from neuralhead.errors import InputError
from neuralhead.features.audio import LogMelExtractor
from neuralhead.headgan.audio_features import (
    AUDIO_FEATURE_DIM,
    CHARACTER_CLASSES,
    EPS,
    SHORT_TERM_FEATURES,
    HeadGANAudioFeatures,
    audio_features_for_video,
    feature_names,
    load_character_recognizer,
    merge_ctc_vocabulary,
    short_term_features,
)
from neuralhead.media import load_audio, write_wav

SR = 16000
FPS = 25
PART = SR // FPS  # 640 samples per video frame
N = 320  # short frame: half a part
SILENT_LOG_MEL = math.log(1e-6)
Z = {name: i for i, name in enumerate(SHORT_TERM_FEATURES)}


def sine(
    freq: float, num_samples: int, amplitude: float = 0.5, phase: float = 0.3, sample_rate: int = SR
) -> np.ndarray:
    t = np.arange(num_samples) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def char_block(out: np.ndarray, offset: int) -> np.ndarray:
    """The 27 recogniser values of the part at ``offset`` (-4..3) from each frame."""
    start = 84 + (offset + 4) * 27
    return out[:, start : start + 27]


@pytest.fixture(scope="module")
def features() -> HeadGANAudioFeatures:
    return HeadGANAudioFeatures(fps=FPS)


def test_feature_names_follow_the_layout():
    names = feature_names()
    assert len(names) == len(set(names)) == AUDIO_FEATURE_DIM
    assert names[0] == "zcr_mean" and names[21] == "delta_zcr_mean"
    assert names[42] == "zcr_std" and names[83] == "delta_mfcc_13_std"
    assert names[84] == "char[-4]_a" and names[84 + 4 * 27] == "char[+0]_a"
    assert names[-1] == "char[+3]_other"


@pytest.mark.parametrize("kind", ["silence", "noise", "sine"])
def test_shape_dtype_and_finite(features, kind):
    num_samples = 15 * PART  # shorter than the 20 frames: the rest counts as silence
    waveform = {
        "silence": np.zeros(num_samples, np.float32),
        "noise": np.random.default_rng(0).uniform(-0.5, 0.5, num_samples).astype(np.float32),
        "sine": sine(440, num_samples),
    }[kind]
    out = features(waveform, SR, 20)
    assert out.shape == (20, AUDIO_FEATURE_DIM) and out.dtype == np.float32
    assert np.isfinite(out).all()
    if kind == "silence":
        np.testing.assert_array_equal(out[:, :8], 0.0)
        np.testing.assert_allclose(out[:, Z["mfcc_1"]], math.sqrt(40) * math.log10(EPS), rtol=1e-6)
        np.testing.assert_allclose(out[:, 84:], SILENT_LOG_MEL, rtol=1e-6)
    assert features(waveform, SR, 0).shape == (0, AUDIO_FEATURE_DIM)


def test_zero_crossing_rate_of_a_square_wave():
    square = np.where((np.arange(N) // 20) % 2 == 0, 1.0, -1.0)  # sign flips every 20 samples
    flat = np.full(N, 0.3)
    zcr = short_term_features(np.stack([square, flat]), SR)[:, Z["zcr"]]
    np.testing.assert_allclose(zcr, [15 / 319, 0.0])  # flips after samples 20, 40, ..., 300


def test_energy_and_entropy_of_energy():
    constant = np.full(N, 0.5)
    click = np.zeros(N)
    click[100] = 1.0
    got = short_term_features(np.stack([constant, click]), SR)
    np.testing.assert_allclose(got[:, Z["energy"]], [0.25, 1 / N])
    # Ten equal blocks: maximal entropy log2(10); all energy in one block: 0.
    np.testing.assert_allclose(got[:, Z["energy_entropy"]], [math.log2(10), 0.0], atol=1e-6)


def test_centroid_spread_and_rolloff_of_pure_tones():
    bin_centred = sine(1000, N)  # exactly bin 20 of 160 (50 Hz bins): no leakage
    between_bins = sine(2010, N)
    got = short_term_features(np.stack([bin_centred, between_bins]), SR)
    assert got[0, Z["spectral_centroid"]] == pytest.approx(1000 / 8000, abs=1e-6)
    assert got[0, Z["spectral_spread"]] == pytest.approx(0.0, abs=1e-4)
    assert got[0, Z["spectral_rolloff"]] == pytest.approx(20 / 160)
    assert got[1, Z["spectral_rolloff"]] == pytest.approx(2010 / 8000, abs=2 / 160)
    assert got[1, Z["spectral_centroid"]] > 0.15  # the rectangular window leaks, as in [17]


def test_spectral_entropy_is_maximal_for_a_flat_spectrum():
    impulse = np.zeros(N)
    impulse[0] = 1.0  # |FFT| = 1 in every bin
    noise = np.random.default_rng(1).normal(size=N)
    entropy = short_term_features(np.stack([impulse, noise, sine(1000, N)]), SR)[
        :, Z["spectral_entropy"]
    ]
    assert entropy[0] == pytest.approx(math.log2(10), abs=1e-5)
    assert entropy[0] > entropy[1] > entropy[2] >= 0.0
    assert entropy[2] == pytest.approx(0.0, abs=1e-6)


def test_spectral_flux_compares_normalised_spectra():
    low, high = sine(1000, N), sine(3000, N, amplitude=0.1)
    flux = short_term_features(np.stack([low, low, high]), SR)[:, Z["spectral_flux"]]
    # The first frame has no predecessor; equal spectra give 0; two disjoint unit-sum
    # single-bin spectra give 1² + 1² whatever their loudness.
    np.testing.assert_allclose(flux, [0.0, 0.0, 2.0], atol=1e-4)


def test_short_frames_must_be_even_and_long_enough():
    with pytest.raises(InputError, match="even and >= 20"):
        short_term_features(np.zeros((2, 19)), SR)


def test_stationary_tone_has_zero_std_in_the_std_slots(features):
    period = sine(400, 40)  # the 40-sample short-frame step holds exactly one period
    tone = np.tile(period, 50 * PART // 40)
    out = features(tone, SR, 50)
    inner = out[6:-6]
    single = short_term_features(np.tile(period, N // 40)[None], SR)[0]
    np.testing.assert_allclose(inner[:, :21], np.broadcast_to(single, (len(inner), 21)), rtol=1e-5)
    np.testing.assert_allclose(inner[:, 21:84], 0.0, atol=1e-5)  # delta means and all stds
    assert inner[0, Z["spectral_centroid"]] == pytest.approx(400 / 8000, abs=1e-6)
    # At the start the window repeats part 0, which begins with silence: stds wake up.
    assert out[0, 42 + Z["energy"]] > 1e-3 and out[0, 21 + 42 + Z["energy"]] > 1e-3


@pytest.mark.parametrize("fps", [25.0, 29.97])
def test_a_click_shows_up_in_the_windows_of_its_frame(fps):
    k, num_frames = 20, 50
    part = SR / fps
    audio = np.zeros(round(num_frames * part), np.float32)
    audio[round((k + 0.5) * part)] = 1.0  # the middle of part k, the audio of frame k
    out = HeadGANAudioFeatures(fps=fps)(audio, SR, num_frames)
    frames = np.arange(num_frames)
    seen = (frames >= k - 3) & (frames <= k + 4)  # the windows t-4 .. t+3 that hold k
    assert (out[seen, Z["energy"]] > 0).all() and (out[~seen, Z["energy"]] == 0).all()
    for offset in range(-4, 4):
        block = char_block(out, offset)
        hit = frames + offset == k
        assert (block[hit] > SILENT_LOG_MEL + 1).any(axis=1).all()
        np.testing.assert_allclose(block[~hit], SILENT_LOG_MEL, rtol=1e-6)


def test_substitute_is_27_log_mel_bands_averaged_per_part(features):
    assert isinstance(features.recognizer, LogMelExtractor)
    assert features.recognizer.dim == 27 and features.recognizer.rate == 50.0
    audio = np.random.default_rng(2).uniform(-0.5, 0.5, 12 * PART).astype(np.float32)
    out = features(audio, SR, 12)
    steps = LogMelExtractor(num_bands=27)(audio)
    own_part = (steps[0:24:2] + steps[1:24:2]) / 2  # 50 steps/s, 25 fps: steps 2t, 2t+1
    np.testing.assert_allclose(char_block(out, 0), own_part, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(char_block(out, -1)[1:], own_part[:-1], rtol=1e-4, atol=1e-4)


def test_chunked_equals_one_piece():
    audio = np.random.default_rng(3).uniform(-0.5, 0.5, 30 * PART).astype(np.float32)
    small = HeadGANAudioFeatures(fps=FPS, chunk_frames=3)(audio, SR, 33)
    whole = HeadGANAudioFeatures(fps=FPS, chunk_frames=1000)(audio, SR, 33)
    np.testing.assert_allclose(small, whole, rtol=1e-4, atol=1e-4)


def test_memory_stays_bounded_for_a_minute(features):
    audio = np.random.default_rng(4).uniform(-0.5, 0.5, 60 * SR).astype(np.float32)
    tracemalloc.start()
    try:
        out = features(audio, SR, 60 * FPS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (peak - out.nbytes) / 2**20 < 8  # the waveform itself is 3.7 MiB


_PLUGIN = """
    import numpy as np
    from neuralhead.headgan.audio_features import CharacterRecognizer

    class StepIndexRecognizer(CharacterRecognizer):
        '''Every class scores the index of its step: 100 steps/s at 8 kHz.'''

        name = "step-index"
        sample_rate = 8000
        hop = 80

        def __call__(self, waveform):
            steps = np.arange(self.num_steps(len(waveform)), dtype=np.float32)
            return np.repeat(steps[:, None], 27, axis=1)
"""


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "nh_headgan_recognizer.py").write_text(textwrap.dedent(_PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "nh_headgan_recognizer"


def test_recognizer_plugin_from_a_dotted_path(plugin_module):
    features = HeadGANAudioFeatures(f"{plugin_module}:StepIndexRecognizer", fps=FPS)
    assert features.recognizer.name == "step-index"
    out = features(np.zeros(10 * PART, np.float32), SR, 10)
    # 4 steps per part: part t averages steps 4t .. 4t+3; before part 0 the border repeats.
    own = 4 * np.arange(10) + 1.5
    np.testing.assert_allclose(char_block(out, 0), np.repeat(own[:, None], 27, axis=1))
    np.testing.assert_allclose(char_block(out, -2)[:, 0], np.maximum(own - 8, 1.5))
    np.testing.assert_allclose(char_block(out, 3)[:, 0], np.minimum(own + 12, own[-1]))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nh_no_such_module_xyz:Recognizer", "could not import"),
        ("neuralhead.headgan.audio_features:NoSuchRecognizer", "has no NoSuchRecognizer"),
        ("logmel", "gives 29 values per step"),
        ("no-such-name", "unknown audio feature extractor"),
    ],
)
def test_bad_recognizer_gives_input_error(spec, message):
    with pytest.raises(InputError, match=message):
        load_character_recognizer(spec)


def test_merge_ctc_vocabulary_of_wav2vec2_and_deepspeech():
    wav2vec2 = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"]
    deepspeech = [" ", *"abcdefghijklmnopqrstuvwxyz", "'", "<blank>"]
    for vocabulary in (wav2vec2, deepspeech):
        logits = np.random.default_rng(5).normal(size=(6, len(vocabulary)))
        merged = merge_ctc_vocabulary(logits, vocabulary)
        assert merged.shape == (6, 27)
        np.testing.assert_allclose(np.exp(merged).sum(axis=1), 1.0)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        q = [token.lower() for token in vocabulary].index("q")
        np.testing.assert_allclose(merged[:, CHARACTER_CLASSES.index("q")], log_probs[:, q])
    with pytest.raises(InputError, match=r"\['z'\]"):
        merge_ctc_vocabulary(np.zeros((1, 26)), [*"abcdefghijklmnopqrstuvwxy", "|"])


def test_file_helper_matches_the_array_call(tmp_path, features):
    path = tmp_path / "speech.wav"
    tone = sine(1000, 8 * 2 * PART, sample_rate=2 * SR)
    write_wav(path, tone, 2 * SR)  # a 32 kHz file, decoded at 16 kHz
    out = audio_features_for_video(path, FPS, 8)
    np.testing.assert_allclose(out, features(load_audio(path, SR), SR, 8), rtol=1e-6)
    # An array at another rate is resampled to the same 16 kHz analysis.
    direct = features(tone, 2 * SR, 8)
    assert direct[4, Z["spectral_rolloff"]] == pytest.approx(1000 / 8000, abs=1 / 160)
    # The resampling filter's tiny residue in every bin pulls the centroid up a little.
    assert direct[4, Z["spectral_centroid"]] == pytest.approx(1000 / 8000, abs=0.01)


@pytest.mark.parametrize(
    ("waveform", "sample_rate", "num_frames", "message"),
    [
        (np.zeros((100, 2), np.float32), SR, 4, "mono"),
        (np.zeros(100, np.int16), SR, 4, "float"),
        (np.full(100, np.nan, np.float32), SR, 4, "NaN"),
        (np.zeros(100, np.float32), SR, -1, "num_frames"),
    ],
)
def test_bad_input_gives_input_error(features, waveform, sample_rate, num_frames, message):
    with pytest.raises(InputError, match=message):
        features(waveform, sample_rate, num_frames)


def test_bad_settings_give_input_error():
    with pytest.raises(InputError, match="fps"):
        HeadGANAudioFeatures(fps=0)
    with pytest.raises(InputError, match="even"):
        HeadGANAudioFeatures(window=7)
    with pytest.raises(InputError, match="too short"):
        HeadGANAudioFeatures(fps=1000)
