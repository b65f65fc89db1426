"""Pre-training of the MegaPortraits head-pose network (Sec. 3.1: "We use a pre-trained network
to estimate head rotation data"; A.1: "The head pose prediction network is pre-trained").

The authors' code trains a ResNet-18 on 128x128 crops against the similarity transform that
aligns a canonical landmark template to the detected 3D landmarks (implementation notes).
Our prepared datasets store that transform per frame (``pose.npy``: pitch, yaw, roll, tx, ty,
tz = log scale; docs/dataset.md "Head pose"), so :func:`train_pose_network` regresses it
directly from the frames of any number of prepared datasets:

* loss: L1 on the six numbers in their natural units (radians, normalised image
  coordinates, log scale), equally weighted (our choice);
* augmentation (our choice, on by default): horizontal flips and small zooms and shifts,
  each with the label change it implies exactly (a mirror negates yaw, roll and tx; a zoom by
  ``k`` and shift by ``d`` map ``(tx, ty) -> k (tx, ty) + d`` and ``tz -> tz + log k``);
* AdamW with a cosine decay of the learning rate to zero (our choice);
* the held-out split of every dataset (meta.json) is never trained on; the mean absolute
  angle error on it, in degrees, is reported and stored in the output file's metadata.

The result is one safetensors file (written atomically) that
:meth:`~neuralhead.megaportraits.motion_encoder.HeadPoseNetwork.load` reads.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from neuralhead.data.dataset import PortraitDataset
from neuralhead.errors import InputError
from neuralhead.megaportraits.config import MegaPortraitsConfig, preset
from neuralhead.megaportraits.motion_encoder import HeadPoseNetwork

ANGLE_NAMES = ("pitch", "yaw", "roll")


@dataclass
class PoseTrainingResult:
    """What :func:`train_pose_network` did: the file it wrote, the loss of every step and the
    held-out errors (``None`` when no dataset has held-out frames)."""

    path: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    heldout_frames: int = 0
    heldout_error_deg: float | None = None
    heldout_angle_errors_deg: dict[str, float] = field(default_factory=dict)
    heldout_translation_error: float | None = None
    heldout_log_scale_error: float | None = None
    seconds: float = 0.0


def augment_pose_batch(
    images: torch.Tensor,
    pose: torch.Tensor,
    generator: torch.Generator,
    *,
    flip: bool = True,
    max_zoom: float = 0.1,
    max_shift: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly flip, zoom and shift ``images`` ``(B, 3, H, W)`` and update ``pose`` ``(B, 6)``.

    Every image is mirrored with probability 1/2 when ``flip``, then its content is scaled by
    ``k = exp(u)``, ``u`` uniform in ``[-log(1 + max_zoom), log(1 + max_zoom)]``, about the
    image centre and moved by ``d`` uniform in ``[-max_shift, max_shift]`` (normalised units)
    per axis. Sampling outside the image repeats its border, like the dataset's crops. The
    labels change exactly as the image does; the tracker's template is left-right symmetric,
    so a mirrored face has the mirrored pose. ``images`` and ``pose`` share a device.
    """
    batch, device = images.shape[0], images.device
    mirror = (torch.rand(batch, generator=generator) < 0.5) & flip
    log_zoom = (torch.rand(batch, generator=generator) * 2 - 1) * math.log1p(max_zoom)
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * max_shift
    mirror, log_zoom, shift = mirror.to(device), log_zoom.to(device), shift.to(device)
    zoom = log_zoom.exp()
    mirrored = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0], device=device)
    pose = torch.where(mirror[:, None], pose * mirrored, pose)
    images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
    # affine_grid maps output coordinates u to input coordinates (u - d) / k.
    theta = torch.zeros(batch, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = -shift / zoom[:, None]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    pose = torch.cat(
        [pose[:, :3], pose[:, 3:5] * zoom[:, None] + shift, pose[:, 5:] + log_zoom[:, None]], dim=1
    )
    return images, pose


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _datasets(
    dataset_dirs: Sequence[str | Path], split: str, image_size: int, cache: bool, progress: bool
) -> list[PortraitDataset]:
    found = []
    for root in dataset_dirs:
        try:
            found.append(
                PortraitDataset(root, split, image_size=image_size, cache=cache, progress=progress)
            )
        except InputError:
            if split == "train":
                raise
            # A dataset prepared with --heldout 0 (or without faces there) has nothing to test.
    return found


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """The dataset's images in [-1, 1] as the network's input range, [0, 1]."""
    return (images + 1) / 2


class _PoseFrames(torch.utils.data.Dataset):
    """(uint8 frame, pose) pairs of one dataset split: all a training step needs, the same
    for every dataset (with or without audio), and cheap to pass between loader processes."""

    def __init__(self, dataset: PortraitDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        frame = int(self.dataset.frames[pos])
        return self.dataset.image_uint8(frame), self.dataset.pose[frame]


@torch.no_grad()
def evaluate_pose_network(
    network: HeadPoseNetwork,
    datasets: Sequence[PortraitDataset],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean absolute errors of ``network`` on every frame of ``datasets``.

    Returns ``frames``, ``angle_error_deg`` (mean over pitch, yaw and roll), ``<angle>_error_deg``
    per angle, ``translation_error`` (tx, ty, normalised units) and ``log_scale_error``.
    """
    was_training = network.training
    network.eval()
    errors, count = torch.zeros(6, dtype=torch.float64), 0
    for dataset in datasets:
        for start in range(0, len(dataset), batch_size):
            batch = dataset.batch(list(range(start, min(start + batch_size, len(dataset)))))
            predicted = network.predict(_to_unit(batch["image"]).to(device)).cpu()
            errors += (predicted - batch["pose"]).abs().sum(0).double()
            count += len(predicted)
    network.train(was_training)
    if count == 0:
        raise InputError("no frames to evaluate the head-pose network on")
    mean = errors / count
    degrees = torch.rad2deg(mean[:3])
    result = {"frames": float(count), "angle_error_deg": float(degrees.mean())}
    result.update({f"{name}_error_deg": float(d) for name, d in zip(ANGLE_NAMES, degrees)})
    result["translation_error"] = float(mean[3:5].mean())
    result["log_scale_error"] = float(mean[5])
    return result


def train_pose_network(
    dataset_dirs: Sequence[str | Path] | str | Path,
    out_path: str | Path,
    *,
    config: MegaPortraitsConfig | str = "megaportraits-512",
    steps: int = 20_000,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    image_size: int | None = None,
    augment: bool = True,
    imagenet: bool | str | Path = False,
    download: bool = False,
    cache: bool = False,
    num_workers: int = 0,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> PoseTrainingResult:
    """Train :class:`HeadPoseNetwork` on the poses of prepared datasets; write ``out_path``.

    ``config`` (a config or a preset name) sets the architecture (``pose_layers``,
    ``pose_width``); ``image_size`` overrides ``config.pose_image_size`` (128 in the paper's
    presets), the side the network sees and the frames are loaded at. ``imagenet`` starts the
    trunk from torchvision's ImageNet ResNet-18 (``True``: from the weights cache, or
    downloaded with ``download``; a path: that file; only for the published ResNet-18 sizes).
    ``cache`` decodes each dataset's training frames into memory once; ``num_workers`` are
    data-loading processes. Training draws ``steps`` batches of ``batch_size`` frames with
    replacement from all training splits together. The output is a safetensors file holding
    the weights, the training data's mean pose and, in its metadata, the architecture, the
    number of steps and the held-out errors.
    """
    started = time.monotonic()
    roots = [dataset_dirs] if isinstance(dataset_dirs, str | Path) else list(dataset_dirs)
    if not roots:
        raise InputError("give at least one prepared dataset to train the head-pose network on")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise InputError(
            f"steps and batch_size must be positive and lr > 0, got {steps}, {batch_size}, {lr}"
        )
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise InputError(f"the head-pose weights are written as .safetensors, got {out_path}")
    if not out_path.parent.is_dir():
        raise InputError(f"directory {out_path.parent} does not exist")
    cfg = preset(config) if isinstance(config, str) else config
    if image_size is not None:
        cfg = replace(cfg, pose_image_size=image_size)
    size = cfg.pose_image_size
    torch.manual_seed(seed)
    run_device = _device(device)

    train_sets = _datasets(roots, "train", size, cache, progress)
    heldout_sets = _datasets(roots, "heldout", size, False, progress)
    network = HeadPoseNetwork(cfg)
    if imagenet:
        network.load_imagenet(None if imagenet is True else imagenet, download=download)
    poses = torch.cat([d.pose[torch.as_tensor(d.frames)] for d in train_sets])
    network.pose_mean.copy_(poses.mean(0))
    network.to(run_device).train()

    data = torch.utils.data.ConcatDataset([_PoseFrames(d) for d in train_sets])
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(
        data, replacement=True, num_samples=steps * batch_size, generator=generator
    )
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=run_device.type == "cuda",
        drop_last=True,
    )
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    augment_generator = torch.Generator().manual_seed(seed + 1)
    result = PoseTrainingResult(path=out_path, steps=steps)
    bar = tqdm(loader, total=steps, desc="head pose", disable=not progress)
    for frames, target in bar:
        images = frames.to(run_device, non_blocking=True).float() / 255
        target = target.to(run_device, non_blocking=True)
        if augment:
            images, target = augment_pose_batch(images, target, augment_generator)
        loss = (network.predict(images) - target).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        result.losses.append(loss.item())
        if len(result.losses) % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(result.losses[-10:]):.4f}")
    bar.close()

    metadata: dict[str, object] = {"steps": steps, "datasets": [str(r) for r in roots]}
    if heldout_sets:
        scores = evaluate_pose_network(
            network, heldout_sets, batch_size=batch_size, device=run_device
        )
        result.heldout_frames = int(scores["frames"])
        result.heldout_error_deg = scores["angle_error_deg"]
        result.heldout_angle_errors_deg = {n: scores[f"{n}_error_deg"] for n in ANGLE_NAMES}
        result.heldout_translation_error = scores["translation_error"]
        result.heldout_log_scale_error = scores["log_scale_error"]
        metadata["heldout"] = scores
        if progress:
            tqdm.write(
                f"held-out error over {result.heldout_frames} frames: "
                f"{result.heldout_error_deg:.2f} deg (pitch {scores['pitch_error_deg']:.2f}, "
                f"yaw {scores['yaw_error_deg']:.2f}, roll {scores['roll_error_deg']:.2f}), "
                f"translation {result.heldout_translation_error:.4f}, "
                f"log scale {result.heldout_log_scale_error:.4f}"
            )
    network.cpu().eval()
    network.save(out_path, **metadata)
    result.seconds = time.monotonic() - started
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``neuralhead train megaportraits-pose`` (see :func:`train_pose_network`)."""
    parser.add_argument("datasets", nargs="+", type=Path, help="prepared dataset directories")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument(
        "--preset",
        default="megaportraits-512",
        help="MegaPortraits preset whose head-pose network to train",
    )
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input side of the network (default: the preset's, 128)",
    )
    parser.add_argument("--no-augment", action="store_true", help="no flips, zooms or shifts")
    parser.add_argument(
        "--imagenet",
        nargs="?",
        const=True,
        default=False,
        metavar="FILE",
        help="start from torchvision's ImageNet ResNet-18 (from the weights cache, or FILE)",
    )
    parser.add_argument(
        "--download", action="store_true", help="download the ImageNet weights if they are missing"
    )
    parser.add_argument("--cache", action="store_true", help="decode the frames into memory once")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Train from parsed :func:`add_arguments` options; print where the weights went."""
    result = train_pose_network(
        args.datasets,
        args.out,
        config=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        image_size=args.image_size,
        augment=not args.no_augment,
        imagenet=args.imagenet,
        download=args.download,
        cache=args.cache,
        num_workers=args.num_workers,
        device=args.device,
        seed=args.seed,
    )
    summary = (
        "no held-out frames"
        if result.heldout_error_deg is None
        else f"held-out error {result.heldout_error_deg:.2f} deg"
    )
    print(f"wrote {result.path} ({result.steps} steps, {summary}, {result.seconds:.0f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``main(["DATASET", "--out", "pose.safetensors"])``."""
    parser = argparse.ArgumentParser(
        prog="neuralhead train megaportraits-pose",
        description="Pre-train the MegaPortraits head-pose network on prepared datasets.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
