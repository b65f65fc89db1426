"""Distil the gaze and blink network of MegaPortraits App. B.5 from teacher labels.

The paper runs the teachers, RT-GENE (gaze) and RT-BENE (blink), on 60k frames and trains
:class:`~neuralhead.pretrained.gaze.GazeBlinkNet` to reproduce their outputs: 60 epochs,
batch size 64, Adam (lr 0.8e-3, betas (0.9, 0.999), eps 1e-8, no weight decay) with a
one-cycle learning-rate schedule (warm-up over the first 10% of the steps), and the loss
``15 * MAE + 10 * MSE`` against the teachers' predictions. Those are the defaults here. The
teachers themselves are not part of neuralhead (their licence is non-commercial and their
face detector downloads models); run them yourself and write their outputs as below.

Folder format (``EYE_DIR``)::

    EYE_DIR/
      labels.jsonl     one JSON object per line, one line per face:
                       {"left": "eyes/000001_l.png", "right": "eyes/000001_r.png",
                        "keypoints": [[x, y], ...], "gaze": [g0, g1], "blink": 0.03}
      eyes/...         the eye images the lines name (any image format Pillow reads)

* ``left`` / ``right``: the subject's left and right eye patches, paths relative to
  ``EYE_DIR``, RGB of any size (resized to 36x60 when read). Cut them with
  :func:`neuralhead.pretrained.gaze.crop_eyes` so that training and the loss see the same
  crops.
* ``keypoints``: the face's 2D landmarks, the same number on every line (the tracker's 478
  by default), as ``(x, y)`` in ``[-1, 1]`` of the face image
  (:func:`neuralhead.pretrained.gaze.normalize_keypoints`).
* ``gaze``: the gaze teacher's two angles (RT-GENE: radians); ``blink``: the blink
  teacher's probability.

Training writes ``OUT`` (safetensors with the configuration in its metadata, written
atomically) at the end; after each epoch it writes ``<OUT stem>.resume.safetensors`` beside
it, from which an interrupted run with the same options continues at the next epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from neuralhead import weights
from neuralhead.errors import InputError, NeuralheadError
from neuralhead.fileio import save_safetensors_atomic
from neuralhead.nn.pretrained import config_to_dict
from neuralhead.pretrained.gaze import GazeBlinkConfig, GazeBlinkNet
from neuralhead.training.checkpoint import flatten_optimizer, unflatten_optimizer

LABELS_FILE = "labels.jsonl"

#: Loss weights of App. B.5.
W_MAE = 15.0
W_MSE = 10.0

# PyTorch's OneCycleLR defaults (the paper names the schedule, not these): the rate starts at
# lr / 25 and ends at lr / 25 / 1e4.
_DIV_FACTOR = 25.0
_FINAL_DIV_FACTOR = 1e4


@dataclass(frozen=True)
class EyeSample:
    """One labelled face: its two eye images, keypoints and the teachers' outputs."""

    left: Path
    right: Path
    keypoints: tuple[tuple[float, float], ...]
    gaze: tuple[float, float]
    blink: float


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_labels(eye_dir: str | os.PathLike[str]) -> list[EyeSample]:
    """Parse and check ``EYE_DIR/labels.jsonl`` (see the module docstring for the format)."""
    eye_dir = Path(eye_dir)
    labels = eye_dir / LABELS_FILE
    if not labels.is_file():
        raise InputError(f"{eye_dir} has no {LABELS_FILE} (see neuralhead.pretrained.gaze_distill)")
    samples: list[EyeSample] = []
    for number, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{labels}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object")
        missing = [k for k in ("left", "right", "keypoints", "gaze", "blink") if k not in record]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)}")
        keypoints = record["keypoints"]
        if (
            not isinstance(keypoints, list)
            or not keypoints
            or not all(
                isinstance(p, list) and len(p) == 2 and all(map(_number, p)) for p in keypoints
            )
        ):
            raise InputError(f"{where}: keypoints must be a non-empty list of [x, y] numbers")
        gaze = record["gaze"]
        if not isinstance(gaze, list) or len(gaze) != 2 or not all(map(_number, gaze)):
            raise InputError(f"{where}: gaze must be two numbers, got {gaze!r}")
        if not _number(record["blink"]):
            raise InputError(f"{where}: blink must be a number, got {record['blink']!r}")
        paths = []
        for key in ("left", "right"):
            path = eye_dir / str(record[key])
            if not path.is_file():
                raise InputError(f"{where}: {key} eye image {path} not found")
            paths.append(path)
        if samples and len(keypoints) != len(samples[0].keypoints):
            raise InputError(
                f"{where}: {len(keypoints)} keypoints, but the first line has "
                f"{len(samples[0].keypoints)}"
            )
        samples.append(
            EyeSample(
                left=paths[0],
                right=paths[1],
                keypoints=tuple((float(x), float(y)) for x, y in keypoints),
                gaze=(float(gaze[0]), float(gaze[1])),
                blink=float(record["blink"]),
            )
        )
    if not samples:
        raise InputError(f"{labels} holds no samples")
    return samples


