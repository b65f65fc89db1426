"""``neuralhead benchmark``: generator time per frame and peak memory.

Each configuration (model preset x device x precision) runs in a fresh process, so peak
memory belongs to that configuration alone: on GPU ``torch.cuda.max_memory_allocated``, on
CPU the growth of the process's peak resident set size during inference. Timing covers the
generator's forward pass only (as in DNP Table 4: "forward pass time ... without data
pre-processing"), batch 1 by default, after warm-up; the median of the timed iterations is
reported with the mean and the 90th percentile.

Models: ``dnp`` (the ``dnp-<resolution>`` presets) and ``headgan`` (the generator G = (F, R)
of ``headgan-256``, with audio, at the given resolution; 256 is the paper's). For HeadGAN the
time excludes the face tracking, 3DMM fitting, NCC rendering and audio features that prepare
its inputs. The paper figures, recorded beside each row, are DNP's Table 4 (Tesla V100),
which also lists HeadGAN at 41 ms per 256x256 frame.

MegaPortraits (each at the resolution of the input it takes; 512, the paper's, by default):
``megaportraits-base`` times G_base per driving frame, the way reenactment runs it: the
source is encoded once outside the timing (E_app, the source warp and G3D), and each frame
runs E_mtn, the driver warp, P and G2D (:class:`MegaPortraitsFrame`);
``megaportraits-enhancer`` times G_enh alone (512 -> 1024, Sec. 3.2), to be added to the
base model's time for G_HR; ``megaportraits-student`` times the distilled student G_DT with
100 avatars (Sec. 3.3). The paper's only speed figure, recorded in ``paper_reference`` of
the student's 512 rows, is 130 FPS on an RTX 3090 in FP16 (Sec. 4.5, Fig. 6); the paper
does not say at which resolution (its student is distilled from the base and the
high-resolution models), so 512, the base model's, is our reading.

EMOPortraits: ``emoportraits-base`` times the main model per driving frame as
``megaportraits-base`` does (the ``emoportraits-*`` preset: same networks, 128-d expression
code); ``emoportraits-speech`` times what speech driving adds per frame, E_aud and the head-motion
generator over one 64-frame window of audio embeddings (the generator's window), per frame; the
audio embedder (Whisper) and the render (``emoportraits-base``) are not included. The paper
gives no speed figure for either.

Half precision runs the model under ``torch.autocast`` (bf16 or fp16); a precision the
device cannot run is recorded as unsupported with the reason, not skipped silently.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from neuralhead import __version__
from neuralhead.errors import InputError
from neuralhead.fileio import write_json_atomic

# DNP Table 4, forward time on a Tesla V100 (ms per frame), for DNP and for HeadGAN.
PAPER_MS = {"dnp": {256: 11.0, 512: 31.0, 1024: 42.0}, "headgan": {256: 41.0}}

#: Speed figures the papers give on other GPUs: model -> resolution -> figure.
PAPER_REFERENCE = {
    "megaportraits-student": {
        512: {"ms": 1000.0 / 130.0, "fps": 130.0, "device": "NVIDIA RTX 3090",
              "precision": "fp16", "source": "MegaPortraits Sec. 4.5"},
    },
}  # fmt: skip

#: Resolutions benchmarked when none are given: those the papers report.
DEFAULT_RESOLUTIONS = {
    "dnp": (256, 512, 1024),
    "headgan": (256,),
    "megaportraits-base": (512,),
    "megaportraits-enhancer": (512,),
    "megaportraits-student": (512,),
    "emoportraits-base": (512,),
    "emoportraits-speech": (512,),
}

#: Frames of audio the speech benchmark drives at once (the head-motion generator's window).
SPEECH_WINDOW = 64

#: Avatars of the benchmarked student (the paper's 100, Sec. 4.1).
STUDENT_AVATARS = 100


class MegaPortraitsFrame(torch.nn.Module):
    """G_base per driving frame: ``forward(driver)`` renders one source encoded beforehand."""

    def __init__(self, base: torch.nn.Module, source: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.source_image = source
        with torch.inference_mode():
            self.source = base.encode_source(source)

    def forward(self, driver: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.base.render(self.source, self.base.encode_driver(driver))


class EMOSpeechWindow(torch.nn.Module):
    """E_aud's codes and the generated head motion for a window of audio embeddings.

    ``forward(audio)`` takes ``(1, T, A)`` and returns ``(T, d + 9)``: each frame's expression
    code and its rotation (6D) and translation relative to the first frame.
    """

    def __init__(self, encoder: torch.nn.Module, rotation: torch.nn.Module, z0: torch.Tensor) -> None:
        super().__init__()
        self.encoder, self.rotation, self.z0 = encoder, rotation, z0

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        codes = self.encoder(audio, self.z0)[0]
        return torch.cat([codes, self.rotation(audio)[0].to(codes)], dim=1)


def _emoportraits_and_inputs(model: str, resolution: int, batch: int, device: torch.device):
    from neuralhead.emoportraits.config import preset

    config = (
        preset("emoportraits-256")
        if resolution == 256
        else preset("emoportraits-512", image_size=resolution, volume_size=resolution // 8)
    )
    if model == "emoportraits-base":
        from neuralhead.megaportraits.base_model import MegaPortraitsBase

        base = MegaPortraitsBase(config).to(device).eval()
        net = MegaPortraitsFrame(base, torch.rand(1, 3, resolution, resolution, device=device))
        return net, {"driver": torch.rand(batch, 3, resolution, resolution, device=device)}
    from neuralhead.emoportraits.audio_encoder import SpeechEncoderConfig, SpeechExpressionEncoder
    from neuralhead.emoportraits.rotation_generator import RotationGenerator, rotation_preset

    if batch != 1:
        raise InputError(f"emoportraits-speech drives one {SPEECH_WINDOW}-frame window: use batch 1")
    encoder = SpeechExpressionEncoder(SpeechEncoderConfig(expression_dim=config.expression_dim))
    rotation = RotationGenerator(rotation_preset("rotation"))
    z0 = torch.randn(1, config.expression_dim, device=device)
    net = EMOSpeechWindow(encoder, rotation, z0).to(device).eval()
    net.frames_per_call = SPEECH_WINDOW
    audio = torch.randn(1, SPEECH_WINDOW, encoder.config.audio_dim, device=device)
    return net, {"audio": audio}


def _megaportraits_and_inputs(model: str, resolution: int, batch: int, device: torch.device):
    """The paper-sized MegaPortraits network for ``model`` taking ``resolution`` inputs."""
    if model == "megaportraits-base":
        from neuralhead.megaportraits.base_model import MegaPortraitsBase
        from neuralhead.megaportraits.config import preset

        # The 256 preset has its own volume depths; other sides scale the 512 model's volume.
        config = (
            preset("megaportraits-256")
            if resolution == 256
            else preset("megaportraits-512", image_size=resolution, volume_size=resolution // 8)
        )
        base = MegaPortraitsBase(config).to(device).eval()
        source = torch.rand(1, 3, resolution, resolution, device=device)
        net = MegaPortraitsFrame(base, source)
        return net, {"driver": torch.rand(batch, 3, resolution, resolution, device=device)}
    if model == "megaportraits-enhancer":
        from neuralhead.megaportraits.enhancer import Enhancer, enhancer_preset

        net = Enhancer(enhancer_preset("enhancer-512", input_size=resolution)).to(device).eval()
        return net, {"image": torch.rand(batch, 3, resolution, resolution, device=device)}
    from neuralhead.megaportraits.student import Student, student_preset

    config = student_preset("student-512", image_size=resolution, num_avatars=STUDENT_AVATARS)
    net = Student(config).to(device).eval()
    inputs = {
        "driver": torch.rand(batch, 3, resolution, resolution, device=device),
        "avatar_index": torch.arange(batch, device=device) % STUDENT_AVATARS,
    }
    return net, inputs


def _headgan_and_inputs(resolution: int, batch: int, device: torch.device):
    from neuralhead.headgan.generator import create_generator

    net = create_generator("headgan-256", image_size=resolution).to(device).eval()
    c = net.config
    size = (resolution, resolution)
    inputs = {
        "driving": torch.rand(batch, c.driving_channels, *size, device=device),
        "reference_image": torch.rand(batch, 3, *size, device=device),
        "reference_render": torch.rand(batch, c.render_channels, *size, device=device),
        "audio": torch.randn(batch, c.audio_dim, device=device),
    }
    return net, inputs


def _model_and_inputs(model: str, resolution: int, batch: int, device: torch.device):
    if model == "headgan":
        return _headgan_and_inputs(resolution, batch, device)
    if model.startswith("megaportraits-"):
        return _megaportraits_and_inputs(model, resolution, batch, device)
    if model.startswith("emoportraits-"):
        return _emoportraits_and_inputs(model, resolution, batch, device)
    if model != "dnp":
        raise ValueError(f"unknown model {model!r}")
    from neuralhead.dnp import DynamicNeuralPortrait, preset

    net = DynamicNeuralPortrait(preset(f"dnp-{resolution}", num_latents=1000)).to(device).eval()
    c = net.config
    inputs = {
        "pose": torch.randn(batch, 6, device=device),
        "gaze": torch.randn(batch, 2, device=device),
        "expression": torch.randn(batch, c.num_expression, device=device),
    }
    return net, inputs


def _run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Benchmark one configuration (runs in its own process)."""
    import resource

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    result = dict(spec)
    result["threads"] = torch.get_num_threads()
    try:
        net, inputs = _model_and_inputs(spec["model"], spec["resolution"], spec["batch_size"], device)
        result["parameters"] = sum(p.numel() for p in net.parameters())
        precision = spec["precision"]
        if precision == "fp32":
            autocast = torch.autocast(device.type, enabled=False)
        else:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            autocast = torch.autocast(device.type, dtype=dtype)

        def forward() -> None:
            with torch.inference_mode(), autocast:
                out = net(**inputs)
            # DNP returns an output object, HeadGAN and G_base a dict, G_enh and G_DT a tensor.
            if isinstance(out, dict):
                out = out["image"]
            elif not torch.is_tensor(out):
                out = out.image
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if not torch.isfinite(out.float()).all():
                raise RuntimeError("non-finite output")

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(spec["warmup"]):
            forward()
        times = []
        for _ in range(spec["iterations"]):
            start = time.perf_counter()
            forward()
            frames = getattr(net, "frames_per_call", spec["batch_size"])
            times.append((time.perf_counter() - start) * 1000.0 / frames)
        times.sort()
        result.update(
            status="ok",
            ms_median=statistics.median(times),
            ms_mean=statistics.fmean(times),
            ms_p90=times[min(len(times) - 1, int(0.9 * len(times)))],
        )
        result["fps"] = 1000.0 / result["ms_median"]
        if device.type == "cuda":
            result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
            result["peak_memory_mb"] = max(grown, 0) / 1024.0
            result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (RuntimeError, NotImplementedError, TypeError, InputError) as exc:
        result.update(status="unsupported", reason=str(exc).splitlines()[0][:200])
    return result


