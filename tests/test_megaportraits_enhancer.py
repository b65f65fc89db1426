"""G_enh (MegaPortraits Sec. 3.2, A.2) and its training with the cross-driving losses (Eq. 9-10)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.megaportraits.enhancer import (
    Enhancer,
    EnhancerConfig,
    HighResolutionModel,
    enhancer_preset,
)
from neuralhead.megaportraits.enhancer_training import (
    EnhancerTask,
    EnhancerTrainOptions,
    StillImages,
    train_enhancer,
)
from neuralhead.training.engine import Engine, EngineOptions


class StandInBase(nn.Module):
    """A cheap G_base: the source's appearance with a little of the driver's, as a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.tensor(0.25))

    def forward(self, source: torch.Tensor, driver: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image": (1 - self.mix) * source + self.mix * driver}


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        a, b, c = rng.uniform(0.2, 0.8, 3)
        image = np.stack([a + 0.2 * xx, b * yy + 0.1, c * np.ones_like(xx)], -1)
        # Half the files in a subfolder: images are found recursively.
        path = folder / ("sub" if i % 2 else "") / f"{i:03d}.png"
        cv2.imwrite(str(path), (np.clip(image, 0, 1)[:, :, ::-1] * 255).astype(np.uint8))
    return folder


def test_tiny_enhancer_doubles_resolution_and_trains_every_parameter() -> None:
    torch.manual_seed(0)
    model = Enhancer(enhancer_preset("enhancer-tiny"))
    image = torch.rand(2, 3, 64, 64)
    out = model(image)
    assert out.shape == (2, 3, 128, 128)
    assert 0 <= float(out.detach().min()) and float(out.detach().max()) <= 1
    (out - F.interpolate(image, scale_factor=2)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_paper_preset_layout() -> None:
    config = enhancer_preset("enhancer-512")
    assert (config.input_size, config.output_size, config.num_upsamplings) == (512, 1024, 2)
    assert config.volume_channels * config.volume_depth == 1536
    assert (config.weight_mae, config.weight_fm, config.weight_adv_cross) == (100, 100, 1)
    assert config.weight_cyc_cross == 10
    # The paper's layout with narrow widths (the block counts do not depend on them).
    narrow = dict(volume_channels=4, volume_depth=4, decoder_channels=8, norm_groups=4)
    model = Enhancer(enhancer_preset("enhancer-512", up_channels=(8, 8), **narrow))
    # A.2: conv + 2 ResBlock3D in the encoder; 8 + 2 up + 3 high-resolution blocks after it.
    assert len(model.encoder.blocks) == 2 and len(model.decoder.blocks) == 13
    assert model.encoder.conv.stride == (2, 2)


def test_bad_inputs_and_configs_raise() -> None:
    model = Enhancer(enhancer_preset("enhancer-tiny"))
    with pytest.raises(InputError, match="divisible by 2"):
        model(torch.rand(1, 3, 63, 64))
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(InputError, match="up_channels needs 2"):
        EnhancerConfig(up_channels=(64,))
    with pytest.raises(InputError, match="unknown enhancer preset"):
        enhancer_preset("enhancer-2048")


def test_high_resolution_model_keeps_the_base_frozen() -> None:
    torch.manual_seed(0)
    base = StandInBase()
    teacher = HighResolutionModel(base, Enhancer(enhancer_preset("enhancer-tiny"))).train()
    source, driver = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    assert teacher(source, driver).shape == (1, 3, 128, 128)
    assert not base.training and not base.mix.requires_grad
    assert torch.equal(HighResolutionModel(base)(source, driver), base(source, driver)["image"])


def _task(tmp_path: Path, **option_overrides) -> EnhancerTask:
    images = write_images(tmp_path / "images", 6, 128)
    engine = Engine.create(tmp_path / "run", EngineOptions(max_steps=4, progress=False))
    options = EnhancerTrainOptions(preset="enhancer-tiny", heldout_images=2, **option_overrides)
    return EnhancerTask(engine, images, options, enhancer_preset("enhancer-tiny"), StandInBase())


def test_cross_driving_losses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = _task(tmp_path)
    assert len(task.train_indices) == 4 and task.heldout_indices == [4, 5]
    rgb, x_hr = task.data.images([0, 1])
    x_hat, x_hat_c = task.reconstruct(rgb, task.data.images([2, 3])[0])
    assert x_hat.shape == (2, 3, 64, 64)
    # Eq. 9: an enhancer output that repeats each pixel of x̂_c has no cycle loss.
    pred = task.enhance(x_hat)
    exact = F.interpolate(x_hat_c, scale_factor=2, mode="nearest")
    _, terms = task.losses(x_hr, x_hat, x_hat_c, pred, exact, task.raw_discriminator)
    assert set(terms) == {"mae", "adv", "fm", "adv_cross", "cyc_cross"}
    assert float(terms["cyc_cross"]) < 1e-6
    assert float(terms["mae"]) == pytest.approx(float((pred - x_hr).abs().mean()), rel=1e-5)
    total, terms = task.losses(x_hr, x_hat, x_hat_c, pred, pred, task.raw_discriminator)
    expected = (
        100 * terms["mae"] + terms["adv"] + 100 * terms["fm"] + terms["adv_cross"]
    ) + 10 * terms["cyc_cross"]
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(terms["cyc_cross"]) > 0

    before = [p.detach().clone() for p in task.raw_enhancer.parameters()]
    stats = task.train_step(0)
    assert all(np.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, task.raw_enhancer.parameters()))
    metrics = task.evaluate(1)
    assert set(metrics) == {"heldout_psnr", "heldout_psnr_bicubic", "heldout_cyc_cross_l1"}


def test_masks_replace_the_background_of_targets(tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", 2, 32)
    masks = tmp_path / "masks"
    (masks / "sub").mkdir(parents=True)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    for name in ("000.png", "sub/001.png"):
        cv2.imwrite(str(masks / name), mask)
    data = StillImages(images, 16, masks=masks, background=1.0)
    rgb, target = data.images([0, 1])
    assert target.shape == (2, 3, 16, 16)
    assert torch.allclose(target[:, :, 0, 0], torch.ones(2, 3))
    assert torch.allclose(target[:, :, 8, 8], rgb[:, :, 8, 8])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        StillImages(tmp_path / "empty", 16)


def test_train_enhancer_saves_and_resumes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    images = write_images(tmp_path / "images", 5, 128)
    run = tmp_path / "run"
    options = EnhancerTrainOptions(preset="enhancer-tiny", heldout_images=1, batch_size=2)
    engine_options = EngineOptions(
        max_steps=2, log_every=1, eval_every=2, preview_every=2, checkpoint_every=1, progress=False
    )
    train_enhancer(images, run, options, engine_options, base=StandInBase())
    saved = Enhancer.from_pretrained(run / "enhancer")
    assert saved.config == enhancer_preset("enhancer-tiny", num_iterations=2)
    assert (run / "previews" / "latest.png").is_file()
    with pytest.raises(InputError, match="already exists"):
        train_enhancer(images, run, options, engine_options, base=StandInBase())

    longer = EngineOptions(max_steps=3, log_every=1, eval_every=0, progress=False)
    train_enhancer(None, run, options, longer, resume=True, base=StandInBase())
    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3]
    assert any("heldout_psnr" in r for r in records if r["kind"] == "eval")
