"""Audio loading (from audio files and from the audio track of videos) and WAV writing.

Decoding and resampling go through PyAV (FFmpeg's decoders and libswresample), so every
format FFmpeg reads works: wav, mp3, flac, ogg, m4a and the audio stream of mp4/mkv/mov
videos. Waveforms are mono ``float32`` in [-1, 1]. Problems with the file raise
:class:`~neuralhead.errors.InputError` with one line naming the file.
"""

from __future__ import annotations

import os
import wave
from collections.abc import Iterator
from contextlib import closing

import av
import numpy as np

from neuralhead.errors import InputError
from neuralhead.media.video import _create_temp_beside, _open_input, _reason

DEFAULT_CHUNK_SAMPLES = 160_000
"""Default chunk length of :func:`iter_audio`: ten seconds at 16 kHz (our choice)."""


def _audio_stream(container: av.container.InputContainer, name: str) -> av.audio.stream.AudioStream:
    if not container.streams.audio:
        raise InputError(f"{name} has no audio stream")
    return container.streams.audio[0]


def _decode_mono(path: str, sample_rate: int) -> Iterator[np.ndarray]:
    """Decode and resample the first audio stream to mono float32, piece by piece.

    As for video, a partial packet at the end of a file cut short is flagged as corrupt
    by the demuxer and reported rather than decoded.
    """
    with _open_input(path, "audio") as container:
        stream = _audio_stream(container, path)
        # libswresample's default downmix adds the two channels of stereo at 1/sqrt(2) each,
        # which makes identical channels 3 dB louder and can clip; a matrix normalised to at
        # most 1 turns stereo into the mean of its channels.
        resampler = av.AudioResampler(
            format="flt", layout="mono", rate=sample_rate, options={"rematrix_maxval": "1.0"}
        )
        done = 0

        def truncated(reason: str) -> InputError:
            return InputError(
                f"audio of {path} is truncated or corrupt: decoding stopped after "
                f"{done / sample_rate:.2f} s ({reason})"
            )

        try:
            for packet in container.demux():
                if packet.is_corrupt:
                    raise truncated("a packet is cut short")
                if packet.stream is not stream:
                    continue
                for frame in packet.decode():
                    for out in resampler.resample(frame):
                        done += out.samples
                        yield out.to_ndarray()[0]
            for out in resampler.resample(None):
                yield out.to_ndarray()[0]
        except av.FFmpegError as e:
            raise truncated(_reason(e)) from e


def iter_audio(
    path: str | os.PathLike,
    sample_rate: int = 16000,
    chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
) -> Iterator[np.ndarray]:
    """Stream the first audio track of a file as mono float32 chunks at ``sample_rate``.

    Every chunk has ``chunk_samples`` samples except the last, which is shorter (and never
    empty). Memory stays bounded by a chunk whatever the length of the file. Channels are
    mixed down to mono by libswresample with gains that sum to at most 1 (stereo becomes
    the mean of its channels), and values are clipped to [-1, 1] since lossy decoders can
    overshoot slightly.
    """
    if sample_rate <= 0 or chunk_samples <= 0:
        raise ValueError("sample_rate and chunk_samples must be positive")
    name = os.fspath(path)
    pending: list[np.ndarray] = []
    pending_len = 0
    # closing() releases the file as soon as the caller stops iterating, not at collection.
    with closing(_decode_mono(name, sample_rate)) as pieces:
        for piece in pieces:
            pending.append(piece)
            pending_len += len(piece)
            if pending_len < chunk_samples:
                continue
            buffer = np.concatenate(pending)
            whole = len(buffer) - len(buffer) % chunk_samples
            for start in range(0, whole, chunk_samples):
                yield np.clip(buffer[start : start + chunk_samples], -1.0, 1.0)
            pending = [buffer[whole:]]
            pending_len = len(buffer) - whole
    if pending_len:
        yield np.clip(np.concatenate(pending), -1.0, 1.0)


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
    """Load the first audio track of a file as one mono float32 array in [-1, 1].

    Equal to the concatenation of :func:`iter_audio`'s chunks.
    """
    chunks = list(iter_audio(path, sample_rate, chunk_samples=1 << 22))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def has_audio(path: str | os.PathLike) -> bool:
    """Whether a media file has at least one audio stream."""
    with _open_input(path, "media") as container:
        return bool(container.streams.audio)


def audio_duration(path: str | os.PathLike) -> float | None:
    """The duration in seconds of a file's first audio stream, from its headers.

    Falls back to the container's duration; ``None`` if neither is stored.
    """
    name = os.fspath(path)
    with _open_input(name, "audio") as container:
        stream = _audio_stream(container, name)
        if stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        if container.duration:
            return container.duration / av.time_base
        return None


def write_wav(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int) -> None:
    """Write a float waveform in [-1, 1] as a 16-bit PCM WAV file.

    ``waveform`` is mono ``(n,)`` or ``(n, channels)``. Values outside [-1, 1] are clipped.
    Samples are scaled by 32768 (so that reading back by dividing by 32768, as FFmpeg does,
    returns them within half a step) and +1.0 saturates at 32767. The file is written under
    a temporary name in the same directory and then renamed, so ``path`` never holds a
    partial file.
    """
    waveform = np.asarray(waveform)
    if not np.issubdtype(waveform.dtype, np.floating):
        raise ValueError(f"waveform must be float in [-1, 1], got dtype {waveform.dtype}")
    if waveform.ndim == 1:
        waveform = waveform[:, None]
    if waveform.ndim != 2:
        raise ValueError(f"waveform must have shape (n,) or (n, channels), got {waveform.shape}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    pcm = np.clip(np.round(waveform.astype(np.float64) * 32768.0), -32768, 32767)
    data = pcm.astype("<i2").tobytes()

    target = os.fspath(path)
    fd, tmp = _create_temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as file, wave.open(file, "wb") as out:
            out.setnchannels(waveform.shape[1])
            out.setsampwidth(2)
            out.setframerate(int(sample_rate))
            out.writeframes(data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
