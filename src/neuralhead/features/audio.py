"""Audio features for audio-driven models, and their per-frame windows.

Dynamic Neural Portraits (Sec. 3.3) drives its MLP from audio by giving each video frame i
a window A_i of w = 16 consecutive DeepSpeech vectors around it (29-d, 50 per second),
following AD-NeRF. DeepSpeech's weights cannot be had offline, so the default extractor
here, :class:`LogMelExtractor`, is a spectral substitute with the same role and shape:
29 values, 50 steps per second. (The paper writes A_i in R^{16x27}, which contradicts its
29-d vectors; we follow the 29.) Extractors are pluggable: :func:`get_audio_extractor`
takes a registered name or a ``"package.module:ClassName"`` string, so a DeepSpeech or
wav2vec wrapper can be used without editing the project.

Conventions shared by every extractor: the input is a mono float32 waveform in [-1, 1] at
``sample_rate``; step k of the output is centred on sample ``k * hop``; a waveform of n
samples gives ``n // hop + 1`` steps; samples beyond either end count as silence.
"""

from __future__ import annotations

import importlib
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch

from neuralhead.errors import InputError
from neuralhead.media.audio import iter_audio, load_audio


class AudioFeatureExtractor(ABC):
    """Turns a waveform into a sequence of feature vectors, ``rate`` of them per second.

    Subclasses set ``name``, ``sample_rate`` (the input rate they expect), ``dim`` (the size
    of one step) and ``hop`` (samples between steps), and implement :meth:`__call__`.

    ``context`` tells :func:`extract_features_from_file` how far the value of a step
    reaches: the step centred on sample c must depend only on samples in
    ``[c - context, c + context)``. That lets a long file be processed in chunks with an
    overlap of ``context`` samples and give the same result as processing it whole. Leave
    it ``None`` (the default) when there is no such bound, e.g. for a recurrent network or
    a per-utterance normalisation; the file is then processed in one piece.
    """

    name: str = ""
    sample_rate: int = 16000
    dim: int = 0
    hop: int = 320
    context: int | None = None

    @property
    def rate(self) -> float:
        """Feature steps per second."""
        return self.sample_rate / self.hop

    def num_steps(self, num_samples: int) -> int:
        """The number of steps a waveform of ``num_samples`` samples gives."""
        return num_samples // self.hop + 1

    @abstractmethod
    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        """Features of a mono waveform: float32 of shape ``(num_steps(len(waveform)), dim)``."""


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: ``2595 * log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    num_bands: int, n_fft: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> np.ndarray:
    """Triangular filters on the HTK mel scale, shape ``(num_bands, n_fft // 2 + 1)``.

    Band centres are equally spaced in mel between ``f_min`` and ``f_max`` (default: half
    the sample rate); each triangle rises from the previous centre to its own and falls to
    the next, with a peak of 1 (HTK's convention; no area normalisation, our choice). The
    triangles are evaluated at the FFT bin frequencies, so even bands narrower than a bin
    get a non-zero weight.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), num_bands + 2))
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def _as_waveform(waveform: np.ndarray) -> torch.Tensor:
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape (n,), got {waveform.shape}")
    return torch.from_numpy(np.ascontiguousarray(waveform))


class _MelSpectrum(AudioFeatureExtractor):
    """Log mel energies on 25 ms Hann windows every 20 ms at 16 kHz.

    The window (400 samples, periodic Hann) is centred on each step, inside a 512-point FFT;
    the signal is padded with zeros at both ends, so a step's value depends only on the
    400 samples around it (``context`` = 200).
    """

    sample_rate = 16000
    hop = 320
    win_length = 400
    n_fft = 512
    log_floor = 1e-6

    def __init__(self, num_bands: int, f_max: float = 8000.0) -> None:
        self.num_bands = num_bands
        self.context = self.win_length // 2
        self._window = torch.hann_window(self.win_length, periodic=True)
        self._filters = torch.from_numpy(
            mel_filterbank(num_bands, self.n_fft, self.sample_rate, 0.0, f_max)
        )

    def log_mel(self, waveform: np.ndarray) -> torch.Tensor:
        """Natural log of mel-band power plus 1e-6, shape ``(num_steps, num_bands)``."""
        spectrum = torch.stft(
            _as_waveform(waveform),
            n_fft=self.n_fft,
            hop_length=self.hop,
            win_length=self.win_length,
            window=self._window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        power = spectrum.real.square() + spectrum.imag.square()
        return torch.log(self._filters @ power + self.log_floor).T


class LogMelExtractor(_MelSpectrum):
    """29 log mel energies (HTK scale, 0-8000 Hz), 50 steps per second: the default.

    29 bands at 50 steps/s match DeepSpeech's output used by DNP Sec. 3.3, so that models
    built for it run unchanged; the band count is the only reason for 29.
    Silence gives ``log(1e-6)`` (about -13.8) in every band.
    """

    name = "logmel"

    def __init__(self, num_bands: int = 29) -> None:
        super().__init__(num_bands)
        self.dim = num_bands

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        return self.log_mel(waveform).numpy().astype(np.float32, copy=False)


def _deltas(features: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Regression deltas over +-``width`` steps (HTK's formula), edges repeated."""
    padded = torch.cat([features[:1].expand(width, -1), features, features[-1:].expand(width, -1)])
    steps = len(features)
    numerator = sum(
        n * (padded[width + n : width + n + steps] - padded[width - n : width - n + steps])
        for n in range(1, width + 1)
    )
    return numerator / (2 * sum(n * n for n in range(1, width + 1)))


