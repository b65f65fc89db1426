"""A trained portrait: the DNP model plus what inference needs to know about its person.

Besides the weights, driving a portrait needs the person's tracking context: the expression
basis its coefficients live in (to map another person's expression changes onto it), the
parameters of its training frames (for the nearest-neighbour baseline, to replay poses under
audio driving, and to keep driving values inside the range the model has seen) and a
reference frame (a neutral, frontal-ish training frame that relative motion starts from).

Saved as a directory: ``config.json`` + ``model.safetensors`` (see
:mod:`neuralhead.nn.pretrained`), ``portrait.npz`` and ``expression_basis.npz``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from neuralhead.data.format import DatasetFiles
from neuralhead.dnp.config import DNPConfig
from neuralhead.dnp.model import DynamicNeuralPortrait
from neuralhead.errors import InputError
from neuralhead.fileio import write_json_atomic
from neuralhead.nn.pretrained import config_from_dict
from neuralhead.tracking.expression import ExpressionBasis
from neuralhead.training.checkpoint import latest_checkpoint

PORTRAIT_FILE = "portrait.npz"
BASIS_FILE = "expression_basis.npz"
INFO_FILE = "portrait.json"


@dataclass
class PortraitData:
    """The person's tracking context (everything but the network)."""

    frames: np.ndarray  # (M,) training frame numbers, aligned with the arrays below
    pose: np.ndarray  # (M, 6)
    gaze: np.ndarray  # (M, 2)
    expression: np.ndarray  # (M, K)
    canonical: np.ndarray  # (M, 478, 3) template-space landmarks of the training frames
    reference: int  # row of the reference (neutral) frame
    basis: ExpressionBasis
    info: dict[str, Any]  # fps, size, dataset path, audio settings

    @classmethod
    def from_dataset(cls, files: DatasetFiles) -> PortraitData:
        valid = files.array("valid", mmap=False)
        frames = np.array([f for f in files.split_range("train") if valid[f]], dtype=np.int64)
        pose = np.asarray(files.array("pose")[frames])
        expression = np.asarray(files.array("expression")[frames])
        # Reference: the training frame closest to the average pose with the most neutral face.
        pose_z = (pose - pose.mean(0)) / (pose.std(0) + 1e-6)
        expr_z = (expression - expression.mean(0)) / (expression.std(0) + 1e-6)
        reference = int(np.argmin((pose_z[:, :3] ** 2).sum(1) + (expr_z**2).mean(1)))
        info = {
            "dataset": str(files.root.resolve()),
            "fps": files.fps,
            "size": files.size,
            "audio": files.meta.get("audio"),
            "source": files.meta.get("source"),
        }
        return cls(
            frames=frames,
            pose=pose,
            gaze=np.asarray(files.array("gaze")[frames]),
            expression=expression,
            canonical=np.asarray(files.array("canonical")[frames]),
            reference=reference,
            basis=files.expression_basis(),
            info=info,
        )

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(
            directory / PORTRAIT_FILE,
            frames=self.frames,
            pose=self.pose,
            gaze=self.gaze,
            expression=self.expression,
            canonical=self.canonical,
            reference=np.int64(self.reference),
        )
        self.basis.save(directory / BASIS_FILE)
        write_json_atomic(directory / INFO_FILE, self.info)

    @classmethod
    def load(cls, directory: Path) -> PortraitData:
        path = directory / PORTRAIT_FILE
        if not path.is_file():
            raise InputError(f"{directory} has no {PORTRAIT_FILE}: not a DNP portrait")
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        return cls(
            frames=arrays["frames"],
            pose=arrays["pose"],
            gaze=arrays["gaze"],
            expression=arrays["expression"],
            canonical=arrays["canonical"],
            reference=int(arrays["reference"]),
            basis=ExpressionBasis.load(directory / BASIS_FILE),
            info=json.loads((directory / INFO_FILE).read_text()),
        )


@dataclass
class Portrait:
    model: DynamicNeuralPortrait
    data: PortraitData
    source: Path  # where it was loaded from
    step: int | None = None  # training step of the weights, when known

    @property
    def config(self) -> DNPConfig:
        return self.model.config

    def save(self, directory: str | Path) -> Path:
        """A self-contained copy: model + person data, loadable with :meth:`load`."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.data.save(directory)
        return directory

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Portrait:
        """Load from a training run directory (its latest checkpoint) or a saved portrait."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"checkpoint {path} does not exist")
        if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
            return cls._from_run(path, device)
        if (path / "model.safetensors").is_file():
            model = DynamicNeuralPortrait.from_pretrained(path, map_location=str(device))
            return cls(model.eval(), PortraitData.load(path), path)
        raise InputError(
            f"{path} is neither a training run directory nor a saved portrait "
            "(expected config.json + checkpoints/, or model.safetensors)"
        )

    @classmethod
    def _from_run(cls, run_dir: Path, device: str | torch.device) -> Portrait:
        run = json.loads((run_dir / "config.json").read_text())
        if run.get("model") != "dnp":
            raise InputError(f"{run_dir} is a {run.get('model')!r} run, not a DNP run")
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            raise InputError(f"{run_dir} has no checkpoint yet: train for longer or wait for one")
        model = DynamicNeuralPortrait(config_from_dict(DNPConfig, run["model_config"]))
        weights = load_file(checkpoint / "modules.safetensors", device=str(device))
        model.load_state_dict({k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")})
        step = json.loads((checkpoint / "state.json").read_text())["step"]
        return cls(model.to(device).eval(), PortraitData.load(run_dir / "portrait"), run_dir, step)


def copy_portrait_data(source: Path, destination: Path) -> None:
    """Copy the person files of a saved portrait (used when exporting)."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in (PORTRAIT_FILE, BASIS_FILE, INFO_FILE):
        shutil.copy2(source / name, destination / name)
