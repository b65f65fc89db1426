"""Distilling the student G_DT from the teacher G_HR on a fixed set of avatars (Sec. 3.3, B.1).

"We sample the driving frame x_d and the index i. We then match the following two images:
x̂^DT = G_DT(x_d, i); x̂^HR = G_HR(x_i, x_d)" (Sec. 3.3). The teacher is G_HR = G_enh ∘ G_base
(:class:`~neuralhead.megaportraits.enhancer.HighResolutionModel`), or G_base alone without an
enhancer; it is frozen and its outputs are the pseudo ground truth ("the student is trained
only in the cross-driving mode"). Losses (B.1, "Student"): "adversarial and three kinds of
perceptual losses [...] standard VGG19 loss, gaze loss and VGG Face loss", with the teacher's
weights (Sec. 4.1: 20, 5, 4), and a multi-scale discriminator "on four resolutions" with a
hinge loss and feature matching (weights 1 and 40, the base model's, our choice). A perceptual
network whose weights are absent is left out with a warning, never replaced; an L1 term (off by
default) is our addition.

Avatars are source images (square RGB files, resized to the teacher's input size); drivers
are the frames of prepared datasets (docs/dataset.md): their train splits drive training and
their held-out splits evaluation, where the student's PSNR and L1 (0-255) to the teacher are
reported (the paper's student reaches a PSNR of 23.14 to its teacher, Sec. 4). The gaze loss
places its eye patches with the driver's landmarks: the teacher's output follows the driver's
motion, so its eyes lie close to them (our approximation; the paper does not say). The driver is
resized to the student's size and the teacher's output too when the two sizes differ.
AdamW with cosine decay over the config's ``num_iterations`` (the base model's settings; the
paper gives none for the student); a new run sets it to its step limit unless it is given.

The run directory is the training engine's (resumable); when training ends, ``student/``
receives the trained G_DT (``config.json`` + ``model.safetensors``) and ``avatars.json``
lists the avatar images by index. Export it with :mod:`neuralhead.megaportraits.export`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuralhead import __version__
from neuralhead.data.dataset import PortraitDataset
from neuralhead.errors import InputError
from neuralhead.fileio import write_json_atomic
from neuralhead.losses import (
    FacePerceptualLoss,
    PerceptualLoss,
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from neuralhead.megaportraits.enhancer import Enhancer, HighResolutionModel
from neuralhead.megaportraits.enhancer_training import load_base_model, load_optional_network
from neuralhead.megaportraits.export import STUDENT_DIR
from neuralhead.megaportraits.student import Student, StudentConfig, student_preset
from neuralhead.megaportraits.trainer import cosine_schedule
from neuralhead.metrics.image import l1_255, psnr
from neuralhead.nn.discriminators import MultiScalePatchDiscriminator
from neuralhead.nn.pretrained import config_from_dict, config_to_dict
from neuralhead.training.engine import Engine, EngineOptions
from neuralhead.training.sampler import StepSampler
from neuralhead.visualize import grid, label, to_uint8

log = logging.getLogger(__name__)
train_log = logging.getLogger("neuralhead.train")

AVATARS_FILE = "avatars.json"
#: Names of the perceptual networks a caller may pass to :class:`DistillationTask`.
NETWORKS = ("vgg19", "vggface", "gaze")


@dataclass
class DistillationOptions:
    """Settings of a distillation run (all recorded in the run's config.json).

    ``base_model`` and ``enhancer`` are saved model directories forming the teacher (not
    needed when a teacher module is passed to :func:`distill_student`). ``batch_size`` is per
    process (default: the config's batch, 8 in Sec. 4.1, divided among the processes). At
    each evaluation ``eval_frames`` held-out driver frames are rendered, frame k for avatar
    k mod N. ``*_weights`` locate the perceptual networks' files (default: the weight cache).
    """

    preset: str = "student-512"
    base_model: str | None = None
    enhancer: str | None = None
    batch_size: int | None = None
    eval_frames: int = 16
    cache_limit_gb: float = 4.0
    vgg_weights: str | None = None
    vggface_weights: str | None = None
    gaze_weights: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)


def read_avatars(paths: list[str | Path], size: int) -> torch.Tensor:
    """The avatar source images ``(N, 3, size, size)`` in [0, 1] (square files, resized)."""
    if not paths:
        raise InputError("give at least one avatar image to distil")
    images = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise InputError(f"cannot read avatar image {path}")
        if image.shape[0] != image.shape[1]:
            raise InputError(
                f"avatar image {path} is {image.shape[1]}x{image.shape[0]}, not square"
            )
        if image.shape[0] != size:
            interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
            image = cv2.resize(image, (size, size), interpolation=interp)
        images.append(torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).permute(2, 0, 1))
    return torch.stack(images).float() / 255.0


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square images to ``size`` (antialiased bilinear), unchanged when already that size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )


class DriverFrames:
    """Frames of the given split of prepared datasets, in [0, 1], with landmarks for the gaze loss.

    ``items`` lists ``(dataset, frame)`` for every valid frame; ``load(items)`` gives
    ``(B, 3, size, size)`` images and ``(B, K, 2)`` landmarks in pixels at ``landmark_size``.
    """

    def __init__(
        self,
        data_dirs: list[Path],
        split: str,
        size: int,
        landmark_size: int,
        *,
        cache_limit_gb: float,
        progress: bool = False,
    ) -> None:
        self.datasets: list[PortraitDataset] = []
        self.landmarks: list[torch.Tensor] = []
        budget = cache_limit_gb * 2**30
        for root in data_dirs:
            probe = PortraitDataset(root, split, image_size=size, progress=progress)
            cache = probe.cache_bytes <= budget
            dataset = (
                PortraitDataset(root, split, image_size=size, cache=True, progress=progress)
                if cache
                else probe
            )
            budget -= dataset.cache_bytes if cache else 0
            self.datasets.append(dataset)
            points = torch.from_numpy(dataset.files.array("landmarks", mmap=False)[..., :2])
            self.landmarks.append(points.float() * (landmark_size / dataset.files.size))
        self.items = [
            (d, int(frame)) for d, dataset in enumerate(self.datasets) for frame in dataset.frames
        ]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, items: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([self.datasets[d].image_uint8(f) for d, f in items]).float() / 255.0
        landmarks = torch.stack([self.landmarks[d][f] for d, f in items])
        return images, landmarks


class DistillationTask:
    """The :class:`~neuralhead.training.engine.Task` that distils G_DT (see the module docstring).

    ``teacher`` maps ``(sources, drivers)`` at ``teacher_size`` to images; ``avatars`` are the
    ``(N, 3, teacher_size, teacher_size)`` source images; ``networks`` holds the perceptual
    networks by name (:data:`NETWORKS`), absent ones being left out.
    """

    def __init__(
        self,
        engine: Engine,
        data_dirs: list[Path],
        avatars: torch.Tensor,
        options: DistillationOptions,
        config: StudentConfig,
        teacher: nn.Module,
        teacher_size: int,
        networks: dict[str, nn.Module] | None = None,
    ) -> None:
        if config.num_avatars != avatars.shape[0]:
            raise InputError(
                f"the student has {config.num_avatars} avatar slots for {avatars.shape[0]} avatars"
            )
        unknown = set(networks or {}) - set(NETWORKS)
        if unknown:
            raise InputError(f"unknown perceptual networks {sorted(unknown)}; expected {NETWORKS}")
        self.engine, self.options, self.config = engine, options, config
        self.teacher_size = teacher_size
        device = engine.device
        self.avatars = avatars.to(device)
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        progress = engine.is_main and engine.options.progress
        common = dict(cache_limit_gb=options.cache_limit_gb, progress=progress)
        self.train_set = DriverFrames(data_dirs, "train", teacher_size, config.image_size, **common)
        self.heldout = self._heldout_set(data_dirs, common)
        self.batch_size = options.batch_size or max(1, config.batch_size // engine.world_size)

        self.raw_student = Student(config)
        self.raw_discriminator = MultiScalePatchDiscriminator(
            3,
            num_scales=config.disc_num_scales,
            num_layers=config.disc_num_layers,
            base_channels=config.disc_base_channels,
        )
        self.student = engine.wrap(self.raw_student)
        self.discriminator = engine.wrap(self.raw_discriminator)
        networks = networks or {}
        self.vgg19 = _loss(PerceptualLoss, networks.get("vgg19"), device)
        self.vggface = _loss(FacePerceptualLoss, networks.get("vggface"), device)
        self.gaze = None
        if networks.get("gaze") is not None:
            from neuralhead.losses.gaze import GazeLoss

            self.gaze = GazeLoss(networks["gaze"]).to(device)
        adamw = dict(
            lr=config.lr,
            betas=tuple(config.betas),
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
        self.g_optimizer = torch.optim.AdamW(self.raw_student.parameters(), **adamw)
        self.d_optimizer = torch.optim.AdamW(self.raw_discriminator.parameters(), **adamw)
        self.g_scheduler = cosine_schedule(self.g_optimizer, config)
        self.d_scheduler = cosine_schedule(self.d_optimizer, config)
        self.sampler = StepSampler(
            list(range(len(self.train_set))),
            self.batch_size,
            engine.options.seed,
            engine.rank,
            engine.world_size,
        )
        self._eval_targets: torch.Tensor | None = None

    def _heldout_set(self, data_dirs: list[Path], common: dict[str, Any]) -> DriverFrames | None:
        try:
            return DriverFrames(
                data_dirs, "heldout", self.teacher_size, self.config.image_size, **common
            )
        except InputError as exc:
            log.warning("no held-out evaluation: %s", exc)
            return None

    @property
    def loss_names(self) -> list[str]:
        """The loss terms this run trains with (perceptual terms whose network is present)."""
        names = [n for n in NETWORKS if getattr(self, n) is not None]
        return names + ["adv", "fm"] + (["l1"] if self.config.weight_l1 > 0 else [])

    # ------------------------------------------------------------------ Task protocol
    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "discriminator": self.discriminator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.g_optimizer, "discriminator": self.d_optimizer}

    def schedulers(self) -> dict[str, Any]:
        return {"student": self.g_scheduler, "discriminator": self.d_scheduler}

    @torch.no_grad()
    def pseudo_ground_truth(
        self, drivers: torch.Tensor, avatar_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x̂^HR_{i->d}, driver)`` at the student's size: the teacher's target and the input."""
        size = self.config.image_size
        target = self.teacher(self.avatars[avatar_index], drivers)
        return resize(target.float(), size).clamp(0, 1), resize(drivers, size)

    def _avatar_indices(self, step: int, count: int) -> torch.Tensor:
        seed = (self.engine.options.seed * 1_000_003 + step) * 4099 + self.engine.rank
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.config.num_avatars, (count,), generator=generator)

    def losses(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        landmarks: torch.Tensor,
        discriminator: nn.Module,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's loss (B.1) and its terms; ``discriminator`` judges target and prediction."""
        c, b = self.config, pred.shape[0]
        features = discriminator(torch.cat([target, pred]))
        d_real = [[f[:b] for f in scale] for scale in features]
        d_fake = [[f[b:] for f in scale] for scale in features]
        terms = {"adv": hinge_generator_loss(d_fake), "fm": feature_matching_loss(d_real, d_fake)}
        weights = {"adv": c.weight_adv, "fm": c.weight_fm}
        if self.vgg19 is not None:
            terms["vgg19"], weights["vgg19"] = self.vgg19(pred, target), c.weight_vgg19
        if self.vggface is not None:
            terms["vggface"], weights["vggface"] = self.vggface(pred, target), c.weight_vggface
        if self.gaze is not None:
            terms["gaze"], weights["gaze"] = self.gaze(pred, target, landmarks), c.weight_gaze
        if c.weight_l1 > 0:
            terms["l1"], weights["l1"] = F.l1_loss(pred, target), c.weight_l1
        total = torch.stack([weights[k] * v for k, v in terms.items()]).sum()
        return total, terms

    def train_step(self, step: int) -> dict[str, float]:
        device = self.engine.device
        items = [self.train_set.items[i] for i in self.sampler.batch(step)]
        drivers, landmarks = self.train_set.load(items)
        avatar_index = self._avatar_indices(step, len(items)).to(device)
        target, driver = self.pseudo_ground_truth(drivers.to(device), avatar_index)
        landmarks = landmarks.to(device)
        b = target.shape[0]
        self.student.train()
        self.discriminator.train()

        # Generator step with D frozen (only G_DT is updated), then D on detached outputs.
        self.raw_discriminator.requires_grad_(False)
        with self.engine.autocast():
            pred = self.student(driver, avatar_index).float()
            total, terms = self.losses(pred, target, landmarks, self.raw_discriminator)
        self.g_optimizer.zero_grad(set_to_none=True)
        self.engine.backward_and_step(total, self.g_optimizer)
        self.raw_discriminator.requires_grad_(True)

        with self.engine.autocast():
            features = self.discriminator(torch.cat([target, pred.detach()]))
            d_real = [[f[:b] for f in scale] for scale in features]
            d_fake = [[f[b:] for f in scale] for scale in features]
            d_loss = hinge_discriminator_loss(d_real, d_fake)
        self.d_optimizer.zero_grad(set_to_none=True)
        self.engine.backward_and_step(d_loss, self.d_optimizer)
        self.g_scheduler.step()
        self.d_scheduler.step()

        stats = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        stats.update(loss=float(total.detach()), loss_d=float(d_loss.detach()))
        with torch.no_grad():
            stats["psnr"] = float(psnr(pred.detach().clamp(0, 1), target).mean())
        return stats

    # ------------------------------------------------------------------ evaluation
    def eval_items(self) -> list[tuple[tuple[int, int], int]]:
        """Held-out ``((dataset, frame), avatar)`` pairs: frames spread over the held-out
        splits, frame k rendered for avatar k mod N."""
        if self.heldout is None:
            return []
        count = min(self.options.eval_frames, len(self.heldout))
        picks = np.unique(np.linspace(0, len(self.heldout) - 1, count).round().astype(int))
        n = self.config.num_avatars
        return [(self.heldout.items[p], k % n) for k, p in enumerate(picks)]

    @torch.no_grad()
    def student_vs_teacher(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher images ``(M, 3, S, S)`` on :meth:`eval_items` (teacher cached)."""
        items = self.eval_items()
        device = self.engine.device
        self.raw_student.eval()
        preds, targets = [], []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            drivers, _ = self.heldout.load([item for item, _ in chunk])
            index = torch.tensor([avatar for _, avatar in chunk], device=device)
            target, driver = self.pseudo_ground_truth(drivers.to(device), index)
            targets.append(target)
            preds.append(self.raw_student(driver, index).float())
        if self._eval_targets is None:
            self._eval_targets = torch.cat(targets)
        return torch.cat(preds), self._eval_targets

    def evaluate(self, step: int) -> dict[str, float]:
        """PSNR and L1 (0-255) of the student to the teacher on held-out drivers."""
        if not self.engine.is_main or not self.eval_items():
            return {}
        pred, target = self.student_vs_teacher()
        return {
            "heldout_psnr": float(psnr(pred.clamp(0, 1), target).mean()),
            "heldout_l1": float(l1_255(pred.clamp(0, 1), target).mean()),
        }

    @torch.no_grad()
    def preview(self, step: int) -> np.ndarray:
        """Rows of driver | teacher | student for a training frame and a held-out frame."""
        sets = [(self.train_set, "train")]
        if self.heldout is not None:
            sets.append((self.heldout, "held-out"))
        rows = []
        self.raw_student.eval()
        device = self.engine.device
        for k, (frames, split) in enumerate(sets):
            drivers, _ = frames.load([frames.items[len(frames) // 2]])
            index = torch.tensor([k % self.config.num_avatars], device=device)
            target, driver = self.pseudo_ground_truth(drivers.to(device), index)
            pred = self.raw_student(driver, index)
            rows.append(
                [
                    label(to_uint8(driver[0], (0, 1)), f"{split} driver"),
                    label(to_uint8(target[0], (0, 1)), f"teacher, avatar {int(index[0])}"),
                    label(to_uint8(pred[0], (0, 1)), "student"),
                ]
            )
        return grid(rows)

    def finish(self, run_dir: Path) -> None:
        """Save the trained G_DT to ``run_dir/student``."""
        self.raw_student.save_pretrained(run_dir / STUDENT_DIR)


def _loss(cls: type[PerceptualLoss], network: nn.Module | None, device: torch.device):
    return None if network is None else cls(network).to(device)


def build_teacher(
    base_model: str | Path, enhancer: str | Path | None = None
) -> HighResolutionModel:
    """G_HR from saved model directories: G_base, and G_enh when given."""
    base = load_base_model(base_model)
    return HighResolutionModel(
        base, None if enhancer is None else Enhancer.from_pretrained(enhancer)
    )


def load_networks(options: DistillationOptions, config: StudentConfig) -> dict[str, nn.Module]:
    """The perceptual networks whose loss weight is positive and whose weights are present."""
    from neuralhead.pretrained.gaze import GazeBlinkNet
    from neuralhead.pretrained.vgg import VGG19
    from neuralhead.pretrained.vggface import VGGFace

    wanted = (
        ("vgg19", config.weight_vgg19, VGG19.from_pretrained, options.vgg_weights, "VGG19"),
        (
            "vggface",
            config.weight_vggface,
            VGGFace.from_pretrained,
            options.vggface_weights,
            "VGGFace",
        ),
        ("gaze", config.weight_gaze, GazeBlinkNet.from_pretrained, options.gaze_weights, "Gaze"),
    )
    networks = {}
    for name, weight, loader, path, what in wanted:
        if weight > 0:
            network = load_optional_network(loader, path, what)
            if network is not None:
                networks[name] = network
    return networks


def distill_student(
    avatar_images: list[str | Path],
    data_dirs: list[str | Path],
    run_dir: str | Path,
    options: DistillationOptions,
    engine_options: EngineOptions,
    resume: bool = False,
    teacher: nn.Module | None = None,
    teacher_size: int | None = None,
    networks: dict[str, nn.Module] | None = None,
) -> Path:
    """Distil (or resume distilling) a student; returns the run directory.

    ``avatar_images`` are the N source images (avatar i is the i-th); ``data_dirs`` prepared
    datasets whose frames drive. ``teacher`` (with its input size ``teacher_size``, default
    the student's) replaces the one built from ``options.base_model`` / ``options.enhancer``;
    ``networks`` replaces the perceptual networks loaded from their weight files. When
    resuming, the run's avatars, data, options and config are used. Works under torchrun.
    """
    run_dir = Path(run_dir)
    if resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise InputError(f"cannot resume: {run_dir} has no config.json")
        run = json.loads(saved.read_text())
        if run.get("model") != "megaportraits-student":
            raise InputError(f"cannot resume: {run_dir} is a {run.get('model')} run, not a student")
        engine_options = replace(engine_options, seed=run["engine"]["seed"])
        avatar_images, data_dirs = run["avatars"], run["data"]
        options = DistillationOptions(**run["train"])
        config = config_from_dict(StudentConfig, run["model_config"])
    else:
        if not data_dirs:
            raise InputError("give at least one prepared dataset whose frames drive the avatars")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise InputError(
                f"run directory {run_dir} already exists; pass --resume to continue it "
                "or choose another --run-dir"
            )
        # The cosine schedule spans the run's step limit and keeps it when resumed.
        overrides = {
            "num_avatars": len(avatar_images),
            "num_iterations": engine_options.max_steps,
            **options.model_overrides,
        }
        config = student_preset(options.preset, **overrides)
    if teacher is None:
        if options.base_model is None:
            raise InputError("give the teacher's base model (--base-model DIR) to distil from")
        teacher = build_teacher(options.base_model, options.enhancer)
        teacher_size = teacher.base.config.image_size
    teacher_size = teacher_size or config.image_size
    avatars = read_avatars(list(avatar_images), teacher_size)
    if networks is None:
        networks = load_networks(options, config)
    data_dirs = [Path(d) for d in data_dirs]

    engine = Engine.create(run_dir, engine_options)
    task = None
    try:
        task = DistillationTask(
            engine, data_dirs, avatars, options, config, teacher, teacher_size, networks
        )
        record = {
            "model": "megaportraits-student",
            "neuralhead_version": __version__,
            "avatars": [str(Path(p).resolve()) for p in avatar_images],
            "data": [str(d.resolve()) for d in data_dirs],
            "train": asdict(options),
            "engine": asdict(engine.options),
            "model_config": config_to_dict(config),
            "losses": task.loss_names,
            "world_size": engine.world_size,
        }
        engine.prepare_run_dir(record, resume)
        if engine.is_main:
            write_json_atomic(run_dir / AVATARS_FILE, record["avatars"])
        train_log.info(
            "G_DT for %d avatars on %d driver frames; losses: %s",
            config.num_avatars,
            len(task.train_set),
            ", ".join(task.loss_names),
        )
        start = engine.start_or_resume(task, resume)
        engine.fit(task, start)
    finally:
        task = None  # Engine.close frees its DDP wrappers while the process group lives
        engine.close()
    return run_dir
