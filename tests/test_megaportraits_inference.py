"""MegaPortraits inference: background plate and compositing (Sec. 3.1), explicit pose control
(B.6), the reenactor, video reenactment with the enhancer, the student and paste-back, the
command line's dispatch between model families, and the benchmark's networks.

Models are random tiny presets (64 px) saved as training would leave them (a run directory
holding ``megaportraits/``); tracking runs mediapipe on the public-domain astronaut portrait
and on a 5-frame video made from it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from neuralhead.benchmark import (
    PAPER_REFERENCE,
    MegaPortraitsFrame,
    _model_and_inputs,
    format_results,
)
from neuralhead.cli import main
from neuralhead.errors import InputError
from neuralhead.media.video import VideoWriter, is_marked_synthetic, probe_video
from neuralhead.megaportraits.background import (
    PLATE_DILATION,
    background_plate,
    composite,
    soften_mask,
)
from neuralhead.megaportraits.base_model import MegaPortraitsBase
from neuralhead.megaportraits.config import preset
from neuralhead.megaportraits.enhancer import Enhancer, enhancer_preset
from neuralhead.megaportraits.reenact import (
    MegaPortraitsReenactor,
    PoseControl,
    driving_pose,
    is_megaportraits_checkpoint,
    reenact_video,
)
from neuralhead.megaportraits.student import Student, student_preset

FRAMES = 5
SOURCE_SIZE = 256


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("megaportraits_inference")
    portrait = skimage.data.astronaut()
    source = cv2.resize(portrait, (SOURCE_SIZE, SOURCE_SIZE), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(root / "source.png"), source[:, :, ::-1])
    face = portrait[0:320, 80:400]
    speech = (0.2 * np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000)).astype(np.float32)
    for name, sound in (("driving.mp4", speech), ("silent.mp4", None)):
        with VideoWriter(
            root / name,
            25,
            audio=sound,
            audio_sample_rate=16000 if sound is not None else None,
            synthetic=False,
        ) as writer:
            for i in range(FRAMES):
                move = cv2.getRotationMatrix2D((160, 160), 3.0 * i, 1.0)
                move[0, 2] += 3 * i
                frame = cv2.warpAffine(face, move, (320, 320), borderMode=cv2.BORDER_REPLICATE)
                writer.write(cv2.resize(frame, (128, 128), interpolation=cv2.INTER_AREA))
    torch.manual_seed(0)
    MegaPortraitsBase(preset("megaportraits-tiny")).save_pretrained(root / "run" / "megaportraits")
    Enhancer(enhancer_preset("enhancer-tiny")).save_pretrained(root / "enhancer")
    Student(student_preset("student-tiny")).save_pretrained(root / "student")
    return {
        "root": root,
        "source": root / "source.png",
        "driving": root / "driving.mp4",
        "silent": root / "silent.mp4",
        "run": root / "run",
        "enhancer": root / "enhancer",
        "student": root / "student",
    }


# --------------------------------------------------------------------------------------------
# Background (no tracking)


def _ramp_with_person() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A background that varies smoothly, a magenta "person" on it, and the person's mask."""
    height, width = 64, 80
    x = torch.linspace(0.0, 1.0, width)
    background = torch.empty(1, 3, height, width)
    background[0, 0] = 0.2 + 0.3 * x
    background[0, 1] = 0.5
    background[0, 2] = 0.7 - 0.2 * x
    mask = torch.zeros(1, 1, height, width)
    mask[..., 16:48, 24:56] = 1.0
    image = torch.where(mask > 0, torch.tensor([1.0, 0.0, 1.0])[:, None, None], background)
    return image, mask, background


def test_background_plate_fills_the_person_with_the_surrounding_colours():
    image, mask, background = _ramp_with_person()
    plate = background_plate(image, mask)
    assert plate.shape == image.shape
    inside = (slice(None), slice(None), slice(16, 48), slice(24, 56))
    # Every person pixel is replaced by a colour close to the background around it.
    assert (plate[inside] - background[inside]).abs().max() < 0.08
    assert plate[inside][:, 1].min() > 0.35  # no magenta (green 0) left
    # Beyond the dilated hole the plate is the image itself (to 8-bit precision).
    reach = round(PLATE_DILATION * 80) + 1
    assert torch.allclose(plate[..., : 16 - reach, :], image[..., : 16 - reach, :], atol=1 / 255)
    assert torch.allclose(plate[..., :, : 24 - reach], image[..., :, : 24 - reach], atol=1 / 255)