class EyeDataset(Dataset):
    """Labelled eye pairs; eye images are read when asked for and resized to ``eye_size``."""

    def __init__(self, samples: Sequence[EyeSample], eye_size: tuple[int, int]) -> None:
        self.samples = list(samples)
        self.eye_size = eye_size

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(f"cannot read eye image {path}: {exc}") from None
        tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None]
        if tuple(tensor.shape[-2:]) != self.eye_size:
            tensor = F.interpolate(
                tensor, size=self.eye_size, mode="bilinear", align_corners=False, antialias=True
            )
        return tensor[0].clamp(0.0, 1.0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        sample = self.samples[index]
        target = torch.tensor([*sample.gaze, sample.blink], dtype=torch.float32)
        keypoints = torch.tensor(sample.keypoints, dtype=torch.float32)
        return self._image(sample.left), self._image(sample.right), keypoints, target


def one_cycle_lr(step: int, total_steps: int, max_lr: float, *, pct_start: float = 0.1) -> float:
    """Learning rate at ``step`` of a one-cycle schedule (Smith & Topin 2019): cosine warm-up
    from ``max_lr / 25`` to ``max_lr`` over ``pct_start`` of the steps, then cosine decay to
    ``max_lr / 25 / 1e4`` (PyTorch's OneCycleLR with its defaults, also for runs of a few
    steps, where OneCycleLR itself fails)."""
    start, end = max_lr / _DIV_FACTOR, max_lr / _DIV_FACTOR / _FINAL_DIV_FACTOR
    warm = max(1, round(pct_start * total_steps))
    if step < warm:
        low, high, t = start, max_lr, step / warm
    else:
        low, high, t = max_lr, end, (step - warm) / max(1, total_steps - 1 - warm)
    return high + (low - high) * (1 + math.cos(math.pi * min(t, 1.0))) / 2


def distillation_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``15 * MAE + 10 * MSE`` (App. B.5) over the gaze angles and blink, ``(B, 3)`` each."""
    return W_MAE * F.l1_loss(prediction, target) + W_MSE * F.mse_loss(prediction, target)


@dataclass
class DistillResult:
    """Where the network was written and the mean training loss of every epoch run so far
    (including epochs restored from the resume file)."""

    path: Path
    epoch_losses: list[float] = field(default_factory=list)


def resume_path(out_path: str | os.PathLike[str]) -> Path:
    """The per-epoch resume file written beside ``out_path``."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.resume.safetensors")


def _save_resume(
    path: Path,
    model: GazeBlinkNet,
    optimizer: torch.optim.Optimizer,
    run: dict,
    epoch_losses: list[float],
) -> None:
    tensors, rest = flatten_optimizer("optimizer", optimizer.state_dict())
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    metadata = {
        "run": json.dumps(run),
        "optimizer": json.dumps(rest),
        "epoch_losses": json.dumps(epoch_losses),
    }
    save_safetensors_atomic(tensors, path, metadata)