def _machine(devices: list[str]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "neuralhead": __version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    if "cuda" in devices:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_benchmark(
    model: str = "dnp",
    resolutions: list[int] | tuple[int, ...] | None = None,
    precisions: list[str] | tuple[str, ...] = ("fp32", "bf16", "fp16"),
    devices: list[str] | None = None,
    batch_size: int = 1,
    iterations: int = 10,
    warmup: int = 3,
    threads: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Benchmark every configuration; write and return the results.

    ``resolutions`` default to :data:`DEFAULT_RESOLUTIONS` of the model. A configuration
    that takes longer than ``timeout_s`` is stopped and recorded as such.
    """
    if model not in DEFAULT_RESOLUTIONS:
        raise InputError(f"unknown model {model!r}; benchmarked models: {', '.join(DEFAULT_RESOLUTIONS)}")
    resolutions = resolutions or DEFAULT_RESOLUTIONS[model]
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        raise InputError("--devices cuda was asked for but no CUDA GPU is available")
    ctx = mp.get_context("spawn")
    rows = []
    for device in devices:
        for resolution in resolutions:
            for precision in precisions:
                spec = {
                    "model": model,
                    "resolution": resolution,
                    "device": device,
                    "precision": precision,
                    "batch_size": batch_size,
                    "iterations": iterations,
                    "warmup": warmup,
                    "threads": threads,
                }
                if progress:
                    print(f"benchmarking {model} {resolution}px {device} {precision} ...", file=sys.stderr)
                with ctx.Pool(1) as pool:
                    pending = pool.apply_async(_run_one, (spec,))
                    try:
                        row = pending.get(timeout=timeout_s)
                    except mp.TimeoutError:
                        # Some kernels have no fast path on some devices (half precision
                        # convolutions on CPU run on reference code); record that, move on.
                        pool.terminate()
                        row = dict(spec, status="timeout",
                                   reason=f"more than {timeout_s:g} s for {warmup + iterations} forward passes")
                row["paper_ms_v100"] = PAPER_MS.get(model, {}).get(resolution)
                if resolution in PAPER_REFERENCE.get(model, {}):
                    row["paper_reference"] = PAPER_REFERENCE[model][resolution]
                rows.append(row)
    results = {
        "command": " ".join(["neuralhead", *sys.argv[1:]]) if sys.argv else "",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": _machine(devices),
        "results": rows,
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, results)
    return results


def format_results(results: dict[str, Any]) -> str:
    rows = results["results"]
    width = max([8, *(len(r["model"]) + 2 for r in rows)])
    lines = [f"{'model':<{width}}{'res':>6}{'device':>8}{'prec':>6}{'ms/frame':>10}{'fps':>8}{'peak MB':>9}{'paper ms':>10}"]
    notes: list[str] = []
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['model']:<{width}}{r['resolution']:>6}{r['device']:>8}{r['precision']:>6}  {r['status']}: {r['reason']}")
            continue
        paper = f"{r['paper_ms_v100']:.0f}" if r.get("paper_ms_v100") else "-"
        reference = r.get("paper_reference")
        if reference:
            note = f"{reference['device']}, {reference['precision']} ({reference['source']})"
            if note not in notes:
                notes.append(note)
            paper = f"{reference['ms']:.1f}" + "*" * (notes.index(note) + 1)
        lines.append(
            f"{r['model']:<{width}}{r['resolution']:>6}{r['device']:>8}{r['precision']:>6}{r['ms_median']:>10.1f}"
            f"{r['fps']:>8.1f}{r['peak_memory_mb']:>9.0f}{paper:>10}"
        )
    # Unmarked paper figures are DNP Table 4's (Tesla V100); marked ones name their GPU.
    lines += ["*" * (i + 1) + " paper: " + note for i, note in enumerate(notes)]
    return "\n".join(lines)