def test_background_plate_edge_cases():
    image, mask, _ = _ramp_with_person()
    assert torch.allclose(background_plate(image, torch.zeros_like(mask)), image, atol=1 / 255)
    everything = background_plate(image, torch.ones_like(mask))
    assert torch.allclose(everything, torch.full_like(image, 128 / 255))
    with pytest.raises(InputError, match="does not match"):
        background_plate(image, mask[..., :32, :])
    with pytest.raises(InputError, match="inpainting method"):
        background_plate(image, mask, method="lama")


def test_composite_uses_the_mask_as_alpha():
    torch.manual_seed(0)
    foreground, plate = torch.rand(2, 3, 8, 8), torch.rand(1, 3, 8, 8)
    ones = torch.ones(2, 1, 8, 8)
    assert torch.equal(composite(foreground, ones, plate), foreground)
    assert torch.equal(composite(foreground, 0 * ones, plate), plate.expand(2, -1, -1, -1))
    half = composite(foreground, 0.5 * ones, plate)
    assert torch.allclose(half, (foreground + plate) / 2)
    with pytest.raises(InputError, match="alpha"):
        composite(foreground, ones[..., :4], plate)


def test_soften_mask_shrinks_and_feathers():
    mask = torch.zeros(1, 1, 100, 100)
    mask[..., 30:70, 30:70] = 1.0
    soft = soften_mask(mask, shrink=0.03, feather=0.01)
    assert soft.min() >= 0 and soft.max() <= 1
    assert soft[0, 0, 50, 50] == pytest.approx(1.0) and soft[0, 0, 10, 10] == 0
    assert soft.sum() < mask.sum()  # eroded
    edge = soft[0, 0, 50, 25:40]
    assert ((edge > 0.01) & (edge < 0.99)).sum() >= 3  # a ramp, not a step
    assert torch.equal(soften_mask(torch.ones(1, 1, 20, 20)), torch.ones(1, 1, 20, 20))


# --------------------------------------------------------------------------------------------
# Pose control (B.6)


def _pose(rotation, translation, scale) -> dict[str, torch.Tensor]:
    return {
        "rotation": torch.tensor(rotation, dtype=torch.float32),
        "translation": torch.tensor(translation, dtype=torch.float32),
        "scale": torch.tensor(scale, dtype=torch.float32),
    }


SOURCE_POSE = _pose([[0.1, -0.3, 0.05]], [[0.1, -0.2, 0.0]], [[1.1]])


def test_relative_motion_with_a_still_driver_keeps_the_source_pose():
    driver = _pose([[0.2, 0.4, -0.1]] * 3, [[0.3, 0.1, 0.0]] * 3, [[0.8]] * 3)
    out = driving_pose(SOURCE_POSE, driver, PoseControl())
    assert torch.allclose(out["rotation"], SOURCE_POSE["rotation"].expand(3, 3), atol=1e-5)
    assert torch.equal(out["translation"], SOURCE_POSE["translation"].expand(3, 3))
    assert torch.equal(out["scale"], SOURCE_POSE["scale"].expand(3, 1))


def test_relative_motion_applies_the_driver_rotation_since_its_first_frame():
    source = _pose([[0.0, -0.3, 0.0]], [[0.0, 0.0, 0.0]], [[1.0]])
    driver = _pose([[0.0, 0.5, 0.0], [0.0, 0.7, 0.0]], [[0.0, 0.0, 0.0]] * 2, [[1.0]] * 2)
    out = driving_pose(source, driver, PoseControl())
    assert torch.allclose(out["rotation"][:, 1], torch.tensor([-0.3, -0.1]), atol=1e-5)
    # Measured from an earlier frame's rotation instead of this batch's first.
    later = driving_pose(source, driver, PoseControl(), reference=torch.tensor([0.0, 0.3, 0.0]))
    assert torch.allclose(later["rotation"][:, 1], torch.tensor([-0.1, 0.1]), atol=1e-5)


def test_absolute_motion_and_driver_scale_follow_the_driver():
    driver = _pose([[0.2, 0.4, -0.1], [0.0, -0.2, 0.1]], [[0.3, 0.1, 0.0]] * 2, [[0.8], [0.9]])
    out = driving_pose(SOURCE_POSE, driver, PoseControl(motion="absolute", scale="driver"))
    for key in ("rotation", "translation", "scale"):
        assert torch.allclose(out[key], driver[key])