def _dct_matrix(num_coefficients: int, num_bands: int) -> torch.Tensor:
    """Orthonormal DCT-II, shape ``(num_bands, num_coefficients)``: ``x @ D`` transforms rows."""
    n = np.arange(num_bands)[:, None]
    k = np.arange(num_coefficients)[None]
    matrix = np.cos(np.pi / num_bands * (n + 0.5) * k) * math.sqrt(2.0 / num_bands)
    matrix[:, 0] /= math.sqrt(2.0)
    return torch.from_numpy(matrix.astype(np.float32))


class MFCCExtractor(_MelSpectrum):
    """13 MFCCs with their deltas and delta-deltas (39 values), 50 steps per second.

    The MFCCs are the orthonormal DCT-II of the 40-band log mel spectrum (0-8000 Hz);
    deltas use the usual regression over +-2 steps, applied twice for the delta-deltas,
    with the first and last steps repeated at the ends of the signal. The standard
    speech-recognition front end, offered as an alternative input to :class:`LogMelExtractor`.
    """

    name = "mfcc"
    num_coefficients = 13
    delta_width = 2

    def __init__(self) -> None:
        super().__init__(num_bands=40)
        self.dim = 3 * self.num_coefficients
        # Deltas of deltas reach 2 * delta_width steps beyond the window of each step.
        self.context = self.win_length // 2 + 2 * self.delta_width * self.hop
        self._dct = _dct_matrix(self.num_coefficients, self.num_bands)

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        mfcc = self.log_mel(waveform) @ self._dct
        delta = _deltas(mfcc, self.delta_width)
        delta2 = _deltas(delta, self.delta_width)
        return torch.cat([mfcc, delta, delta2], dim=1).numpy().astype(np.float32, copy=False)


_REGISTRY: dict[str, Callable[..., AudioFeatureExtractor]] = {}


def register_audio_extractor(name: str, factory: Callable[..., AudioFeatureExtractor]) -> None:
    """Make ``get_audio_extractor(name, **kwargs)`` return ``factory(**kwargs)``."""
    if ":" in name:
        raise ValueError(
            f"extractor names cannot contain ':' (reserved for module paths): {name!r}"
        )
    if name in _REGISTRY:
        raise ValueError(f"an audio feature extractor named {name!r} is already registered")
    _REGISTRY[name] = factory


def registered_audio_extractors() -> list[str]:
    """The registered extractor names, sorted."""
    return sorted(_REGISTRY)


def _import_object(spec: str) -> object:
    module_name, _, qualname = spec.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as e:
        first_line = (str(e) or type(e).__name__).splitlines()[0]
        raise InputError(f"could not import audio feature extractor {spec!r}: {first_line}") from e
    for attribute in qualname.split("."):
        if not hasattr(obj, attribute):
            raise InputError(f"audio feature extractor {spec!r}: {module_name} has no {qualname}")
        obj = getattr(obj, attribute)
    return obj


