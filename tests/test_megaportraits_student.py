"""The student G_DT (MegaPortraits Sec. 3.3, A.3): identity lock, distillation, ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from neuralhead.errors import InputError
from neuralhead.megaportraits.distillation import (
    DistillationOptions,
    DistillationTask,
    distill_student,
    read_avatars,
)
from neuralhead.megaportraits.student import Student, StudentConfig, student_preset
from neuralhead.training.engine import Engine, EngineOptions


class StandInTeacher(nn.Module):
    """A cheap G_HR: the avatar's colours with the driver's shading."""

    def forward(self, source: torch.Tensor, driver: torch.Tensor) -> torch.Tensor:
        return 0.6 * source + 0.4 * driver.mean(dim=1, keepdim=True)


def tiny_student(**overrides) -> Student:
    return Student(student_preset("student-tiny", **overrides))


def write_avatars(folder: Path, count: int, size: int = 64) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        a, b, c = rng.uniform(0.1, 0.9, 3)
        image = np.stack([a * xx + 0.1, b * np.ones_like(xx), c * yy + 0.05], -1)
        paths.append(folder / f"avatar{i}.png")
        cv2.imwrite(str(paths[-1]), (np.clip(image, 0, 1)[:, :, ::-1] * 255).astype(np.uint8))
    return paths


def test_student_shapes_avatar_selection_and_gradients() -> None:
    torch.manual_seed(0)
    student = tiny_student()
    driver = torch.rand(4, 3, 64, 64)
    out = student(driver, torch.arange(4))
    assert out.shape == (4, 3, 64, 64)
    assert 0 <= float(out.detach().min()) and float(out.detach().max()) <= 1
    same_driver = driver[:1].expand(2, -1, -1, -1)
    a, b = student.eval()(same_driver, torch.tensor([0, 1]))
    assert (a - b).abs().max() > 1e-3
    assert torch.allclose(student(same_driver[:1], 1), b[None], atol=1e-6)

    student.train()
    student(driver, torch.arange(4)).square().mean().backward()
    missing = [n for n, p in student.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing
    # Each avatar's tensors are trained only by the samples that select it.
    student.zero_grad()
    student(driver[:2], torch.tensor([2, 2])).mean().backward()
    grad = student.blocks[0].avatar_maps.grad
    assert grad[2].abs().sum() > 0 and grad[[0, 1, 3]].abs().sum() == 0


def test_identity_lock_rejects_unregistered_avatars() -> None:
    student = tiny_student()
    driver = torch.rand(2, 3, 64, 64)
    for index in (4, -1, torch.tensor([0, 7])):
        with pytest.raises(InputError, match="not registered"):
            student(driver, index)
    with pytest.raises(InputError, match="integer"):
        student(driver, torch.tensor([0.0, 1.0]))
    with pytest.raises(InputError, match=r"shape \(2,\)"):
        student(driver, torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match=r"\(B, 3, 64, 64\)"):
        student(torch.rand(2, 3, 32, 32), 0)
    with pytest.raises(InputError, match="at least one avatar"):
        StudentConfig(num_avatars=0)


def test_avatar_tensors_are_at_most_64_pixels() -> None:
    # The paper's 512 layout with narrow widths: the tensors' sizes do not depend on them.
    narrow = dict(num_avatars=3, encoder_width=4, up_channels=(8, 8, 8, 8, 4))
    student = Student(student_preset("student-512", **narrow))
    sizes = [tuple(block.avatar_maps.shape) for block in student.blocks]
    assert [s[-1] for s in sizes] == [16, 16, 32, 64, 64, 64, 64]
    assert all(s[0] == 3 and s[2] == s[3] for s in sizes)
    assert sizes[0][1] == 32 and sizes[-1][1] == 8  # C: the block's input width


def test_distillation_raises_psnr_to_the_teacher(tmp_path: Path, fake_dataset: Path) -> None:
    torch.manual_seed(0)
    avatars = read_avatars(write_avatars(tmp_path / "avatars", 4), 64)
    engine = Engine.create(tmp_path / "run", EngineOptions(max_steps=20, progress=False))
    config = student_preset("student-tiny", lr=2e-3)
    options = DistillationOptions(preset="student-tiny", batch_size=4, eval_frames=8)
    task = DistillationTask(
        engine, [fake_dataset], avatars, options, config, StandInTeacher(), teacher_size=64
    )
    assert task.loss_names == ["adv", "fm"]
    assert len(task.eval_items()) == 4  # the fake clip holds 4 held-out frames
    before = task.evaluate(0)["heldout_psnr"]
    for step in range(20):
        task.train_step(step)
    after = task.evaluate(20)["heldout_psnr"]
    assert after > before + 3.0


def test_distill_student_writes_a_student_and_resumes(tmp_path: Path, fake_dataset: Path) -> None:
    torch.manual_seed(0)
    paths = write_avatars(tmp_path / "avatars", 2)
    run = tmp_path / "run"
    options = DistillationOptions(preset="student-tiny", batch_size=2, eval_frames=2)
    engine_options = EngineOptions(
        max_steps=2, log_every=1, eval_every=2, preview_every=2, checkpoint_every=1, progress=False
    )
    common = dict(teacher=StandInTeacher(), networks={})
    distill_student(paths, [fake_dataset], run, options, engine_options, **common)
    student = Student.from_pretrained(run / "student")
    assert student.num_avatars == 2
    assert json.loads((run / "avatars.json").read_text()) == [str(p.resolve()) for p in paths]
    longer = EngineOptions(max_steps=3, log_every=1, eval_every=0, progress=False)
    distill_student([], [], run, options, longer, resume=True, **common)
    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert any("heldout_psnr" in r for r in records if r["kind"] == "eval")


def test_onnx_export_matches_pytorch(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from neuralhead.megaportraits.export import OnnxStudent, export_student, max_export_error

    torch.manual_seed(0)
    student = tiny_student()
    student.save_pretrained(tmp_path / "student")
    path, error = export_student(tmp_path / "student", tmp_path / "student.onnx")
    assert error is not None and error < 1e-4
    runtime = OnnxStudent(path)
    assert (runtime.num_avatars, runtime.image_size) == (4, 64)
    driver = torch.rand(3, 3, 64, 64)
    expected = student.eval()(driver, torch.tensor([3, 0, 1])).detach().numpy()
    np.testing.assert_allclose(runtime(driver, np.array([3, 0, 1])), expected, atol=1e-4)
    assert max_export_error(student, path, batch=1) < 1e-4
    with pytest.raises(InputError, match="not registered"):
        runtime(driver, 4)
    with pytest.raises(InputError, match=r"\(B, 3, 64, 64\)"):
        runtime(driver[:, :, :32], 0)
