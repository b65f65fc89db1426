"""``neuralhead benchmark``: generator time per frame and peak memory.

Each configuration (model preset x device x precision) runs in a fresh process, so peak
memory belongs to that configuration alone: on GPU ``torch.cuda.max_memory_allocated``, on
CPU the growth of the process's peak resident set size during inference. Timing covers the
generator's forward pass only (as in DNP Table 4: "forward pass time ... without data
pre-processing"), batch 1 by default, after warm-up; the median of the timed iterations is
reported with the mean and the 90th percentile.

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
from neuralhead.fileio import write_json_atomic

# DNP Table 4, forward time on a Tesla V100 (ms per frame).
PAPER_MS = {"dnp": {256: 11.0, 512: 31.0, 1024: 42.0}}


def _model_and_inputs(model: str, resolution: int, batch: int, device: torch.device):
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
                out = net(**inputs).image
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
            times.append((time.perf_counter() - start) * 1000.0 / spec["batch_size"])
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
    except (RuntimeError, NotImplementedError, TypeError) as exc:
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
    resolutions: list[int] | tuple[int, ...] = (256, 512, 1024),
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

    A configuration that takes longer than ``timeout_s`` is stopped and recorded as such.
    """
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        from neuralhead.errors import InputError

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
    lines = [f"{'model':<6}{'res':>6}{'device':>8}{'prec':>6}{'ms/frame':>10}{'fps':>8}{'peak MB':>9}{'paper ms':>10}"]
    for r in results["results"]:
        if r["status"] != "ok":
            lines.append(f"{r['model']:<6}{r['resolution']:>6}{r['device']:>8}{r['precision']:>6}  {r['status']}: {r['reason']}")
            continue
        paper = r.get("paper_ms_v100")
        lines.append(
            f"{r['model']:<6}{r['resolution']:>6}{r['device']:>8}{r['precision']:>6}{r['ms_median']:>10.1f}"
            f"{r['fps']:>8.1f}{r['peak_memory_mb']:>9.0f}{(f'{paper:.0f}' if paper else '-'):>10}"
        )
    return "\n".join(lines)