def get_audio_extractor(spec: str, **kwargs: object) -> AudioFeatureExtractor:
    """Build an audio feature extractor from a registered name or ``"module:ClassName"``.

    ``kwargs`` go to the factory or class. A string with a colon names any importable
    callable that returns an :class:`AudioFeatureExtractor`; the module must be importable
    (installed, or on ``sys.path``).
    """
    if spec in _REGISTRY:
        extractor = _REGISTRY[spec](**kwargs)
    elif ":" in spec:
        factory = _import_object(spec)
        if not callable(factory):
            raise InputError(f"audio feature extractor {spec!r} is not a class or function")
        extractor = factory(**kwargs)
    else:
        raise InputError(
            f"unknown audio feature extractor {spec!r}; registered: "
            f"{', '.join(registered_audio_extractors())} (or give 'package.module:ClassName')"
        )
    if not isinstance(extractor, AudioFeatureExtractor):
        raise InputError(
            f"audio feature extractor {spec!r} gave a {type(extractor).__name__}, "
            f"not an AudioFeatureExtractor"
        )
    return extractor


register_audio_extractor("logmel", LogMelExtractor)
register_audio_extractor("mfcc", MFCCExtractor)


def extract_features_from_file(
    path: str | os.PathLike,
    extractor: AudioFeatureExtractor,
    chunk_seconds: float = 30.0,
) -> np.ndarray:
    """Features of the first audio track of a file, computed chunk by chunk.

    The audio is decoded at ``extractor.sample_rate`` and streamed in chunks of
    ``chunk_seconds``; each chunk is processed together with the end of the previous one
    (``extractor.context`` samples and a little more, to stay on the step grid), and only
    the steps whose whole input lies inside what was processed are kept. The result equals
    ``extractor(load_audio(path, extractor.sample_rate))`` up to float rounding, while
    memory stays bounded by a chunk. An extractor whose ``context`` is ``None`` gets the
    whole waveform at once.
    """
    sample_rate = extractor.sample_rate
    if extractor.context is None:
        return extractor(load_audio(path, sample_rate))
    if chunk_seconds <= 0:
        raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds}")
    hop, context = extractor.hop, extractor.context
    # Steps at the start of a buffer that lack left context; at least one so that the kept
    # tail never starts past the end of the buffer.
    margin = max(1, -(-context // hop))
    parts: list[np.ndarray] = []
    buffer = np.zeros(0, np.float32)
    buffer_step = 0  # global index of the step centred on buffer[0]
    done = 0  # global steps already in parts
    for samples in iter_audio(path, sample_rate, max(1, round(chunk_seconds * sample_rate))):
        buffer = np.concatenate([buffer, samples])
        last = (len(buffer) - context) // hop  # last local step with all its right context
        first = done - buffer_step
        if last >= first:
            parts.append(extractor(buffer)[first : last + 1])
            done = buffer_step + last + 1
        keep_from = max(done - margin, 0)
        buffer = buffer[(keep_from - buffer_step) * hop :]
        buffer_step = keep_from
    parts.append(extractor(buffer)[done - buffer_step :])
    return np.concatenate(parts)


def frame_windows(
    features: np.ndarray,
    feature_rate: float,
    fps: float,
    num_frames: int,
    window: int = 16,
) -> np.ndarray:
    """Cut a window of feature steps around each video frame: ``(num_frames, window, dim)``.

    Alignment: frame i is shown at time ``t = i / fps`` and feature step k is centred at
    ``k / feature_rate``, so frame i's own step is ``c = round(i * feature_rate / fps)``
    (halves round up). Its window holds steps ``c - window // 2`` to
    ``c + window - window // 2 - 1``: for the default ``window=16`` (DNP Sec. 3.3), 8 steps
    before c and c with the 7 after it, and ``windows[i, window // 2]`` is step c. This is
    AD-NeRF's convention (``features[2i - 8 : 2i + 8]`` at 25 fps and 50 steps/s). Steps
    before the first or after the last are filled with the first or last step.
    """
    features = np.asarray(features)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(
            f"features must have shape (steps, dim) with steps > 0, got {features.shape}"
        )
    if feature_rate <= 0 or fps <= 0 or window <= 0 or num_frames < 0:
        raise ValueError("feature_rate, fps and window must be positive and num_frames >= 0")
    centres = np.floor(np.arange(num_frames) * feature_rate / fps + 0.5).astype(np.int64)
    offsets = np.arange(window) - window // 2
    indices = np.clip(centres[:, None] + offsets[None], 0, len(features) - 1)
    return features[indices]
