"""Audio I/O: WAV round trips, resampling, other formats, streaming, and InputErrors."""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np
import pytest

from neuralhead.errors import InputError
from neuralhead.media import (
    VideoWriter,
    audio_duration,
    has_audio,
    iter_audio,
    load_audio,
    write_wav,
)


def sine(freq: float, seconds: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(waveform: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return np.argmax(spectrum) * sample_rate / len(waveform)


def encode_audio(path, codec: str, waveform: np.ndarray, sample_rate: int) -> None:
    """Write a mono waveform with one of FFmpeg's encoders (the container from the suffix)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=sample_rate, layout="mono")
        encoder_format = stream.codec_context.codec.audio_formats[0]
        frame = av.AudioFrame.from_ndarray(
            waveform[None].astype(np.float32), format="flt", layout="mono"
        )
        frame.sample_rate = sample_rate
        frame.pts = 0
        frame.time_base = Fraction(1, sample_rate)
        resampler = av.AudioResampler(format=encoder_format, layout="mono", rate=sample_rate)
        for converted in resampler.resample(frame):
            container.mux(stream.encode(converted))
        container.mux(stream.encode(None))


def test_wav_round_trip(tmp_path):
    path = tmp_path / "tone.wav"
    waveform = sine(440, 1.0, 16000, amplitude=0.9)
    write_wav(path, waveform, 16000)
    loaded = load_audio(path, 16000)
    assert loaded.dtype == np.float32 and loaded.shape == waveform.shape
    np.testing.assert_allclose(loaded, waveform, atol=2 / 32768)
    assert audio_duration(path) == pytest.approx(1.0)
    assert has_audio(path)


def test_write_wav_clips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "loud.wav"
    write_wav(path, np.array([-2.0, -1.0, 0.0, 1.0, 2.0], np.float32), 8000)
    assert os.listdir(tmp_path) == ["loud.wav"]
    np.testing.assert_allclose(load_audio(path, 8000), [-1, -1, 0, 32767 / 32768, 32767 / 32768])
    with pytest.raises(ValueError, match="float"):
        write_wav(path, np.zeros(10, np.int16), 8000)


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_resampling_keeps_duration_and_frequency(tmp_path, rate):
    path = tmp_path / "tone.wav"
    write_wav(path, sine(1000, 2.0, 16000), 16000)
    loaded = load_audio(path, rate)
    assert abs(len(loaded) - 2 * rate) <= 2
    assert peak_frequency(loaded, rate) == pytest.approx(1000, abs=2)


def test_stereo_is_mixed_to_mono(tmp_path):
    path = tmp_path / "stereo.wav"
    tone = sine(300, 0.5, 16000)
    write_wav(path, np.stack([tone, tone], axis=1), 16000)
    np.testing.assert_allclose(load_audio(path, 16000), tone, atol=2 / 32768)


@pytest.mark.parametrize(
    ("suffix", "codec", "rate"),
    [(".flac", "flac", 16000), (".mp3", "libmp3lame", 22050), (".ogg", "libopus", 48000)],
)
def test_other_formats(tmp_path, suffix, codec, rate):
    path = tmp_path / f"tone{suffix}"
    encode_audio(path, codec, sine(440, 1.0, rate), rate)
    loaded = load_audio(path, 16000)
    assert abs(len(loaded) - 16000) < 0.1 * 16000  # lossy codecs add padding
    assert peak_frequency(loaded, 16000) == pytest.approx(440, abs=3)
    assert np.abs(loaded).max() <= 1.0


def test_audio_track_of_a_video(tmp_path):
    path = tmp_path / "talk.mp4"
    tone = sine(440, 1.2, 16000)
    with VideoWriter(path, 25, audio=tone, audio_sample_rate=16000) as writer:
        for _ in range(30):
            writer.write(np.full((32, 32, 3), 128, np.uint8))
    assert has_audio(path)
    loaded = load_audio(path, 16000)
    assert len(loaded) >= len(tone)
    # The edit list removes the AAC encoder delay, so samples line up with the input.
    middle = slice(1600, 17600)
    assert np.abs(loaded[middle] - tone[middle]).mean() < 0.01


@pytest.mark.parametrize("chunk_samples", [1000, 4096, 100_000])
def test_iter_audio_streams_what_load_audio_returns(tmp_path, chunk_samples):
    path = tmp_path / "noise.wav"
    write_wav(path, np.random.default_rng(0).uniform(-0.5, 0.5, 22050 * 2), 22050)
    chunks = list(iter_audio(path, 16000, chunk_samples=chunk_samples))
    assert all(len(chunk) == chunk_samples for chunk in chunks[:-1])
    assert 0 < len(chunks[-1]) <= chunk_samples
    np.testing.assert_array_equal(np.concatenate(chunks), load_audio(path, 16000))


def test_video_without_audio(tmp_path):
    path = tmp_path / "silent.mp4"
    with VideoWriter(path, 25) as writer:
        writer.write(np.zeros((16, 16, 3), np.uint8))
    assert not has_audio(path)
    with pytest.raises(InputError, match=f"^{path} has no audio stream$"):
        load_audio(path)
    with pytest.raises(InputError, match="no audio stream"):
        audio_duration(path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="^audio file not found: .*nope.wav$"):
        load_audio(tmp_path / "nope.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(InputError) as error:
        next(iter_audio(junk))
    assert str(error.value).startswith(f"could not open audio {junk}: not a readable media file")
    with pytest.raises(InputError):
        has_audio(junk)


def test_truncated_video_audio_track(tmp_path):
    path = tmp_path / "cut.mp4"
    rng = np.random.default_rng(0)
    with VideoWriter(path, 25, audio=sine(440, 2.0, 16000), audio_sample_rate=16000) as writer:
        for _ in range(50):
            writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # The cut may fall in a video packet: the audio must not end early without a word.
    with pytest.raises(InputError, match=f"^audio of {path} is truncated or corrupt: decoding"):
        load_audio(path)
