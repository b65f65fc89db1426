"""Training the high-resolution model G_enh on still images (MegaPortraits Sec. 3.2, Eq. 9-10, 4.1).

The base model G_base is fixed; only G_enh and a multi-scale patch discriminator D train. Each
step takes a batch of high-resolution images x^HR (Sec. 4: FFHQ), their 2x down-sampled
versions x^LR at the base model's size, and for each image a second image x_c^HR of the
folder. Then

* x̂ = G_base(x^LR, x^LR), the base model's reconstruction of the image, and x̂^HR = G_enh(x̂);
* x̂_c = G_base(x^LR, x_c^LR), the image driven by the other one's motion (cross-driving), and
  x̂_c^HR = G_enh(x̂_c);
* L_enh = L_GAN + w_MAE L_MAE + w_adv^c L_adv^c + w_cyc^c L_cyc^c (Eq. 10), where L_MAE is the
  L1 distance of x̂^HR to x^HR, L_GAN the hinge adversarial loss of x̂^HR plus w_FM times
  feature matching, L_adv^c the hinge adversarial loss of x̂_c^HR (no ground truth exists for
  it) and L_cyc^c = L_MAE(DS_4(x̂_c), DS_8(x̂_c^HR)) (Eq. 9), DS_k average pooling by k.
  Weights: Sec. 4.1 (w_MAE 100, w_FM 100, w_adv^c 1, w_cyc^c 10).
* D learns to tell x^HR from both x̂^HR and x̂_c^HR (hinge loss). One discriminator judges both
  fakes (the paper says "a patch discriminator" for each; sharing it is our choice).

Our reading: the supervised input x̂ is the base model's self-reconstruction (the paper
trains G_enh on "the input x̂" of G_base without saying what drives it, and uses x^LR for
appearance in the cross pair); x_c^HR is drawn uniformly from the other training images.
AdamW with cosine decay, as the base model (Sec. 4.1, B.1), over the config's
``num_iterations`` (a new run sets it to its step limit unless it is given).

Data format: a folder of square RGB images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``,
``.bmp``), found recursively and sorted by relative path (FFHQ's ``images1024x1024`` works as
it is), resized with area interpolation to the enhancer's output size. The last
``heldout_images`` are never trained on and serve for evaluation. Optional foreground masks
(8-bit ``.png``, same relative path and stem, in a separate folder) replace the background of
the targets by the constant grey level of the base model's targets
(:data:`~neuralhead.megaportraits.losses.BACKGROUND`; it never generates a background,
Sec. 3.1).

The run directory is the training engine's (config.json, log.txt, stats.jsonl, previews/,
checkpoints/; resumable with ``resume=True``); when training ends, ``enhancer/`` receives the
trained G_enh (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuralhead import __version__
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.losses import (
    PerceptualLoss,
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from neuralhead.megaportraits.enhancer import (
    Enhancer,
    EnhancerConfig,
    base_image,
    enhancer_preset,
)
from neuralhead.megaportraits.losses import BACKGROUND, foreground
from neuralhead.megaportraits.trainer import cosine_schedule
from neuralhead.metrics.image import psnr
from neuralhead.nn.discriminators import MultiScalePatchDiscriminator
from neuralhead.nn.pretrained import config_from_dict, config_to_dict
from neuralhead.training.engine import Engine, EngineOptions
from neuralhead.training.sampler import StepSampler
from neuralhead.visualize import grid, label, to_uint8

log = logging.getLogger(__name__)
train_log = logging.getLogger("neuralhead.train")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EXPORT_DIR = "enhancer"
#: DS_k of Eq. 9 on the base model's output; the enhancer's output is pooled ``scale`` times more.
CYCLE_DOWNSAMPLE = 4


@dataclass
class EnhancerTrainOptions:
    """Settings of a G_enh run (all recorded in the run's config.json).

    ``base_model`` is a saved :class:`~neuralhead.megaportraits.base_model.MegaPortraitsBase`
    directory (not needed when a base module is passed to :func:`train_enhancer`). ``masks``
    is the folder of foreground masks; ``background`` the grey level in [0, 1] that replaces
    the background where masks are given. ``batch_size`` is per process (default: the
    config's batch, 16 in Sec. 4.1, divided among the processes). ``vgg_weights`` is only read
    when the config's ``weight_vgg19`` is positive (off in the paper's Eq. 10).
    """

    preset: str = "enhancer-512"
    base_model: str | None = None
    masks: str | None = None
    background: float = BACKGROUND
    batch_size: int | None = None
    heldout_images: int = 8
    cache_limit_gb: float = 4.0
    vgg_weights: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)


def find_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursively), sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    return files


class StillImages:
    """Square RGB images of a folder at ``size`` x ``size``, optionally background-masked.

    ``images(indices)`` → ``(B, 3, size, size)`` float in [0, 1]. Decoded images (and masks)
    are kept in memory as uint8 while their total stays under ``cache_limit_gb``.
    """

    def __init__(
        self,
        root: str | Path,
        size: int,
        *,
        masks: str | Path | None = None,
        background: float = BACKGROUND,
        cache_limit_gb: float = 4.0,
    ) -> None:
        self.root = Path(root)
        self.files = find_images(self.root)
        self.size = size
        self.masks = None if masks is None else Path(masks)
        if self.masks is not None and not self.masks.is_dir():
            raise InputError(f"mask folder {self.masks} does not exist")
        if not 0.0 <= background <= 1.0:
            raise InputError(f"background must be a grey level in [0, 1], got {background}")
        self.background = background
        per_image = size * size * (4 if self.masks is not None else 3)
        self._capacity = int(cache_limit_gb * 2**30 // per_image)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, path: Path, flags: int) -> np.ndarray:
        image = cv2.imread(str(path), flags)
        if image is None:
            raise InputError(f"cannot read image {path}")
        if image.shape[0] != image.shape[1]:
            raise InputError(
                f"{path} is {image.shape[1]}x{image.shape[0]}; the enhancer trains on square images"
            )
        if image.shape[0] != self.size:
            interp = cv2.INTER_AREA if image.shape[0] > self.size else cv2.INTER_CUBIC
            image = cv2.resize(image, (self.size, self.size), interpolation=interp)
        return image

    def _load(self, index: int) -> np.ndarray:
        """``(size, size, 3 or 4)`` uint8: RGB, then the mask when masks are given."""
        if index in self._cache:
            return self._cache[index]
        path = self.files[index]
        rgb = self._read(path, cv2.IMREAD_COLOR)[:, :, ::-1]
        if self.masks is not None:
            mask_path = self.masks / path.relative_to(self.root).with_suffix(".png")
            if not mask_path.is_file():
                raise InputError(f"no mask {mask_path} for image {path}")
            rgb = np.dstack([rgb, self._read(mask_path, cv2.IMREAD_GRAYSCALE)])
        rgb = np.ascontiguousarray(rgb)
        if len(self._cache) < self._capacity:
            self._cache[index] = rgb
        return rgb

    def images(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The images as they are and as targets: ``(B, 3, size, size)`` each, in [0, 1].

        Targets have their background replaced where masks are given (the base model sees
        whole images, as in its own training, and learns masked targets).
        """
        data = torch.from_numpy(np.stack([self._load(i) for i in indices])).permute(0, 3, 1, 2)
        data = data.float() / 255.0
        rgb = data[:, :3]
        if self.masks is None:
            return rgb, rgb
        return rgb, foreground(rgb, data[:, 3:], self.background)


def load_optional_network(
    loader: Callable[[str | None], nn.Module], path: str | None, what: str
) -> nn.Module | None:
    """``loader(path)``, or None with a warning when its weights are absent and no path was named.

    A loss whose network is missing is left out, never replaced by something else.
    """
    try:
        return loader(path)
    except WeightsMissingError as exc:
        if path is not None:
            raise
        log.warning(
            "%s weights not found, so that loss term is left OUT of training. %s", what, exc
        )
        return None


def _split(features: list[list[torch.Tensor]], sizes: list[int]) -> list[Any]:
    """Discriminator features of a concatenated batch → one feature list per part."""
    parts = []
    start = 0
    for size in sizes:
        parts.append([[f[start : start + size] for f in scale] for scale in features])
        start += size
    return parts


class EnhancerTask:
    """The :class:`~neuralhead.training.engine.Task` that trains G_enh (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        images_dir: Path,
        options: EnhancerTrainOptions,
        config: EnhancerConfig,
        base: nn.Module,
        vgg: nn.Module | None = None,
    ) -> None:
        self.engine, self.options, self.config = engine, options, config
        base_size = getattr(getattr(base, "config", None), "image_size", config.input_size)
        if base_size != config.input_size:
            raise InputError(
                f"the base model renders {base_size}x{base_size} but the enhancer takes "
                f"{config.input_size}x{config.input_size}; choose a matching preset"
            )
        self.data = StillImages(
            images_dir,
            config.output_size,
            masks=options.masks,
            background=options.background,
            cache_limit_gb=options.cache_limit_gb,
        )
        heldout = options.heldout_images
        if heldout < 0 or len(self.data) - heldout < 2:
            raise InputError(
                f"{images_dir} has {len(self.data)} images: training needs at least 2 besides "
                f"the {heldout} held out"
            )
        self.train_indices = list(range(len(self.data) - heldout))
        self.heldout_indices = list(range(len(self.data) - heldout, len(self.data)))
        self.batch_size = options.batch_size or max(1, config.batch_size // engine.world_size)

        self.base = base.to(engine.device).eval().requires_grad_(False)
        self.raw_enhancer = Enhancer(config)
        self.raw_discriminator = MultiScalePatchDiscriminator(
            3,
            num_scales=config.disc_num_scales,
            num_layers=config.disc_num_layers,
            base_channels=config.disc_base_channels,
        )
        self.enhancer = engine.wrap(self.raw_enhancer)
        self.discriminator = engine.wrap(self.raw_discriminator)
        self.perceptual = None if vgg is None else PerceptualLoss(vgg).to(engine.device)
        adamw = dict(
            lr=config.lr,
            betas=tuple(config.betas),
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
        self.g_optimizer = torch.optim.AdamW(self.raw_enhancer.parameters(), **adamw)
        self.d_optimizer = torch.optim.AdamW(self.raw_discriminator.parameters(), **adamw)
        self.g_scheduler = cosine_schedule(self.g_optimizer, config)
        self.d_scheduler = cosine_schedule(self.d_optimizer, config)
        self.sampler = StepSampler(
            self.train_indices, self.batch_size, engine.options.seed, engine.rank, engine.world_size
        )

    # ------------------------------------------------------------------ Task protocol
    def modules(self) -> dict[str, nn.Module]:
        return {"enhancer": self.enhancer, "discriminator": self.discriminator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"enhancer": self.g_optimizer, "discriminator": self.d_optimizer}

    def schedulers(self) -> dict[str, Any]:
        return {"enhancer": self.g_scheduler, "discriminator": self.d_scheduler}

    def _cross_indices(self, step: int, indices: list[int]) -> list[int]:
        """For each image another training image, drawn from a generator seeded by the step."""
        seed = (self.engine.options.seed * 1_000_003 + step) * 4099 + self.engine.rank
        generator = torch.Generator().manual_seed(seed)
        n = len(self.train_indices)
        offsets = torch.randint(1, n, (len(indices),), generator=generator).tolist()
        position = {index: i for i, index in enumerate(self.train_indices)}
        return [self.train_indices[(position[i] + o) % n] for i, o in zip(indices, offsets)]

    @torch.no_grad()
    def reconstruct(
        self, x_hr: torch.Tensor, x_c_hr: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x̂ = G_base(x^LR, x^LR)`` and ``x̂_c = G_base(x^LR, x_c^LR)`` (Sec. 3.2), from the
        unmasked high-resolution images."""
        scale = self.config.scale
        x_lr, x_c_lr = F.avg_pool2d(x_hr, scale), F.avg_pool2d(x_c_hr, scale)
        out = base_image(self.base(torch.cat([x_lr, x_lr]), torch.cat([x_lr, x_c_lr])))
        return out.float().chunk(2)

    def losses(
        self,
        x_hr: torch.Tensor,
        x_hat: torch.Tensor,
        x_hat_c: torch.Tensor,
        pred: torch.Tensor,
        pred_c: torch.Tensor,
        discriminator: nn.Module,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_enh (Eq. 10) and its terms, with ``discriminator`` judging the real and both fakes."""
        c, b = self.config, x_hr.shape[0]
        d_real, d_fake, d_fake_c = _split(discriminator(torch.cat([x_hr, pred, pred_c])), [b] * 3)
        terms = {
            "mae": F.l1_loss(pred, x_hr),
            "adv": hinge_generator_loss(d_fake),
            "fm": feature_matching_loss(d_real, d_fake),
            "adv_cross": hinge_generator_loss(d_fake_c),
            "cyc_cross": F.l1_loss(
                F.avg_pool2d(x_hat_c, CYCLE_DOWNSAMPLE),
                F.avg_pool2d(pred_c, CYCLE_DOWNSAMPLE * c.scale),
            ),
        }
        weights = {
            "mae": c.weight_mae,
            "adv": c.weight_adv,
            "fm": c.weight_fm,
            "adv_cross": c.weight_adv_cross,
            "cyc_cross": c.weight_cyc_cross,
        }
        if self.perceptual is not None and c.weight_vgg19 > 0:
            terms["vgg19"] = self.perceptual(pred, x_hr)
            weights["vgg19"] = c.weight_vgg19
        total = torch.stack([weights[k] * v for k, v in terms.items()]).sum()
        return total, terms

    def train_step(self, step: int) -> dict[str, float]:
        indices = self.sampler.batch(step)
        device = self.engine.device
        image, x_hr = (t.to(device) for t in self.data.images(indices))
        x_c_hr = self.data.images(self._cross_indices(step, indices))[0].to(device)
        x_hat, x_hat_c = self.reconstruct(image, x_c_hr)
        b = x_hr.shape[0]
        self.enhancer.train()
        self.discriminator.train()

        # Generator step: D judges the attached fakes with its weights frozen, so that only
        # G_enh is updated and no gradient of D is computed or synchronised.
        self.raw_discriminator.requires_grad_(False)
        with self.engine.autocast():
            pred, pred_c = self.enhancer(torch.cat([x_hat, x_hat_c])).float().split(b)
            total, terms = self.losses(x_hr, x_hat, x_hat_c, pred, pred_c, self.raw_discriminator)
        self.g_optimizer.zero_grad(set_to_none=True)
        self.engine.backward_and_step(total, self.g_optimizer)
        self.raw_discriminator.requires_grad_(True)

        with self.engine.autocast():
            fakes = torch.cat([pred, pred_c]).detach()
            d_real, d_fake = _split(self.discriminator(torch.cat([x_hr, fakes])), [b, 2 * b])
            d_loss = hinge_discriminator_loss(d_real, d_fake)
        self.d_optimizer.zero_grad(set_to_none=True)
        self.engine.backward_and_step(d_loss, self.d_optimizer)
        self.g_scheduler.step()
        self.d_scheduler.step()

        stats = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        stats.update(loss=float(total.detach()), loss_d=float(d_loss.detach()))
        stats["lr"] = self.g_scheduler.get_last_lr()[0]
        return stats

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def enhance(self, images: torch.Tensor) -> torch.Tensor:
        self.raw_enhancer.eval()
        return self.raw_enhancer(images).float()

    def _heldout_pairs(self) -> list[tuple[int, int]]:
        """Each held-out image with the next one as its cross driver (the first without any)."""
        ids = self.heldout_indices
        return [(i, ids[(k + 1) % len(ids)] if len(ids) > 1 else i) for k, i in enumerate(ids)]

    def evaluate(self, step: int) -> dict[str, float]:
        """PSNR of x̂^HR to x^HR on the held-out images, beside bicubic up-sampling of x̂, and
        the cross-driving cycle L1 of Eq. 9."""
        if not self.engine.is_main or not self.heldout_indices:
            return {}
        sums = {"psnr": 0.0, "psnr_bicubic": 0.0, "cyc_cross_l1": 0.0}
        pairs = self._heldout_pairs()
        device = self.engine.device
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            image, x_hr = (t.to(device) for t in self.data.images([a for a, _ in chunk]))
            x_c_hr = self.data.images([c for _, c in chunk])[0].to(device)
            x_hat, x_hat_c = self.reconstruct(image, x_c_hr)
            pred, pred_c = self.enhance(torch.cat([x_hat, x_hat_c])).split(len(chunk))
            bicubic = F.interpolate(
                x_hat, scale_factor=self.config.scale, mode="bicubic", align_corners=False
            )
            sums["psnr"] += float(psnr(pred.clamp(0, 1), x_hr).sum())
            sums["psnr_bicubic"] += float(psnr(bicubic.clamp(0, 1), x_hr).sum())
            cycle = (
                F.avg_pool2d(x_hat_c, CYCLE_DOWNSAMPLE)
                - F.avg_pool2d(pred_c, CYCLE_DOWNSAMPLE * self.config.scale)
            ).abs()
            sums["cyc_cross_l1"] += float(cycle.mean(dim=(1, 2, 3)).sum())
        return {f"heldout_{k}": v / len(pairs) for k, v in sums.items()}

    def preview(self, step: int) -> np.ndarray:
        """Rows of x̂ | x̂^HR | x^HR | x̂_c | x̂_c^HR for a training and a held-out image."""
        picks = [(self.train_indices[0], self.train_indices[1])]
        picks += self._heldout_pairs()[:1]
        device = self.engine.device
        rows = []
        for image, cross in picks:
            rgb, x_hr = (t.to(device) for t in self.data.images([image]))
            x_hat, x_hat_c = self.reconstruct(rgb, self.data.images([cross])[0].to(device))
            pred, pred_c = self.enhance(torch.cat([x_hat, x_hat_c])).split(1)
            split = "held-out" if image in self.heldout_indices else "train"
            rows.append(
                [
                    label(to_uint8(x_hat[0], (0, 1)), "G_base"),
                    label(to_uint8(pred[0], (0, 1)), "G_enh"),
                    label(to_uint8(x_hr[0], (0, 1)), f"{split} #{image}"),
                    label(to_uint8(x_hat_c[0], (0, 1)), f"driven by #{cross}"),
                    label(to_uint8(pred_c[0], (0, 1)), "G_enh"),
                ]
            )
        return grid(rows)

    def finish(self, run_dir: Path) -> None:
        """Save the trained G_enh to ``run_dir/enhancer``."""
        self.raw_enhancer.save_pretrained(run_dir / EXPORT_DIR)


def build_config(options: EnhancerTrainOptions) -> EnhancerConfig:
    return enhancer_preset(options.preset, **options.model_overrides)


def load_base_model(path: str | Path) -> nn.Module:
    """A MegaPortraits base model: its training run's directory or the saved model's own
    (``config.json`` + ``model.safetensors``)."""
    from neuralhead.megaportraits.reenact import load_base

    return load_base(path)


def train_enhancer(
    images_dir: str | Path | None,
    run_dir: str | Path,
    options: EnhancerTrainOptions,
    engine_options: EngineOptions,
    resume: bool = False,
    base: nn.Module | None = None,
) -> Path:
    """Train (or resume) G_enh on a folder of still images; returns the run directory.

    ``base`` is the frozen G_base (any module mapping ``(source, driver)`` to an image or a
    dict with ``"image"``); without it the base model is loaded from ``options.base_model``.
    When resuming, the images, options and config of the run are used and ``images_dir`` and
    ``options`` are ignored. Works under torchrun.
    """
    run_dir = Path(run_dir)
    run = None
    if resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise InputError(f"cannot resume: {run_dir} has no config.json")
        run = json.loads(saved.read_text())
        if run.get("model") != "megaportraits-enhancer":
            raise InputError(
                f"cannot resume: {run_dir} is a {run.get('model')} run, not an enhancer"
            )
        engine_options = replace(engine_options, seed=run["engine"]["seed"])
        images_dir = run["data"]
        options = EnhancerTrainOptions(**run["train"])
        config = config_from_dict(EnhancerConfig, run["model_config"])
    else:
        if images_dir is None:
            raise InputError("give a folder of high-resolution images to train on")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise InputError(
                f"run directory {run_dir} already exists; pass --resume to continue it "
                "or choose another --run-dir"
            )
        if "num_iterations" not in options.model_overrides:
            # The cosine schedule spans the run's step limit and keeps it when resumed.
            overrides = {**options.model_overrides, "num_iterations": engine_options.max_steps}
            options = replace(options, model_overrides=overrides)
        config = build_config(options)
    if base is None:
        if options.base_model is None:
            raise InputError(
                "give the trained base model (--base-model DIR) the enhancer builds on"
            )
        base = load_base_model(options.base_model)
    vgg = None
    if config.weight_vgg19 > 0:
        from neuralhead.pretrained.vgg import VGG19

        vgg = load_optional_network(VGG19.from_pretrained, options.vgg_weights, "VGG19")

    engine = Engine.create(run_dir, engine_options)
    task = None
    try:
        task = EnhancerTask(engine, Path(images_dir), options, config, base, vgg)
        record = {
            "model": "megaportraits-enhancer",
            "neuralhead_version": __version__,
            "data": str(Path(images_dir).resolve()),
            "train": asdict(options),
            "engine": asdict(engine.options),
            "model_config": config_to_dict(config),
            "vgg_loss": vgg is not None,
            "world_size": engine.world_size,
        }
        engine.prepare_run_dir(record, resume)
        train_log.info(
            "G_enh %d -> %d on %d images (%d held out), batch %d per process",
            config.input_size,
            config.output_size,
            len(task.train_indices),
            len(task.heldout_indices),
            task.batch_size,
        )
        start = engine.start_or_resume(task, resume)
        engine.fit(task, start)
    finally:
        task = None  # Engine.close frees its DDP wrappers while the process group lives
        engine.close()
    return run_dir
