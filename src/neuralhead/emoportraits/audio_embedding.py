"""Per-video-frame audio embeddings, the input of EMOPortraits' speech encoder E_aud.

Supplementary Sec. 2.1: "we use Whisper to retrieve audio embeddings from a raw audio clip
containing speech. This step yields a series of T audio embedding vectors, where each vector
is linked to a specific frame in the video clip." The paper says neither which Whisper model
nor which layer; :class:`WhisperEmbedder` takes the encoder's last hidden state of any
Whisper checkpoint saved in the transformers format (our choice of layer).

Whisper's weights cannot be downloaded on machines without internet, so
:class:`SubstituteEmbedder` offers a stand-in of the same shape built from Whisper's own front
end (log mel energies) and no weights. It carries far less information about speech than
Whisper's encoder: an E_aud trained on it is a working pipeline, not the paper's model.

Both implement :class:`AudioEmbedder`. Alignment, shared by both: video frame ``i`` is on
screen during ``[i / fps, (i + 1) / fps)``; its embedding describes the audio of that
interval. The waveform is cut or padded with silence to the video's duration before it is
embedded, so the output always has one row per video frame.
"""

from __future__ import annotations

import math
import os
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from scipy.signal import resample_poly

from neuralhead.data.format import DatasetFiles
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.features.audio import mel_filterbank
from neuralhead.fileio import save_safetensors_atomic
from neuralhead.media.audio import load_audio

#: Sample rate Whisper and the substitute work at.
SAMPLE_RATE = 16000

#: Directory of a prepared dataset that holds cached embeddings, one file per embedder.
CACHE_DIR = "audio_embeddings"

#: Files a transformers Whisper directory needs (weights: one safetensors file or an index).
WHISPER_FILES = ("config.json", "preprocessor_config.json")
WHISPER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


@runtime_checkable
class AudioEmbedder(Protocol):
    """Turns a waveform into one ``dim``-wide embedding per video frame.

    ``name`` identifies the embedder and its weights (it names the dataset cache file, so two
    embedders with different outputs must not share it).
    """

    name: str
    dim: int

    def embed(
        self, waveform: np.ndarray, sample_rate: int, num_frames: int, fps: float
    ) -> torch.Tensor:
        """Embeddings ``(num_frames, dim)`` float32 of a mono waveform."""
        ...