def test_explicit_angles_replace_the_driven_rotation():
    driver = _pose([[0.2, 0.4, -0.1]] * 2, [[0.0, 0.0, 0.0]] * 2, [[1.0]] * 2)
    out = driving_pose(SOURCE_POSE, driver, PoseControl(motion="absolute", yaw=20.0))
    assert torch.allclose(out["rotation"][:, 1], torch.full((2,), math.radians(20.0)))
    assert torch.allclose(out["rotation"][:, [0, 2]], driver["rotation"][:, [0, 2]])
    frontal = driving_pose(SOURCE_POSE, driver, PoseControl(yaw=0.0, pitch=0.0, roll=0.0))
    assert torch.equal(frontal["rotation"], torch.zeros(2, 3))
    assert torch.equal(driver["rotation"][:, 1], torch.tensor([0.4, 0.4]))  # input untouched


def test_pose_control_rejects_bad_values():
    with pytest.raises(InputError, match="motion must be"):
        PoseControl(motion="sideways")
    with pytest.raises(InputError, match="scale must be"):
        PoseControl(scale="half")
    with pytest.raises(InputError, match="yaw must be a finite angle"):
        PoseControl(yaw=float("nan"))


# --------------------------------------------------------------------------------------------
# Reenactor and videos


def test_reenactor_motion_and_frames(files):
    base = MegaPortraitsBase.from_pretrained(files["run"] / "megaportraits")
    reenactor = MegaPortraitsReenactor(base)
    torch.manual_seed(0)
    driver = torch.rand(1, 3, 64, 64).expand(3, -1, -1, -1)
    with pytest.raises(InputError, match="no source image"):
        reenactor.frames(driver)
    source = reenactor.use_source(torch.rand(1, 3, 64, 64))
    assert source.mask.shape == (1, 1, 64, 64)
    still = reenactor.motion(driver)
    source_pose = source.state.pose
    assert torch.allclose(still.pose["rotation"], source_pose["rotation"].expand(3, 3), atol=1e-5)
    assert torch.allclose(still.pose["translation"], source_pose["translation"].expand(3, 3))
    turned = reenactor.motion(driver, PoseControl(yaw=20.0))
    assert torch.allclose(turned.pose["rotation"][:, 1], torch.full((3,), math.radians(20.0)))
    frames = reenactor.frames(driver, PoseControl(motion="absolute"))
    assert frames.shape == (3, 3, 64, 64) and 0 <= frames.min() and frames.max() <= 1
    with pytest.raises(InputError, match=r"\(T, 3, 64, 64\)"):
        reenactor.frames(torch.rand(1, 3, 32, 32))
    with pytest.raises(InputError, match="give the student too"):
        MegaPortraitsReenactor(base, avatar=1)


def test_checkpoint_detection(files, tmp_path):
    assert is_megaportraits_checkpoint(files["run"])
    assert is_megaportraits_checkpoint(files["run"] / "megaportraits")
    assert not is_megaportraits_checkpoint(files["enhancer"])
    assert not is_megaportraits_checkpoint(tmp_path)
    with pytest.raises(InputError, match="is not a MegaPortraits checkpoint"):
        reenact_video(tmp_path, files["source"], files["driving"], tmp_path / "x.mp4")


def test_reenact_video_with_the_enhancer(files, tmp_path):
    out = tmp_path / "hr.mp4"
    result = reenact_video(
        files["run"],
        files["source"],
        files["driving"],
        out,
        enhancer=files["enhancer"],
        side_by_side=True,
        progress=False,
    )
    info = probe_video(out)
    assert result.num_frames == FRAMES and info.num_frames == FRAMES
    assert (info.width, info.height) == result.size == (256, 128)  # driver | 128 px output
    assert is_marked_synthetic(out) and info.has_audio and result.has_audio
    assert "relative rotation, source scale" in result.motion


def test_reenact_video_pastes_back_into_the_source_image(files, tmp_path):
    out = tmp_path / "paste.mp4"
    result = reenact_video(
        files["run"],
        files["source"],
        files["silent"],
        out,
        motion="absolute",
        scale="driver",
        yaw=0.0,
        pitch=0.0,
        roll=0.0,
        paste_back=True,
        max_frames=3,
        progress=False,
    )
    info = probe_video(out)
    assert info.num_frames == 3 and (info.width, info.height) == (SOURCE_SIZE, SOURCE_SIZE)
    assert not info.has_audio and is_marked_synthetic(out)
    assert "absolute rotation, driver scale" in result.motion and "yaw 0°" in result.motion
    with pytest.raises(InputError, match="paste_back needs the background"):
        reenact_video(
            files["run"], files["source"], files["silent"], out, paste_back=True, background=False
        )