def _load_resume(
    path: Path, model: GazeBlinkNet, optimizer: torch.optim.Optimizer, run: dict
) -> list[float]:
    """Restore model and optimizer from ``path``; return the finished epochs' losses."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    try:
        saved_run = json.loads(metadata["run"])
        rest = json.loads(metadata["optimizer"])
        epoch_losses = [float(v) for v in json.loads(metadata["epoch_losses"])]
    except (KeyError, ValueError) as exc:
        raise InputError(
            f"{path} is not a gaze distillation resume file ({exc}); delete it"
        ) from None
    if saved_run != run:
        changed = sorted(k for k in run if saved_run.get(k) != run[k])
        raise InputError(
            f"{path} belongs to a run with other options ({', '.join(changed)} differ); "
            "delete it to start afresh or repeat the original options"
        )
    model.load_state_dict(
        {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    )
    device = next(model.parameters()).device
    state = unflatten_optimizer("optimizer", tensors, rest)
    optimizer.load_state_dict(state)
    for entries in optimizer.state.values():
        for key, value in entries.items():
            if torch.is_tensor(value) and key != "step":
                entries[key] = value.to(device)
    return epoch_losses


def distill_gaze_network(
    eye_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 8e-4,
    width: float = 1.0,
    init: Literal["imagenet", "random"] = "imagenet",
    imagenet_weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> DistillResult:
    """Train :class:`~neuralhead.pretrained.gaze.GazeBlinkNet` on the teacher labels in
    ``eye_dir`` (MegaPortraits App. B.5) and write it to ``out_path``.

    ``init="imagenet"`` starts the VGG16 backbone from torchvision's ImageNet weights (the
    registry entry ``vgg16-imagenet``, from ``imagenet_weights`` or the cache directory;
    our choice, the paper does not say); ``"random"`` from scratch. ``width`` scales the
    backbone's channels (tests only; needs ``init="random"`` unless 1). The keypoint count
    is taken from the labels. With ``resume`` a resume file left by an interrupted run with
    the same options is continued; it is deleted once ``out_path`` is written.

    Load the result with ``GazeBlinkNet.from_pretrained(out_path)``, or put it into the
    weights cache directory as ``gaze_blink.safetensors``.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise InputError(
            f"epochs and batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}"
        )
    if init not in ("imagenet", "random"):
        raise InputError(f"init must be 'imagenet' or 'random', got {init!r}")
    if init == "imagenet" and width != 1.0:
        raise InputError("ImageNet weights only fit width 1; use init='random' for other widths")
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise InputError(f"the output must be a .safetensors file, got {out_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    samples = read_labels(eye_dir)
    config = GazeBlinkConfig(num_keypoints=len(samples[0].keypoints), width=width)

    torch.manual_seed(seed)
    model = GazeBlinkNet(config)
    if init == "imagenet":
        model.backbone.load_published(weights.load_state_dict("vgg16-imagenet", imagenet_weights))
    model.to(device).train()
    optimizer = torch.optim.Adam(
        model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    run = {
        "config": config_to_dict(config),
        "samples": len(samples),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "init": init,
        "seed": seed,
    }
    checkpoint = resume_path(out_path)
    epoch_losses: list[float] = []
    if resume and checkpoint.is_file():
        epoch_losses = _load_resume(checkpoint, model, optimizer, run)

    dataset = EyeDataset(samples, config.eye_size)
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    total_steps = epochs * steps_per_epoch
    start_epoch = len(epoch_losses)
    bar = tqdm(
        total=total_steps,
        initial=start_epoch * steps_per_epoch,
        desc="distilling gaze network",
        unit="step",
        disable=not progress,
    )
    with bar:
        for epoch in range(start_epoch, epochs):
            # One generator per epoch: a resumed run shuffles exactly as an uninterrupted one.
            loader = DataLoader(
                dataset,
                batch_size=batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(seed + epoch),
                num_workers=num_workers,
            )
            total, count = 0.0, 0
            for index, (left, right, keypoints, target) in enumerate(loader):
                step = epoch * steps_per_epoch + index
                for group in optimizer.param_groups:
                    group["lr"] = one_cycle_lr(step, total_steps, lr)
                out = model(left.to(device), right.to(device), keypoints.to(device))
                loss = distillation_loss(torch.cat([out.gaze, out.blink], dim=1), target.to(device))
                if not torch.isfinite(loss):
                    raise NeuralheadError(
                        f"gaze distillation diverged at step {step} (loss {loss.item()}); "
                        "try a lower learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * left.shape[0]
                count += left.shape[0]
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            epoch_losses.append(total / count)
            if epoch + 1 < epochs:
                _save_resume(checkpoint, model, optimizer, run, epoch_losses)

    model.cpu().save(out_path)
    checkpoint.unlink(missing_ok=True)
    return DistillResult(path=out_path, epoch_losses=epoch_losses)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of :func:`distill_gaze_network` (shared with the main CLI)."""
    parser.add_argument("eye_dir", type=Path, help=f"folder with {LABELS_FILE} and eye images")
    parser.add_argument("out", type=Path, help="output .safetensors file")
    parser.add_argument("--epochs", type=int, default=60, help="default 60 (App. B.5)")
    parser.add_argument("--batch-size", type=int, default=64, help="default 64 (App. B.5)")
    parser.add_argument("--lr", type=float, default=8e-4, help="peak learning rate, default 8e-4")
    parser.add_argument(
        "--init",
        choices=["imagenet", "random"],
        default="imagenet",
        help="start the VGG16 backbone from ImageNet weights (default) or from scratch",
    )
    parser.add_argument(
        "--imagenet-weights",
        type=Path,
        default=None,
        help="torchvision's vgg16-397923af.pth (default: the weights cache directory)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    parser.add_argument("--workers", type=int, default=0, help="data loading processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true", help="ignore a left-over resume file")


def run(args: argparse.Namespace) -> int:
    """Run a distillation from parsed :func:`add_arguments` options; print the result."""
    result = distill_gaze_network(
        args.eye_dir,
        args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        init=args.init,
        imagenet_weights=args.imagenet_weights,
        device=args.device,
        num_workers=args.workers,
        seed=args.seed,
        resume=not args.no_resume,
    )
    print(f"wrote {result.path} (last epoch loss {result.epoch_losses[-1]:.4f})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m neuralhead.pretrained.gaze_distill EYE_DIR OUT [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m neuralhead.pretrained.gaze_distill",
        description="Distil the MegaPortraits gaze + blink network (App. B.5) from teacher labels.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except NeuralheadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (run the same command again to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
