"""HeadGAN's per-frame audio feature vector h_t(a) ∈ R^300 (Sec. 3.2).

The audio is cut into parts a_t, one per video frame, and frame t sees a window of 2w = 8
parts around it (w = 4). Two kinds of features are taken from that window:

* 84 low-level features ("[17]", pyAudioAnalysis): 21 short-term features (zero-crossing
  rate, energy, entropy of energy, spectral centroid, spread, entropy, flux and roll-off,
  13 MFCCs) and their deltas, summarised by their mean and standard deviation over the
  window: ``[mean(21), mean(21 deltas), std(21), std(21 deltas)]``, the order of the
  authors' mid-term statistics.
* 216 speech-recogniser features: 27 character-class scores for each of the 8 parts,
  concatenated part by part (oldest part first).

Alignment (our reading). Part a_t holds the samples of frame t's display interval,
``[t, t + 1) * sample_rate / fps``. The paper prints the window as a_{t-w-1 : t+w}, which
counts 2w + 2 parts, not the 2w it states; we take parts t-w .. t+w-1 (4 before, t itself
and 3 after), whose samples span ``[t - w, t + w) / fps``: centred exactly on frame t's
timestamp t / fps. It is also the authors' windowing of the character features and the
project's :func:`~neuralhead.features.audio.frame_windows` convention. Parts before the
first or after the last frame repeat the border part. Samples beyond either end of the
waveform count as silence (the convention of :mod:`neuralhead.features.audio`).

Short-term analysis (from the authors' code, which calls pyAudioAnalysis with a short
window of half a frame and a step of 1/16 frame): every part is covered by
``frames_per_part`` = 16 short frames centred at ``(t + (j + 1/2) / 16) * sample_rate / fps``,
each ``short_window`` = 0.5 parts long, so the mean and standard deviation of each feature
run over 8 * 16 = 128 short frames. ``frames_per_part=1, short_window=1`` gives one short
frame per part instead. The authors' mid-term window starts at frame t (it spans frames
t .. t+7); we centre it as the paper says.

Short-term features, following pyAudioAnalysis' ShortTermFeatures (Giannakopoulos 2015)
for a frame x of n samples and its magnitude spectrum X (rectangular window, FFT of
length n, the n/2 bins below Nyquist, divided by n/2):

* zero-crossing rate: the number of sign changes between neighbouring samples over n - 1
  (a sample of exactly 0 counts half a change on each side, as ``np.sign`` makes it);
* energy: the mean of x²;
* entropy of energy: split x into 10 equal blocks (dropping the remainder), take each
  block's share of the frame's total energy and return the Shannon entropy (base 2) of
  the shares: log2(10) ≈ 3.32 for a steady signal, 0 for a single click;
* spectral centroid and spread: the X-weighted mean frequency and the X-weighted standard
  deviation around it, both divided by the Nyquist frequency (so in [0, 1]);
* spectral entropy: the entropy of energy applied to X over 10 equal sub-bands;
* spectral flux: the summed squared difference between this and the previous frame's
  spectra, each divided by its sum (0 for the very first frame of the signal);
* spectral roll-off: the first bin below which more than 90 % of the spectral energy
  (sum of X²) lies, divided by the number of bins;
* 13 MFCCs: the orthonormal DCT-II of log10 of 40 triangular-filter outputs applied to X.

Deltas are the difference from the previous short frame (pyAudioAnalysis; zero for the
first frame of the signal). Where we depart from pyAudioAnalysis, and why:

* no per-file normalisation: pyAudioAnalysis removes the mean of the whole file and scales
  it to a peak of 1, which needs the whole file before the first feature; we take the
  waveform as it is, in [-1, 1], so that features can be computed chunk by chunk;
* bin k's frequency is ``k * sample_rate / n`` (pyAudioAnalysis uses k + 1);
* the MFCC filters are the project's HTK-mel filters
  (:func:`~neuralhead.features.audio.mel_filterbank`, peak 1) over 133-6854 Hz, the range
  of pyAudioAnalysis' 13 linear + 27 logarithmic filters, rather than a copy of those;
* ``eps = 1e-8`` (the authors' value), and the centroid/spread of a silent frame are 0
  where the authors' copy divides 0 by 0. Every feature is finite for every input.

Normalisation: none (our choice; the paper states none). Silence gives zero-crossing rate,
energy, entropies, centroid, spread, flux and roll-off of 0 and MFCCs of the log floor
(c1 = 40**0.5 * log10(1e-8) ≈ -50.6, the rest 0). The largest magnitudes are the first
MFCCs (tens); the linear layers that read the vector (AdaIN's, the mouth discriminator's)
learn the scale.

Speech recogniser. The paper uses DeepSpeech character logits; the authors' code actually
one-hot encodes the characters of a DeepSpeech 0.8.1 transcript (27 classes: the letters
a-z and one class for everything else). Neither can run here, so the recogniser is a
plugin (:class:`CharacterRecognizer`), loaded like the project's audio extractors from
``"package.module:ClassName"``. Its per-step scores are averaged over the steps centred
inside each part (the nearest step if a part holds none). Models that fit:

* Mozilla DeepSpeech 0.1-0.9 (16 kHz): 29 outputs (space, a-z, apostrophe, CTC blank),
  taken at 50 steps/s by VOCA and AD-NeRF; TensorFlow weights, and the ``deepspeech``
  package has no wheels after Python 3.9.
* ``facebook/wav2vec2-base-960h`` (transformers ``Wav2Vec2ForCTC``, 16 kHz, 50 steps/s,
  receptive field 400 samples, stride 320): 32 tokens (``<pad>`` = CTC blank, ``<s>``,
  ``</s>``, ``<unk>``, ``|`` = word boundary, 26 capital letters, apostrophe). It normalises
  each utterance, so its wrapper should leave ``context`` None.

:func:`merge_ctc_vocabulary` turns either vocabulary's logits into log-probabilities of the
27 classes (letters kept, all other tokens pooled). Without a recogniser, the default is
an offline substitute of the same shape: 27 log mel-band energies
(:class:`~neuralhead.features.audio.LogMelExtractor` with 27 bands, 0-8000 Hz, 50 steps/s).
These are NOT character logits; they carry the spectral envelope of speech, so a model
trained on them has audio conditioning of the same size but not of the same kind.

Memory: the output is built ``chunk_frames`` frames at a time; beyond the waveform (and one
resampled copy where the recogniser needs another rate) a call holds a few MB.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy.fft import dct
from scipy.signal import resample_poly

from neuralhead.errors import InputError
from neuralhead.features.audio import (
    AudioFeatureExtractor,
    LogMelExtractor,
    get_audio_extractor,
    mel_filterbank,
)
from neuralhead.media.audio import load_audio

AUDIO_FEATURE_DIM = 300
"""Length of h_t(a) (Sec. 3.2)."""

NUM_CHARACTER_CLASSES = 27
"""Character classes per audio part: the letters a-z and one class for anything else."""

CHARACTER_CLASSES: tuple[str, ...] = (*"abcdefghijklmnopqrstuvwxyz", "other")
"""Order of the 27 classes (the authors' code): a-z, then one for space, apostrophe, blank..."""

SHORT_TERM_FEATURES: tuple[str, ...] = (
    "zcr",
    "energy",
    "energy_entropy",
    "spectral_centroid",
    "spectral_spread",
    "spectral_entropy",
    "spectral_flux",
    "spectral_rolloff",
    *(f"mfcc_{i}" for i in range(1, 14)),
)
"""The 21 short-term features, in pyAudioAnalysis' order."""

EPS = 1e-8
"""Floor in the entropies, the flux and the MFCC logarithm (the authors' value)."""

ROLLOFF_FRACTION = 0.90
NUM_SUBBLOCKS = 10
NUM_MFCC = 13
MFCC_BANDS = 40
MFCC_F_MIN = 133.33
MFCC_F_MAX = 6854.0


def feature_names(window: int = 8) -> list[str]:
    """Names of the ``84 + window * 27`` entries of the feature vector, in order.

    Character entries are ``char[o]_c``: class c of the part at offset o from frame t.
    """
    both = [*SHORT_TERM_FEATURES, *(f"delta_{name}" for name in SHORT_TERM_FEATURES)]
    names = [f"{name}_mean" for name in both] + [f"{name}_std" for name in both]
    for offset in range(-(window // 2), window - window // 2):
        names += [f"char[{offset:+d}]_{c}" for c in CHARACTER_CLASSES]
    return names


def _block_entropy(values: np.ndarray) -> np.ndarray:
    """Entropy (bits) of the energy shares of 10 equal blocks along the last axis."""
    total = np.sum(values**2, axis=-1)
    block = values.shape[-1] // NUM_SUBBLOCKS
    blocks = values[..., : block * NUM_SUBBLOCKS].reshape(*values.shape[:-1], NUM_SUBBLOCKS, -1)
    shares = np.sum(blocks**2, axis=-1) / (total[..., None] + EPS)
    return -np.sum(shares * np.log2(shares + EPS), axis=-1)


@lru_cache(maxsize=8)
def _mfcc_filters(frame_length: int, sample_rate: int) -> np.ndarray:
    """``(n/2, 40)`` filters for the n/2 spectrum bins below Nyquist."""
    f_max = min(MFCC_F_MAX, sample_rate / 2)
    filters = mel_filterbank(MFCC_BANDS, frame_length, sample_rate, MFCC_F_MIN, f_max)
    return filters[:, : frame_length // 2].T.astype(np.float64)


def short_term_features(frames: np.ndarray, sample_rate: int) -> np.ndarray:
    """The 21 short-term features of consecutive frames, ``(F, n)`` -> ``(F, 21)`` float64.

    Definitions in the module docstring (pyAudioAnalysis [17]). Row i's spectral flux
    compares it with row i-1; row 0's is 0. ``n`` must be even and at least 20 (10 blocks
    in the signal and 10 sub-bands in the spectrum).
    """
    frames = np.asarray(frames, dtype=np.float64)
    if frames.ndim != 2 or frames.shape[1] < 2 * NUM_SUBBLOCKS or frames.shape[1] % 2:
        raise InputError(f"frames must have shape (F, n) with n even and >= 20, got {frames.shape}")
    n = frames.shape[1]
    half = n // 2
    spectrum = np.abs(np.fft.rfft(frames, axis=1)[:, :half]) / half

    zcr = np.sum(np.abs(np.diff(np.sign(frames), axis=1)), axis=1) / 2 / (n - 1)
    energy = np.mean(frames**2, axis=1)
    energy_entropy = _block_entropy(frames)

    # Normalising by the peak makes EPS relative to the spectrum's scale; a silent frame
    # keeps all-zero weights and so a centroid and spread of 0.
    peak = spectrum.max(axis=1, keepdims=True)
    weights = np.divide(spectrum, peak, out=np.zeros_like(spectrum), where=peak > 0)
    freqs = np.arange(half) * sample_rate / n
    weight_sum = weights.sum(axis=1) + EPS
    centroid = (weights @ freqs) / weight_sum
    spread = np.sqrt(np.sum((freqs[None] - centroid[:, None]) ** 2 * weights, axis=1) / weight_sum)
    nyquist = sample_rate / 2

    spectral_entropy = _block_entropy(spectrum)
    shape = spectrum / np.sum(spectrum + EPS, axis=1, keepdims=True)
    flux = np.concatenate([[0.0], np.sum(np.diff(shape, axis=0) ** 2, axis=1)])

    power = spectrum**2
    cumulative = np.cumsum(power, axis=1) + EPS
    above = cumulative > ROLLOFF_FRACTION * power.sum(axis=1, keepdims=True)
    rolloff = np.where(above.any(axis=1), above.argmax(axis=1), 0) / half

    log_bands = np.log10(spectrum @ _mfcc_filters(n, sample_rate) + EPS)
    mfcc = dct(log_bands, type=2, norm="ortho", axis=1)[:, :NUM_MFCC]

    scalars = [zcr, energy, energy_entropy, centroid / nyquist, spread / nyquist]
    scalars += [spectral_entropy, flux, rolloff]
    return np.concatenate([np.stack(scalars, axis=1), mfcc], axis=1)


class CharacterRecognizer(AudioFeatureExtractor):
    """Plugin base for the speech recogniser of Sec. 3.2: 27 class scores per step.

    A subclass is an :class:`~neuralhead.features.audio.AudioFeatureExtractor` with
    ``dim = 27``: it sets ``name``, ``sample_rate``, ``hop`` (``rate = sample_rate / hop``
    steps per second) and, if its steps depend on a bounded stretch of samples,
    ``context``; ``__call__(waveform)`` maps a mono float32 waveform at ``sample_rate``
    to ``(len(waveform) // hop + 1, 27)`` scores, step k centred on sample ``k * hop``,
    columns in :data:`CHARACTER_CLASSES` order (log-probabilities or logits;
    :func:`merge_ctc_vocabulary` converts a CTC model's). Load one with
    ``HeadGANAudioFeatures(recognizer="package.module:ClassName")``.
    """

    num_classes: int = NUM_CHARACTER_CLASSES
    dim: int = NUM_CHARACTER_CLASSES


def merge_ctc_vocabulary(logits: np.ndarray, vocabulary: Sequence[str]) -> np.ndarray:
    """Log-probabilities of the 27 character classes from a CTC model's ``(steps, V)`` logits.

    ``vocabulary[i]`` names output i. A token that is a single letter (either case) keeps
    its own class; all the others (CTC blank, space or word boundary, apostrophe,
    ``<s>``, ``<unk>``...) are pooled into "other" by adding their probabilities
    (log-sum-exp). DeepSpeech's 29 outputs and wav2vec2-base-960h's 32 both fit.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != len(vocabulary):
        raise InputError(
            f"logits must have shape (steps, {len(vocabulary)}) for a vocabulary of "
            f"{len(vocabulary)} tokens, got {logits.shape}"
        )
    class_of = [
        CHARACTER_CLASSES.index(token.lower())
        if len(token) == 1 and token.isascii() and token.isalpha()
        else NUM_CHARACTER_CLASSES - 1
        for token in vocabulary
    ]
    missing = sorted(set(CHARACTER_CLASSES) - {CHARACTER_CLASSES[c] for c in class_of})
    if missing:
        raise InputError(f"the vocabulary has no token for the character classes {missing}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    out = np.full((len(logits), NUM_CHARACTER_CLASSES), -np.inf)
    for index, cls in enumerate(class_of):
        out[:, cls] = np.logaddexp(out[:, cls], log_probs[:, index])
    return out


def load_character_recognizer(
    recognizer: str | AudioFeatureExtractor | None = None, **kwargs: object
) -> AudioFeatureExtractor:
    """The recogniser for :class:`HeadGANAudioFeatures`: an extractor with 27 values a step.

    ``None`` gives the offline substitute, 27 log mel-band energies (not character scores;
    see the module docstring). A string is a registered audio extractor name or
    ``"package.module:ClassName"`` built with ``kwargs``
    (:func:`~neuralhead.features.audio.get_audio_extractor`); an extractor is used as given.
    """
    if recognizer is None:
        extractor: object = LogMelExtractor(num_bands=NUM_CHARACTER_CLASSES)
    elif isinstance(recognizer, str):
        extractor = get_audio_extractor(recognizer, **kwargs)
    else:
        extractor = recognizer
    if not isinstance(extractor, AudioFeatureExtractor):
        raise InputError(
            "the speech recogniser must be an AudioFeatureExtractor, "
            f"got {type(extractor).__name__}"
        )
    if extractor.dim != NUM_CHARACTER_CLASSES:
        raise InputError(
            f"speech recogniser {recognizer!r} gives {extractor.dim} values per step; HeadGAN "
            f"needs {NUM_CHARACTER_CLASSES} character classes (see merge_ctc_vocabulary)"
        )
    return extractor


def _resample(waveform: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    if source_rate == target_rate:
        return waveform
    ratio = Fraction(target_rate, source_rate)
    return resample_poly(waveform, ratio.numerator, ratio.denominator).astype(np.float32)


def _segment(waveform: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``waveform[start:stop]`` with zeros for the samples outside the waveform."""
    out = np.zeros(stop - start, np.float32)
    lo, hi = max(start, 0), min(stop, len(waveform))
    if hi > lo:
        out[lo - start : hi - start] = waveform[lo:hi]
    return out


class HeadGANAudioFeatures:
    """Waveform -> ``(num_frames, 300)`` float32 audio features h_t(a) (HeadGAN Sec. 3.2).

    ``recognizer`` is anything :func:`load_character_recognizer` takes (default: the
    log-mel substitute). ``window`` is 2w (8 in the paper). ``sample_rate`` is the rate of
    the low-level analysis (16 kHz, our choice; other inputs are resampled, since the
    normalised centroid, spread and roll-off depend on it). ``frames_per_part`` and
    ``short_window`` set the short-term analysis (module docstring). ``chunk_frames``
    bounds the memory: the output is computed that many frames at a time.
    """

    def __init__(
        self,
        recognizer: str | AudioFeatureExtractor | None = None,
        fps: float = 25.0,
        *,
        sample_rate: int = 16000,
        window: int = 8,
        frames_per_part: int = 16,
        short_window: float = 0.5,
        chunk_frames: int = 25,
    ) -> None:
        if not fps > 0 or not sample_rate > 0:
            raise InputError(f"fps and sample_rate must be positive, got {fps} and {sample_rate}")
        if window < 2 or window % 2:
            raise InputError(f"window (2w) must be even and >= 2, got {window}")
        if frames_per_part < 1 or not short_window > 0 or chunk_frames < 1:
            raise InputError("frames_per_part, short_window and chunk_frames must be positive")
        self.recognizer = load_character_recognizer(recognizer)
        self.fps = float(fps)
        self.sample_rate = int(sample_rate)
        self.window = window
        self.frames_per_part = frames_per_part
        self.chunk_frames = chunk_frames
        self.part_length = self.sample_rate / self.fps
        self.frame_length = 2 * round(short_window * self.part_length / 2)
        if self.frame_length < 2 * NUM_SUBBLOCKS:
            raise InputError(
                f"short frames of {self.frame_length} samples are too short (at least 20): "
                f"raise short_window or sample_rate, or lower fps ({fps})"
            )
        self.dim = 4 * len(SHORT_TERM_FEATURES) + window * NUM_CHARACTER_CLASSES

    def __call__(self, waveform: np.ndarray, sample_rate: int, num_frames: int) -> np.ndarray:
        """Features of frames ``0 .. num_frames-1`` of a video at ``fps``, ``(num_frames, dim)``.

        ``waveform`` is mono audio in [-1, 1] starting with frame 0. Audio beyond the last
        frame's window is ignored; missing audio counts as silence.
        """
        waveform = np.asarray(waveform)
        if waveform.ndim != 1:
            raise InputError(f"expected a mono waveform of shape (n,), got {waveform.shape}")
        if not np.issubdtype(waveform.dtype, np.floating):
            raise InputError(f"waveform must be float in [-1, 1], got dtype {waveform.dtype}")
        if not np.isfinite(waveform).all():
            raise InputError("waveform contains NaN or infinite samples")
        if sample_rate <= 0 or num_frames < 0:
            raise InputError(
                f"sample_rate must be positive and num_frames >= 0, got {sample_rate}, {num_frames}"
            )
        out = np.empty((num_frames, self.dim), np.float32)
        if num_frames == 0:
            return out
        waveform = waveform.astype(np.float32, copy=False)
        analysed = _resample(waveform, sample_rate, self.sample_rate)
        recognised = _resample(waveform, sample_rate, self.recognizer.sample_rate)
        whole_steps = None
        if self.recognizer.context is None:
            whole_steps = self._whole_recognizer_steps(recognised, num_frames)

        half = self.window // 2
        offsets = np.arange(self.window) - half
        for first in range(0, num_frames, self.chunk_frames):
            frames = np.arange(first, min(first + self.chunk_frames, num_frames))
            lo = max(first - half, 0)
            hi = min(frames[-1] + self.window - half - 1, num_frames - 1)
            parts = np.clip(frames[:, None] + offsets, 0, num_frames - 1) - lo
            low = self._part_short_term(analysed, lo, hi)[parts]
            low = low.reshape(len(frames), -1, low.shape[-1])
            chars = self._part_characters(recognised, lo, hi, whole_steps)[parts]
            out[frames] = np.concatenate(
                [low.mean(axis=1), low.std(axis=1), chars.reshape(len(frames), -1)], axis=1
            )
        return out

    def _part_short_term(self, waveform: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Short-term features and deltas of parts lo..hi: ``(parts, frames_per_part, 42)``."""
        per_part = self.frames_per_part
        index = np.arange(lo * per_part - 1, (hi + 1) * per_part)
        # The extra leading frame feeds the first delta and flux; at the start of the signal
        # it is the first frame itself, which makes both 0 as in pyAudioAnalysis.
        index[0] = max(index[0], 0)
        centres = (index + 0.5) * self.part_length / per_part
        starts = np.floor(centres - self.frame_length / 2 + 0.5).astype(np.int64)
        segment = _segment(waveform, int(starts[0]), int(starts[-1]) + self.frame_length)
        frames = segment[(starts - starts[0])[:, None] + np.arange(self.frame_length)]
        features = short_term_features(frames, self.sample_rate)
        both = np.concatenate([features[1:], np.diff(features, axis=0)], axis=1)
        return both.reshape(hi - lo + 1, per_part, -1)

    def _step_ranges(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Recogniser steps ``[first, end)`` averaged into each part lo..hi."""
        steps_per_frame = self.recognizer.rate / self.fps
        parts = np.arange(lo, hi + 1)
        # Step k is centred at k / rate seconds; a part takes the steps centred inside it,
        # or the one nearest its centre when the recogniser is slower than the video.
        first = np.ceil(parts * steps_per_frame - 1e-9).astype(np.int64)
        end = np.ceil((parts + 1) * steps_per_frame - 1e-9).astype(np.int64)
        nearest = np.floor((parts + 0.5) * steps_per_frame + 0.5).astype(np.int64)
        empty = end <= first
        return np.where(empty, nearest, first), np.where(empty, nearest + 1, end)

    def _whole_recognizer_steps(self, waveform: np.ndarray, num_frames: int) -> np.ndarray:
        _, end = self._step_ranges(0, max(num_frames - 1, 0))
        length = max(len(waveform), int(end.max()) * self.recognizer.hop + 1)
        return self._recognize(_segment(waveform, 0, length))

    def _recognize(self, waveform: np.ndarray) -> np.ndarray:
        steps = np.asarray(self.recognizer(waveform), dtype=np.float64)
        expected = (self.recognizer.num_steps(len(waveform)), NUM_CHARACTER_CLASSES)
        if steps.shape != expected:
            raise InputError(
                f"speech recogniser {type(self.recognizer).__name__} returned shape "
                f"{steps.shape} for {len(waveform)} samples, expected {expected}"
            )
        return steps

    def _part_characters(
        self, waveform: np.ndarray, lo: int, hi: int, whole_steps: np.ndarray | None
    ) -> np.ndarray:
        """Recogniser scores of parts lo..hi averaged over their steps: ``(parts, 27)``."""
        first, end = self._step_ranges(lo, hi)
        if whole_steps is not None:
            steps, origin = whole_steps, 0
        else:
            hop, context = self.recognizer.hop, self.recognizer.context
            margin = -(-context // hop)
            origin = int(first.min()) - margin
            stop = (int(end.max()) - 1 + margin) * hop + 1
            steps = self._recognize(_segment(waveform, origin * hop, stop))
        totals = np.concatenate([np.zeros((1, steps.shape[1])), np.cumsum(steps, axis=0)])
        sums = totals[end - origin] - totals[first - origin]
        return sums / (end - first)[:, None]


def audio_features_for_video(
    path: str | os.PathLike,
    fps: float,
    num_frames: int,
    *,
    recognizer: str | AudioFeatureExtractor | None = None,
) -> np.ndarray:
    """HeadGAN audio features ``(num_frames, 300)`` of the first audio track of a file.

    ``path`` is a wav or any audio/video file PyAV reads; it is decoded to mono at 16 kHz
    (and resampled again only if the recogniser needs another rate).
    """
    features = HeadGANAudioFeatures(recognizer, fps)
    waveform = load_audio(path, features.sample_rate)
    return features(waveform, features.sample_rate, num_frames)
