"""ONNX export of a distilled student G_DT (Sec. 3.3) and inference with onnxruntime.

The exported graph has two inputs, ``driver`` ``(B, 3, S, S)`` float32 in [0, 1] and
``avatar_index`` ``(B,)`` int64, and one output, ``image`` ``(B, 3, S, S)`` in [0, 1]; the
batch axis is dynamic. The avatar tensors are constants of the graph, so the file renders
exactly the avatars it was exported with and nothing else (the identity lock of Sec. 1 and
3.3 carries over). Its metadata records the avatar count and the image size;
:class:`OnnxStudent` checks both before running, as ``Student.forward`` does.

Export uses PyTorch's TorchScript-based exporter (``dynamo=False``), which needs only the
``onnx`` package; running the result needs ``onnxruntime``. Neither is a dependency of the
package: install them (``pip install onnx onnxruntime``) to export.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from neuralhead.errors import InputError
from neuralhead.megaportraits.student import Student
from neuralhead.nn.pretrained import CONFIG_FILE

INPUT_NAMES = ("driver", "avatar_index")
OUTPUT_NAME = "image"
#: Keys of the ONNX file's metadata.
META_MODEL, META_AVATARS, META_SIZE = "model", "num_avatars", "image_size"
MODEL_NAME = "megaportraits-student"
#: Subdirectory of a distillation run holding the trained student.
STUDENT_DIR = "student"
DEFAULT_OPSET = 17


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise InputError(
            f"{module} is not installed; ONNX export and inference need it: pip install "
            "onnx onnxruntime"
        ) from None


def export_onnx(student: Student, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``student`` (in eval mode) as an ONNX file at ``path``; returns the path.

    The file is written beside its destination and renamed into place, so an interrupted
    export leaves no partial file.
    """
    onnx = _require("onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = student.config.image_size
    was_training = student.training
    student.eval()
    driver = torch.rand(2, 3, size, size)
    index = torch.arange(2) % student.num_avatars
    tmp = path.with_name(path.name + ".tmp")
    batch = {0: "batch"}
    try:
        with warnings.catch_warnings():
            # Expected, not problems: the tracer's notes on the modules' input checks (shapes
            # are fixed but the batch), instance norm's use of the input's statistics (which is
            # what it does in eval mode too), and the notice that this exporter is the legacy one.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*instance_norm.*train=True")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx")
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            torch.onnx.export(
                student,
                (driver, index),
                str(tmp),
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAMES[0]: batch, INPUT_NAMES[1]: batch, OUTPUT_NAME: batch},
                opset_version=opset,
                dynamo=False,
            )
        model = onnx.load(str(tmp))
        meta = {META_MODEL: MODEL_NAME, META_AVATARS: student.num_avatars, META_SIZE: size}
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        student.train(was_training)
    return path


class OnnxStudent:
    """An exported student run by onnxruntime: ``__call__(driver, avatar_index)`` → images.

    ``driver`` is ``(B, 3, S, S)`` float in [0, 1] (numpy or torch), ``avatar_index`` an int or
    ``(B,)`` integers; returns ``(B, 3, S, S)`` float32 numpy. ``providers`` go to
    ``onnxruntime.InferenceSession`` (default: CPU).
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        ort = _require("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no ONNX file at {path}")
        self.session = ort.InferenceSession(
            str(path), providers=providers or ["CPUExecutionProvider"]
        )
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get(META_MODEL) != MODEL_NAME:
            raise InputError(f"{path} is not an exported MegaPortraits student")
        self.num_avatars = int(meta[META_AVATARS])
        self.image_size = int(meta[META_SIZE])

    def __call__(
        self, driver: np.ndarray | torch.Tensor, avatar_index: int | np.ndarray | torch.Tensor
    ) -> np.ndarray:
        if isinstance(driver, torch.Tensor):
            driver = driver.detach().cpu().numpy()
        driver = np.ascontiguousarray(driver, dtype=np.float32)
        size = self.image_size
        if driver.ndim != 4 or driver.shape[1:] != (3, size, size):
            raise InputError(
                f"the student expects drivers of shape (B, 3, {size}, {size}), got {driver.shape}"
            )
        if isinstance(avatar_index, torch.Tensor):
            avatar_index = avatar_index.detach().cpu().numpy()
        index = np.asarray(avatar_index)
        if not np.issubdtype(index.dtype, np.integer):
            raise InputError(f"avatar_index must be an integer, got dtype {index.dtype}")
        index = np.broadcast_to(index, (driver.shape[0],)) if index.ndim == 0 else index
        if index.shape != (driver.shape[0],):
            raise InputError(
                f"avatar_index must be a scalar or have shape ({driver.shape[0]},), got "
                f"{index.shape}"
            )
        bad = index[(index < 0) | (index >= self.num_avatars)]
        if bad.size:
            raise InputError(
                f"avatar {int(bad[0])} is not registered: this student renders only avatars "
                f"0 .. {self.num_avatars - 1}"
            )
        feeds = {INPUT_NAMES[0]: driver, INPUT_NAMES[1]: index.astype(np.int64)}
        return self.session.run([OUTPUT_NAME], feeds)[0]


@torch.no_grad()
def max_export_error(student: Student, path: str | Path, *, batch: int = 2, seed: int = 0) -> float:
    """Largest absolute difference between ``student`` and its ONNX file on random drivers."""
    generator = torch.Generator().manual_seed(seed)
    size = student.config.image_size
    driver = torch.rand(batch, 3, size, size, generator=generator)
    index = torch.randint(0, student.num_avatars, (batch,), generator=generator)
    was_training = student.training
    student.eval()
    expected = student(driver, index).numpy()
    student.train(was_training)
    got = OnnxStudent(path)(driver, index)
    return float(np.abs(got - expected).max())


def load_student(checkpoint: str | Path) -> Student:
    """A saved student: its directory, or a distillation run whose ``student/`` holds it."""
    checkpoint = Path(checkpoint)
    if (checkpoint / STUDENT_DIR / CONFIG_FILE).is_file():
        checkpoint = checkpoint / STUDENT_DIR
    config = checkpoint / CONFIG_FILE
    if config.is_file() and json.loads(config.read_text()).get("model_class") != Student.__name__:
        raise InputError(f"{checkpoint} does not hold a MegaPortraits student")
    return Student.from_pretrained(checkpoint)


def export_student(
    checkpoint: str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    tolerance: float | None = 1e-3,
) -> tuple[Path, float | None]:
    """Export the student saved at ``checkpoint`` to ``out``; returns the path and the error.

    With a ``tolerance`` the file is run with onnxruntime on random drivers and compared with
    PyTorch; a larger difference removes the file and raises :class:`InputError`. The error is
    None without a check.
    """
    student = load_student(checkpoint)
    path = export_onnx(student, out, opset=opset)
    if tolerance is None:
        return path, None
    error = max_export_error(student, path)
    if error > tolerance:
        path.unlink()
        raise InputError(
            f"the ONNX graph differs from PyTorch by {error:.3g} (> {tolerance:g}); not exported"
        )
    return path, error