def resample(waveform: np.ndarray, sample_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A mono waveform at ``target_rate`` (polyphase resampling, float32)."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if sample_rate == target_rate:
        return waveform
    ratio = Fraction(target_rate, sample_rate)
    return resample_poly(waveform, ratio.numerator, ratio.denominator).astype(np.float32)


def _video_waveform(
    waveform: np.ndarray, sample_rate: int, num_frames: int, fps: float
) -> np.ndarray:
    """Check the arguments of :meth:`AudioEmbedder.embed` and return the waveform at 16 kHz,
    cut or padded with silence to the video's duration ``num_frames / fps``."""
    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise InputError(f"expected a mono waveform shaped (samples,), got {waveform.shape}")
    if sample_rate <= 0 or fps <= 0 or num_frames < 0:
        raise InputError(
            f"sample_rate and fps must be positive and num_frames >= 0, got sample_rate="
            f"{sample_rate}, fps={fps}, num_frames={num_frames}"
        )
    audio = resample(waveform, sample_rate)
    length = math.ceil(num_frames / fps * SAMPLE_RATE)
    out = np.zeros(length, np.float32)
    out[: min(length, len(audio))] = audio[:length]
    return out


def to_video_frames(
    features: torch.Tensor, rate: float, num_frames: int, fps: float
) -> torch.Tensor:
    """Resample features ``(K, D)``, step ``k`` centred at ``k / rate`` s, to video frames.

    Frame ``i`` gets the mean of the steps whose centre lies in ``[i / fps, (i + 1) / fps)``
    (two Whisper steps per frame at 25 fps). Where no step falls in the interval (``fps`` above
    ``rate``), the features are interpolated linearly at the interval's centre. Frames past the
    last step repeat it.
    """
    steps, dim = features.shape
    if steps == 0:
        return features.new_zeros(num_frames, dim)
    frame_of_step = torch.floor(torch.arange(steps, dtype=torch.float64) * fps / rate + 1e-9).long()
    inside = frame_of_step < num_frames
    sums = features.new_zeros(num_frames, dim).index_add_(
        0, frame_of_step[inside], features[inside]
    )
    counts = torch.bincount(frame_of_step[inside], minlength=num_frames)[:num_frames]
    out = sums / counts.clamp_min(1).unsqueeze(1).to(features.dtype)
    empty = counts == 0
    if empty.any():
        position = (torch.arange(num_frames, dtype=torch.float64)[empty] + 0.5) * rate / fps
        position = position.clamp(0, steps - 1)
        lower = position.floor().long()
        upper = (lower + 1).clamp_max(steps - 1)
        weight = (position - lower).to(features.dtype).unsqueeze(1)
        out[empty] = features[lower] * (1 - weight) + features[upper] * weight
    return out


class SubstituteEmbedder:
    """Offline stand-in for Whisper embeddings: stacked log mel energies, no weights.

    NOT Whisper and not a learned representation. It exists so that E_aud can be trained and
    run where Whisper's weights cannot be had; its shape matches a Whisper encoder of width
    ``dim`` (default 384, whisper-tiny's ``d_model``).

    Whisper's own front end: 80 mel bands (HTK scale here, Slaney in Whisper; 0-8 kHz) of the
    power spectrum on 25 ms Hann windows every 10 ms at 16 kHz, ``log10``, values below the
    clip's maximum minus 8 raised to it (Whisper's dynamic-range floor). Each band is then
    standardised over the clip (mean 0, standard deviation 1, the deviation floored at 0.1 so
    that near-constant bands are not blown up); our choice, so that loudness and the recording
    channel matter less. Video frame ``i`` gets the ``ceil(dim / 80)`` consecutive 10 ms steps
    centred on its interval's middle ``(i + 0.5) / fps`` (steps outside the clip repeat its
    first or last step), flattened step-major and cut to ``dim`` values: for ``dim = 384``,
    five steps (50 ms) with the top 16 bands of the last one dropped.
    """

    num_bands = 80
    hop = 160
    win_length = 400
    n_fft = 400
    dynamic_range = 8.0
    min_std = 0.1

    def __init__(self, dim: int = 384) -> None:
        if dim <= 0:
            raise InputError(f"the substitute embedder's dim must be positive, got {dim}")
        self.dim = int(dim)
        self.name = f"substitute-{self.dim}"
        self.context = math.ceil(self.dim / self.num_bands)
        self._window = torch.hann_window(self.win_length, periodic=True)
        self._filters = torch.from_numpy(
            mel_filterbank(self.num_bands, self.n_fft, SAMPLE_RATE, 0.0, SAMPLE_RATE / 2)
        )

    def log_mel(self, waveform: np.ndarray) -> torch.Tensor:
        """Per-band standardised log mel energies ``(len // 160 + 1, 80)`` of 16 kHz audio."""
        signal = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
        if len(signal) <= self.n_fft // 2:
            # Reflection padding needs more samples than half a window; silence is equivalent.
            signal = torch.nn.functional.pad(signal, (0, self.n_fft // 2 + 1 - len(signal)))
        spectrum = torch.stft(
            signal,
            n_fft=self.n_fft,
            hop_length=self.hop,
            win_length=self.win_length,
            window=self._window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        power = spectrum.real.square() + spectrum.imag.square()
        log_mel = torch.log10((self._filters @ power).clamp_min(1e-10))
        log_mel = torch.maximum(log_mel, log_mel.max() - self.dynamic_range).T
        log_mel = log_mel[: len(waveform) // self.hop + 1]
        mean = log_mel.mean(dim=0)
        std = log_mel.std(dim=0, unbiased=False).clamp_min(self.min_std)
        return (log_mel - mean) / std

    def embed(
        self, waveform: np.ndarray, sample_rate: int, num_frames: int, fps: float
    ) -> torch.Tensor:
        audio = _video_waveform(waveform, sample_rate, num_frames, fps)
        if num_frames == 0:
            return torch.zeros(0, self.dim)
        bands = self.log_mel(audio)
        step_rate = SAMPLE_RATE / self.hop
        centres = (torch.arange(num_frames, dtype=torch.float64) + 0.5) / fps * step_rate
        first = torch.floor(centres - (self.context - 1) / 2 + 0.5).long()
        indices = (first[:, None] + torch.arange(self.context)[None]).clamp(0, len(bands) - 1)
        stacked = bands[indices].reshape(num_frames, -1)
        return stacked[:, : self.dim].contiguous().float()


def _require_whisper_directory(path: Path) -> None:
    missing = [name for name in WHISPER_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in WHISPER_WEIGHTS):
        missing.append(WHISPER_WEIGHTS[0])
    if not missing:
        return
    found = "does not exist" if not path.is_dir() else f"lacks {', '.join(missing)}"
    raise WeightsMissingError(
        f"Whisper model directory {path} {found}. Whisper's weights are not bundled: on a "
        "machine with internet run `hf download openai/whisper-base --local-dir whisper-base` "
        "(or `huggingface-cli download ...` with an older huggingface_hub; any openai/whisper-* "
        "model works), copy the directory here and pass --audio-embedder whisper:PATH. Only "
        "safetensors weights are read (model.safetensors), never pickled .bin files."
    )


class WhisperEmbedder:
    """Whisper encoder embeddings (supplementary Sec. 2.1), from a local transformers directory.

    ``path`` holds a Whisper checkpoint in the transformers format (``config.json``,
    ``preprocessor_config.json``, ``model.safetensors``), e.g. ``openai/whisper-base``
    downloaded with ``hf download``. Nothing is fetched from the internet and weights are
    only read from safetensors.

    The audio, resampled to 16 kHz, is cut into 30 s windows; each is padded to 30 s by
    :class:`~transformers.WhisperFeatureExtractor` (Whisper only accepts 30 s inputs) and run
    through the encoder. Its last hidden state has 50 steps per second (step ``k`` centred at
    ``k / 50`` s), ``d_model`` wide; only the steps covering real audio are kept, and the
    windows' steps are concatenated. :func:`to_video_frames` then averages the steps that fall
    in each video frame's interval (two per frame at 25 fps).
    """

    def __init__(
        self, path: str | os.PathLike, *, device: str = "cpu", batch_size: int = 4
    ) -> None:
        from transformers import WhisperFeatureExtractor, WhisperModel

        path = Path(path).expanduser()
        _require_whisper_directory(path)
        try:
            self.feature_extractor = WhisperFeatureExtractor.from_pretrained(
                path, local_files_only=True
            )
            model = WhisperModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as e:
            first_line = (str(e) or type(e).__name__).splitlines()[0]
            raise WeightsMissingError(
                f"cannot load the Whisper model in {path}: {first_line}"
            ) from e
        self.encoder = model.get_encoder().to(device).eval().requires_grad_(False)
        self.device = device
        self.batch_size = batch_size
        self.dim = int(model.config.d_model)
        self.name = f"whisper-{path.resolve().name}"
        fe = self.feature_extractor
        self.window_samples = int(fe.n_samples)
        stride = self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0]
        self.samples_per_step = int(fe.hop_length) * stride
        self.rate = fe.sampling_rate / self.samples_per_step

    @torch.inference_mode()
    def encode(self, audio: np.ndarray) -> torch.Tensor:
        """Encoder steps ``(ceil(len / 320), d_model)`` of 16 kHz audio, on the CPU."""
        windows = [
            audio[start : start + self.window_samples]
            for start in range(0, len(audio), self.window_samples)
        ]
        parts = []
        for first in range(0, len(windows), self.batch_size):
            batch = windows[first : first + self.batch_size]
            features = self.feature_extractor(
                batch, sampling_rate=SAMPLE_RATE, return_tensors="pt"
            ).input_features
            dtype = next(self.encoder.parameters()).dtype
            hidden = self.encoder(features.to(self.device, dtype)).last_hidden_state
            for window, states in zip(batch, hidden, strict=True):
                parts.append(states[: math.ceil(len(window) / self.samples_per_step)].float().cpu())
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)

    def embed(
        self, waveform: np.ndarray, sample_rate: int, num_frames: int, fps: float
    ) -> torch.Tensor:
        audio = _video_waveform(waveform, sample_rate, num_frames, fps)
        return to_video_frames(self.encode(audio), self.rate, num_frames, fps).contiguous()


def load_audio_embedder(spec: str | None = None, *, device: str = "cpu") -> AudioEmbedder:
    """An embedder from a spec: ``None`` or ``"substitute"`` (384 values per frame),
    ``"substitute:DIM"``, or ``"whisper:PATH"`` (a local transformers Whisper directory)."""
    if spec is None or spec == "substitute":
        return SubstituteEmbedder()
    kind, _, argument = spec.partition(":")
    if kind == "substitute" and argument:
        try:
            dim = int(argument)
        except ValueError:
            dim = 0
        if dim <= 0:
            raise InputError(f"audio embedder {spec!r}: DIM must be a positive integer")
        return SubstituteEmbedder(dim)
    if kind == "whisper" and argument:
        return WhisperEmbedder(argument, device=device)
    raise InputError(
        f"unknown audio embedder {spec!r}: use 'substitute', 'substitute:DIM' or 'whisper:PATH'"
    )


def _read_cache(path: Path, num_frames: int, dim: int, fps: float) -> torch.Tensor | None:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            embeddings = f.get_tensor("embeddings")
    except (OSError, SafetensorError):
        return None
    if embeddings.shape != (num_frames, dim) or metadata.get("fps") != repr(fps):
        return None
    return embeddings


def dataset_audio_embeddings(
    dataset_dir: str | os.PathLike, embedder: AudioEmbedder, *, cache: bool = True
) -> torch.Tensor:
    """Embeddings ``(num_frames, dim)`` of a prepared dataset's audio, one row per frame.

    With ``cache``, they are read from or written (atomically) to
    ``dataset_dir/audio_embeddings/<embedder.name>.safetensors``; a cached file whose frame
    count, width or frame rate differs from the dataset's is recomputed. A dataset that cannot
    be written to is embedded anyway, with a warning.
    """
    files = DatasetFiles.open(dataset_dir)
    if not files.has_audio:
        raise InputError(
            f"dataset {files.root} has no audio (its video had no sound track); "
            "speech-driven training needs audio"
        )
    audio_path = files.root / files.meta["audio"].get("file", "audio.wav")
    if not audio_path.is_file():
        raise InputError(f"dataset {files.root} is missing its audio file {audio_path.name}")
    num_frames, fps = files.num_frames, files.fps
    cache_path = files.root / CACHE_DIR / f"{embedder.name}.safetensors"
    if cache and cache_path.is_file():
        cached = _read_cache(cache_path, num_frames, embedder.dim, fps)
        if cached is not None:
            return cached
    embeddings = embedder.embed(load_audio(audio_path, SAMPLE_RATE), SAMPLE_RATE, num_frames, fps)
    if cache:
        metadata = {"embedder": embedder.name, "fps": repr(fps), "num_frames": str(num_frames)}
        try:
            cache_path.parent.mkdir(exist_ok=True)
            save_safetensors_atomic({"embeddings": embeddings}, cache_path, metadata)
        except OSError as e:
            warnings.warn(f"could not cache audio embeddings in {cache_path}: {e}", stacklevel=2)
    return embeddings