def test_reenact_video_with_a_student(files, tmp_path):
    out = tmp_path / "student.mp4"
    result = reenact_video(
        files["run"],
        files["source"],
        files["silent"],
        out,
        student=files["student"],
        avatar=2,
        background=False,
        progress=False,
    )
    assert probe_video(out).num_frames == FRAMES and result.size == (64, 64)
    assert "student avatar 2" in result.motion
    with pytest.raises(InputError, match="follows the driver's pose"):
        reenact_video(
            files["run"], files["source"], files["silent"], out, student=files["student"],
            avatar=0, yaw=10.0,
        )  # fmt: skip
    with pytest.raises(InputError, match="avatar 7 is not registered"):
        reenact_video(
            files["run"], files["source"], files["silent"], out, student=files["student"], avatar=7
        )


# --------------------------------------------------------------------------------------------
# Command line and benchmark


def test_cli_reenact_dispatches_by_family(files, tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    args = ["reenact", "--checkpoint", str(files["run"]), "--driving", str(files["silent"])]
    args += ["--out", str(out)]
    source = ["--source", str(files["source"])]
    assert main([*args, *source, "--motion", "absolute", "--max-frames", "2"]) == 0
    assert probe_video(out).num_frames == 2 and is_marked_synthetic(out)
    capsys.readouterr()
    assert main(args) == 2
    assert "--source IMAGE" in capsys.readouterr().err
    assert main([*args, *source, "--camera", "absolute", "--split", "train"]) == 2
    assert capsys.readouterr().err == (
        "error: --camera only apply to HeadGAN checkpoints; --split only apply to DNP portraits\n"
    )
    # A HeadGAN generator directory: MegaPortraits options are refused before anything loads.
    headgan = tmp_path / "headgan"
    headgan.mkdir()
    (headgan / "config.json").write_text(json.dumps({"model_class": "HeadGANGenerator"}))
    other = ["reenact", "--checkpoint", str(headgan), "--driving", "v.mp4", "--out", "o.mp4"]
    assert main([*other, "--yaw", "10", "--enhancer", "e"]) == 2
    assert capsys.readouterr().err == (
        "error: --yaw only apply to MegaPortraits checkpoints and EMOPortraits checkpoints; "
        "--enhancer only apply to MegaPortraits checkpoints\n"
    )
    other[2] = str(tmp_path / "dnp-run")
    assert main([*other, "--no-background"]) == 2
    assert "--no-background only apply to MegaPortraits checkpoints" in capsys.readouterr().err


def test_benchmark_times_the_base_model_per_driving_frame(files):
    base = MegaPortraitsBase.from_pretrained(files["run"] / "megaportraits").eval()
    torch.manual_seed(0)
    frame = MegaPortraitsFrame(base, torch.rand(1, 3, 64, 64))
    drivers = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        out = frame(driver=drivers)["image"]
        expected = base(frame.source_image.expand(2, -1, -1, -1), drivers)["image"]
    assert out.shape == (2, 3, 64, 64) and torch.allclose(out, expected, atol=1e-4)


def test_benchmark_builds_the_megaportraits_networks():
    net, inputs = _model_and_inputs("megaportraits-student", 64, 1, torch.device("cpu"))
    assert net.num_avatars == 100
    with torch.inference_mode():
        assert net(**inputs).shape == (1, 3, 64, 64)
    net, inputs = _model_and_inputs("megaportraits-enhancer", 32, 1, torch.device("cpu"))
    with torch.inference_mode():
        assert net(**inputs).shape == (1, 3, 64, 64)
    reference = PAPER_REFERENCE["megaportraits-student"][512]
    assert reference["fps"] == 130.0 and reference["precision"] == "fp16"
    row = {"model": "megaportraits-student", "resolution": 512, "device": "cpu",
           "precision": "fp32", "status": "ok", "ms_median": 400.0, "fps": 2.5,
           "peak_memory_mb": 900.0, "paper_ms_v100": None, "paper_reference": reference}  # fmt: skip
    table = format_results({"results": [row]})
    assert "megaportraits-student" in table and "7.7*" in table and "RTX 3090" in table
