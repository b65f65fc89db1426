"""Checkpoints in safetensors, written atomically, restoring training exactly.

A checkpoint is a directory ``checkpoints/step_XXXXXXXX/`` holding

* ``modules.safetensors``: the weights of every module, keys ``<module>.<parameter>``;
* ``optimizers.safetensors``: the tensors of every optimizer's state;
* ``state.json``: step, the optimizers' hyper-parameters and scalar state, the schedulers'
  states and anything else the task records;
* ``rng_rank<r>.safetensors`` + ``rng_rank<r>.json``: each process's random generators
  (torch CPU and CUDA, NumPy, Python).

It is assembled in a temporary directory and renamed into place, then the one-line file
``checkpoints/latest`` is replaced atomically to point at it. A process killed at any moment
therefore leaves either the previous checkpoint or the new one as ``latest``, never a torn
one. No pickle is involved at any point.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from neuralhead.fileio import save_safetensors_atomic, write_json_atomic, write_text_atomic

LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------- optimizer state <-> tensors
def flatten_optimizer(name: str, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(name: str, tensors: dict[str, torch.Tensor], rest: dict) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[field] = value
    for pid, entries in rest["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}


# ---------------------------------------------------------------- random generators
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    rest = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, rest


def set_rng_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, gauss = rest["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    py_version, py_state, py_gauss = rest["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


# ---------------------------------------------------------------- directories
def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``latest`` points at, or None if there is none yet."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def write_checkpoint_files(
    directory: Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    extra: dict[str, Any],
    step: int,
) -> None:
    """Write the rank-independent files of a checkpoint into ``directory``."""
    weights = {
        f"{name}.{key}": value
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }
    save_safetensors_atomic(weights, directory / "modules.safetensors")
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_rest = {}
    for name, opt in optimizers.items():
        tensors, rest = flatten_optimizer(name, opt.state_dict())
        opt_tensors.update(tensors)
        opt_rest[name] = rest
    save_safetensors_atomic(opt_tensors, directory / "optimizers.safetensors")
    write_json_atomic(
        directory / "state.json",
        {
            "step": step,
            "optimizers": opt_rest,
            "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
            "extra": extra,
        },
    )


def write_rng_files(directory: Path, rank: int) -> None:
    tensors, rest = rng_state()
    save_safetensors_atomic(tensors, directory / f"rng_rank{rank}.safetensors")
    write_json_atomic(directory / f"rng_rank{rank}.json", rest)


def publish_checkpoint(root: Path, tmp_dir: Path, step: int, keep: int) -> Path:
    """Move a finished temporary checkpoint into place, point ``latest`` at it, prune old ones."""
    final = root / checkpoint_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    _fsync_dir(root)
    write_text_atomic(root / LATEST, final.name + "\n")
    if keep > 0:
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(
    directory: Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    rank: int,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore everything saved by a checkpoint; returns its state.json content."""
    weights = load_file(directory / "modules.safetensors", device=str(map_location))
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    state = json.loads((directory / "state.json").read_text())
    opt_tensors = load_file(directory / "optimizers.safetensors", device=str(map_location))
    for name, opt in optimizers.items():
        opt.load_state_dict(unflatten_optimizer(name, opt_tensors, state["optimizers"][name]))
    for name, sched in schedulers.items():
        sched.load_state_dict(state["schedulers"][name])
    rng_file = directory / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(rng_file), json.loads((directory / f"rng_rank{rank}.json").read_text()))
    return state
