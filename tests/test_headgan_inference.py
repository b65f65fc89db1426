"""HeadGAN inference: driving parameters, the reenactor, video reenactment, compression
(Sec. 3.4), editing and frontalisation (Sec. 4.3), their command lines, and the benchmark.

A tiny random generator (64 px) and a face model with random orthonormal bases are exported
with the trainer's own :func:`~neuralhead.headgan.trainer.export`, so the run layout the
inference reads is the one training writes. Tracking runs mediapipe on the public-domain
astronaut portrait and on a 5-frame video made from it.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from neuralhead.benchmark import PAPER_MS, _model_and_inputs, format_results
from neuralhead.cli import main
from neuralhead.errors import InputError, NoFaceError
from neuralhead.headgan.compression import (
    StreamHeader,
    decode,
    encode_video,
    face_model_hash,
    read_stream,
    write_stream,
)
from neuralhead.headgan.dataset import AudioStatistics
from neuralhead.headgan.driving import camera_to_crop, driving_parameters, track_video
from neuralhead.headgan.editing import edit_image, edit_parameters, edit_to_file
from neuralhead.headgan.face_model import MorphableModel, face_mesh_triangles
from neuralhead.headgan.fitting import fit_frames, project
from neuralhead.headgan.generator import create_generator
from neuralhead.headgan.reenact import (
    HeadGANReenactor,
    is_headgan_checkpoint,
    load_headgan_run,
    reenact_video,
)
from neuralhead.headgan.trainer import export
from neuralhead.inference.common import PasteBack
from neuralhead.media.video import (
    VideoReader,
    VideoWriter,
    is_marked_synthetic,
    probe_video,
)
from neuralhead.tracking.crop import landmarks_to_crop
from neuralhead.tracking.template import load_template

V = 468
SIZE = 64
K_ID, K_EXP = 3, 28
FRAMES = 5


def random_model(seed: int = 0) -> MorphableModel:
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(3 * V, K_ID + K_EXP, generator=generator, dtype=torch.float64)
    basis = torch.linalg.qr(raw)[0].T.float()
    return MorphableModel(
        mean=load_template().vertices[:V],
        identity_basis=basis[:K_ID].reshape(K_ID, V, 3),
        expression_basis=basis[K_ID:].reshape(K_EXP, V, 3),
        triangles=face_mesh_triangles(),
        identity_std=torch.full((K_ID,), 0.2),
        expression_std=0.05 + 0.1 * torch.rand(K_EXP, generator=generator),
    )


def make_run(root: Path, *, audio: bool, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    name = "headgan-tiny" if audio else "headgan-tiny-noaudio"
    generator = create_generator(name, image_size=SIZE, base_channels=4, spade_hidden_channels=8)
    stats = None
    if audio:
        rng = np.random.default_rng(seed)
        stats = AudioStatistics.from_features(rng.standard_normal((20, 300)))
    export(root / "headgan", generator, random_model(seed), stats)
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("headgan_inference")
    portrait = skimage.data.astronaut()
    image = cv2.resize(portrait, (256, 256), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(root / "source.png"), image[:, :, ::-1])
    cv2.imwrite(str(root / "blank.png"), np.full((96, 96, 3), 128, np.uint8))
    face = portrait[0:320, 80:400]
    speech = (0.2 * np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000)).astype(np.float32)
    grey = np.full((128, 128, 3), 128, np.uint8)
    videos = {"driving.mp4": (speech, ()), "silent.mp4": (None, ()), "gap.mp4": (None, (2,))}
    videos["empty.mp4"] = (None, tuple(range(FRAMES)))
    for name, (sound, faceless) in videos.items():
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
                frame = cv2.resize(frame, (128, 128), interpolation=cv2.INTER_AREA)
                writer.write(grey if i in faceless else frame)
    return {
        "root": root,
        "source": root / "source.png",
        "blank": root / "blank.png",
        "driving": root / "driving.mp4",
        "silent": root / "silent.mp4",
        "gap": root / "gap.mp4",
        "empty": root / "empty.mp4",
        "run": make_run(root / "run", audio=True),
        "run_noaudio": make_run(root / "run_noaudio", audio=False, seed=1),
    }


# --------------------------------------------------------------------------------------------
# Driving parameters (no tracking)


def test_camera_to_crop_equals_fitting_the_crop():
    model = random_model()
    torch.manual_seed(0)
    expression = 0.5 * torch.randn(2, K_EXP) * model.expression_std
    camera = torch.tensor(
        [[0.2, 0.1, -0.3, 0.05, -0.1, 0.2, 0.01], [0.25, -0.1, 0.2, 0.0, 0.1, 0.0, 0.0]]
    )
    canvas = 300  # a 300 x 200 frame
    landmarks = project(model.shape(None, expression), camera, canvas).numpy()
    box = np.array([60, 10, 150])
    in_canvas = fit_frames(model, landmarks, canvas).camera.numpy()
    in_crop = fit_frames(model, landmarks_to_crop(landmarks, box, SIZE), SIZE).camera.numpy()
    np.testing.assert_allclose(camera_to_crop(in_canvas, box, canvas), in_crop, atol=1e-4)
    # By hand: scale x2 (300 / 150), the canvas centre (150, 150) lands at crop (90, 140) px.
    origin = camera_to_crop(np.array([[1.0, 0, 0, 0, 0, 0, 0]]), box, canvas)[0]
    np.testing.assert_allclose(origin, [2.0, 0, 0, 0, 90 / 75 - 1, 140 / 75 - 1, 0], atol=1e-12)
    with pytest.raises(InputError, match="box"):
        camera_to_crop(in_canvas, np.array([0, 0]), canvas)


def test_driving_parameters_keep_expression_and_move_camera_to_reference():
    expression = np.random.default_rng(0).standard_normal((4, K_EXP)).astype(np.float32)
    driver = np.tile(np.array([0.5, 0.1, 0.2, 0.0, 0.3, -0.2, 0.0], np.float32), (4, 1))
    driver[:, 2] += np.linspace(0, 0.3, 4)  # the driver turns its head
    driver[3, 0] = 0.6
    reference = np.array([0.8, 0.0, -0.1, 0.05, -0.1, 0.1, 0.0], np.float32)
    for mode in ("relative", "absolute"):
        params = driving_parameters(expression, driver, reference, mode=mode, momentum=1.0)
        np.testing.assert_array_equal(params.expression.numpy(), expression)
        # Frame 0 sits exactly on the reference's scale and position; size changes carry over.
        np.testing.assert_allclose(
            params.camera[0, [0, 4, 5, 6]], reference[[0, 4, 5, 6]], atol=1e-6
        )
        assert params.camera[3, 0] == pytest.approx(0.8 * 0.6 / 0.5, rel=1e-5)
    relative = driving_parameters(expression, driver, reference, mode="relative")
    absolute = driving_parameters(expression, driver, reference, mode="absolute")
    np.testing.assert_allclose(relative.camera[0, 1:4], reference[1:4], atol=1e-5)
    np.testing.assert_allclose(absolute.camera[:, 1:4], driver[:, 1:4], atol=1e-5)
    with pytest.raises(InputError, match="relative' or 'absolute"):
        driving_parameters(expression, driver, reference, mode="sideways")


def test_track_video_fills_frames_without_a_face(files):
    model = random_model()
    tracked = track_video(files["gap"], model, chunk_frames=2, progress=False)
    assert len(tracked) == FRAMES and tracked.valid.tolist() == [True, True, False, True, True]
    assert (tracked.width, tracked.height, tracked.canvas_size, tracked.fps) == (
        128,
        128,
        128,
        25.0,
    )
    assert tracked.identity.shape == (FRAMES, K_ID) and tracked.expression.shape == (FRAMES, K_EXP)
    for values in (tracked.camera, tracked.expression, tracked.centre, tracked.size):
        np.testing.assert_allclose(values[2], (values[1] + values[3]) / 2, rtol=1e-5, atol=1e-6)
    assert 0.2 < tracked.camera[0, 0] < 1.0  # the face spans a good part of the frame
    boxes = tracked.crop_boxes("track")
    assert boxes.shape == (FRAMES, 3) and (boxes[:, 2] > 0).all()
    with pytest.raises(NoFaceError, match="no face found in any of the 5 frames of empty.mp4"):
        track_video(files["empty"], model, progress=False)


# --------------------------------------------------------------------------------------------
# The reenactor (no tracking)


def test_frames_stack_previous_renders_and_stream_in_chunks(files):
    reenactor = HeadGANReenactor.from_checkpoint(files["run_noaudio"])
    model = reenactor.face_model
    crop = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    camera = torch.tensor([0.45, 0.0, 0.0, 0.0, 0.0, 0.05, 0.0])
    reenactor.source_from_parameters(crop, torch.zeros(K_ID), torch.zeros(K_EXP), camera)
    torch.manual_seed(1)
    expressions = torch.randn(5, K_EXP) * model.expression_std * 2
    cameras = camera.repeat(5, 1)
    cameras[:, 2] = torch.linspace(-0.3, 0.3, 5)
    seen = []
    hook = reenactor.generator.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    whole = reenactor.frames(expressions, cameras)
    reenactor.reset()
    parts = torch.cat(
        [
            reenactor.frames(expressions[:3], cameras[:3]),
            reenactor.frames(expressions[3:], cameras[3:]),
        ]
    )
    hook.remove()
    assert whole.shape == (5, 3, SIZE, SIZE) and 0 <= whole.min() and whole.max() <= 1
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=0)
    driving, renders = seen[0], reenactor.render(expressions, cameras)
    assert driving.shape == (5, 9, SIZE, SIZE)
    # Channels hold frames t-2, t-1, t; the first frame's missing predecessors repeat it.
    torch.testing.assert_close(driving[:, 6:], renders)
    torch.testing.assert_close(driving[1:, 3:6], renders[:-1])
    torch.testing.assert_close(driving[2:, :3], renders[:-2])
    torch.testing.assert_close(driving[0, :3], renders[0])
    torch.testing.assert_close(seen[2][0, 3:6], renders[2])  # the second chunk remembers
    assert renders[0].sum() > 0 and not torch.equal(renders[0], renders[4])
    with pytest.raises(InputError, match="trained without audio"):
        reenactor.frames(expressions, cameras, np.zeros((5, 300), np.float32))
    with pytest.raises(InputError, match=r"expression must have shape \(T, 28\)"):
        reenactor.frames(expressions[:, :5], cameras)


def test_audio_models_standardise_like_training(files):
    reenactor = HeadGANReenactor.from_checkpoint(files["run"])
    stats = reenactor.audio_stats
    short = np.random.default_rng(1).standard_normal((10, 300)).astype(np.float32)
    np.testing.assert_allclose(
        reenactor.standardise_audio(short), stats.standardize(short), atol=1e-6
    )
    long = 3.0 + 2.0 * np.random.default_rng(2).standard_normal((60, 300)).astype(np.float32)
    own = reenactor.standardise_audio(long)  # a clip long enough: its own statistics
    np.testing.assert_allclose(own.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(own.std(0), 1.0, atol=1e-3)
    crop = np.zeros((SIZE, SIZE, 3), np.uint8)
    reenactor.source_from_parameters(
        crop, torch.zeros(K_ID), torch.zeros(K_EXP), [0.4, 0, 0, 0, 0, 0, 0]
    )
    with pytest.raises(InputError, match="uses audio"):
        reenactor.frames(torch.zeros(1, K_EXP), torch.tensor([[0.4, 0, 0, 0, 0, 0, 0.0]]))


def test_paste_back_blends_inside_the_box_only():
    image = np.full((40, 50, 3), 10, np.uint8)
    crop = np.full((16, 16, 3), 250, np.uint8)
    pasted = PasteBack(image, np.array([30, -8, 32]), feather=0.25)(crop)  # partly outside
    assert pasted.shape == image.shape
    assert (pasted[:, :30] == 10).all() and (pasted[24:] == 10).all()  # outside the box
    assert (pasted[8, 46] == 250).all()  # well inside: the crop
    assert 10 < pasted[1, 31, 0] < 250  # near the box's edge: feathered
    assert (image == 10).all()
    with pytest.raises(InputError, match="does not overlap"):
        PasteBack(image, np.array([60, 0, 10]))


# --------------------------------------------------------------------------------------------
# Compression (Sec. 3.4)


def make_header(num_frames: int, precision: str = "float16") -> StreamHeader:
    rng = np.random.default_rng(0)
    return StreamHeader(
        fps=25.0,
        num_frames=num_frames,
        image_size=SIZE,
        face_model_sha256=face_model_hash(random_model()),
        reference_frame=2,
        reference_identity=rng.standard_normal(K_ID).astype(np.float32),
        reference_expression=rng.standard_normal(K_EXP).astype(np.float32),
        reference_camera=rng.standard_normal(7).astype(np.float32),
        reference_png=b"\x89PNG fake",
        precision=precision,
    )


@pytest.mark.parametrize("precision, bytes_per_value", [("float16", 2), ("float32", 4)])
def test_stream_round_trip_and_bitrate(tmp_path, precision, bytes_per_value):
    header = make_header(6, precision)
    rng = np.random.default_rng(1)
    values = np.concatenate([0.05 * rng.standard_normal((6, 28)), rng.uniform(-1, 1, (6, 7))], 1)
    values = values.astype(np.float32)
    size = write_stream(tmp_path / "s.nhc", header, values)
    assert size == (tmp_path / "s.nhc").stat().st_size == header.size + 6 * 35 * bytes_per_value
    assert header.size == 68 + 4 * (K_ID + 35) + len(header.reference_png)
    assert header.bytes_per_second == 35 * bytes_per_value * 25.0
    stream = read_stream(tmp_path / "s.nhc")
    read = stream.header
    for name in (
        "fps",
        "num_frames",
        "image_size",
        "face_model_sha256",
        "reference_frame",
        "reference_png",
        "precision",
    ):
        assert getattr(read, name) == getattr(header, name)
    np.testing.assert_array_equal(read.reference_camera, header.reference_camera)
    np.testing.assert_array_equal(read.reference_identity, header.reference_identity)
    tolerance = 2.0**-11 if precision == "float16" else 0.0
    np.testing.assert_allclose(stream.values, values, rtol=tolerance, atol=1e-7 if tolerance else 0)
    assert stream.expression.shape == (6, 28) and stream.camera.shape == (6, 7)
    data = (tmp_path / "s.nhc").read_bytes()
    (tmp_path / "cut.nhc").write_bytes(data[:-3])
    with pytest.raises(InputError, match="truncated"):
        read_stream(tmp_path / "cut.nhc")
    (tmp_path / "bad.nhc").write_bytes(b"RIFF" + data[4:])
    with pytest.raises(InputError, match="not a HeadGAN stream"):
        read_stream(tmp_path / "bad.nhc")
    with pytest.raises(InputError, match="shape"):
        write_stream(tmp_path / "x.nhc", header, values[:, :30])


def test_face_model_hash_tells_models_apart(tmp_path):
    model = random_model()
    model.save(tmp_path / "m.npz")
    assert face_model_hash(MorphableModel.load(tmp_path / "m.npz")) == face_model_hash(model)
    assert face_model_hash(random_model(seed=1)) != face_model_hash(model)


def test_encode_then_decode_video(files, tmp_path):
    result = encode_video(
        files["driving"], files["run"], tmp_path / "clip.nhc", image_size=SIZE, progress=False
    )
    stream = read_stream(result.path)
    header = stream.header
    assert result.num_frames == header.num_frames == FRAMES and header.fps == 25.0
    assert stream.values.shape == (FRAMES, 35) and np.isfinite(stream.values).all()
    assert header.face_model_sha256 == face_model_hash(load_headgan_run(files["run"]).face_model)
    np.testing.assert_allclose(header.reference_camera, stream.camera[0], atol=1e-3)
    assert (
        result.bytes_per_second == 35 * 2 * 25.0
        and result.stream_bytes == result.path.stat().st_size
    )
    assert result.video_bytes == files["driving"].stat().st_size
    assert result.video_bytes_per_second == pytest.approx(
        result.video_bytes / (FRAMES / 25.0), rel=0.05
    )
    reference = cv2.imdecode(np.frombuffer(header.reference_png, np.uint8), cv2.IMREAD_COLOR)
    assert reference.shape == (SIZE, SIZE, 3)

    decoded = decode(
        result.path,
        None,
        files["run"],
        tmp_path / "clip.mp4",
        audio=files["driving"],
        progress=False,
    )
    info = probe_video(decoded.path)
    assert decoded.num_frames == info.num_frames == FRAMES and info.has_audio
    assert (info.width, info.height) == (SIZE, SIZE) and is_marked_synthetic(decoded.path)
    # Another image of the person as the reference: the cameras move onto its crop.
    other = decode(
        result.path, files["source"], files["run"], tmp_path / "o.mp4", audio=files["driving"],
        progress=False,
    )  # fmt: skip
    assert probe_video(other.path).num_frames == FRAMES
    with pytest.raises(InputError, match="carries none: pass --audio"):
        decode(result.path, None, files["run"], tmp_path / "x.mp4", progress=False)
    with pytest.raises(InputError, match="another face model"):
        decode(result.path, None, files["run_noaudio"], tmp_path / "x.mp4", progress=False)


# --------------------------------------------------------------------------------------------
# Editing (Sec. 4.3)


def test_edit_parameters_change_exactly_what_is_asked():
    expression = torch.linspace(-0.1, 0.1, K_EXP)
    camera = torch.tensor([0.5, 0.1, -0.2, 0.05, 0.1, -0.1, 0.0])
    std = torch.linspace(0.1, 0.4, K_EXP)
    new_expression, new_camera = edit_parameters(
        expression, camera, std, expression_deltas={0: 2.0, 5: -1.5}, yaw=10.0, roll=-4.0
    )
    changed = (new_expression != expression).nonzero().flatten().tolist()
    assert changed == [0, 5]
    assert new_expression[0] == pytest.approx(float(expression[0] + 2.0 * std[0]))
    assert new_expression[5] == pytest.approx(float(expression[5] - 1.5 * std[5]))
    expected = camera.clone()
    expected[2] += math.radians(10.0)
    expected[3] -= math.radians(4.0)
    torch.testing.assert_close(new_camera, expected)
    _, frontal = edit_parameters(expression, camera, std, frontalise=True)
    assert frontal[1:4].abs().max() == 0 and torch.equal(
        frontal[[0, 4, 5, 6]], camera[[0, 4, 5, 6]]
    )
    _, turned = edit_parameters(expression, camera, std, frontalise=True, pitch=-5.0)
    torch.testing.assert_close(turned[1:4], torch.tensor([math.radians(-5.0), 0.0, 0.0]))
    with pytest.raises(InputError, match="component 28 does not exist"):
        edit_parameters(expression, camera, std, expression_deltas={28: 1.0})


def test_edit_image_and_files(files, tmp_path):
    reenactor = HeadGANReenactor.from_checkpoint(files["run"])
    edited = edit_image(reenactor, files["source"], expression_deltas={0: 3.0}, frontalise=True)
    assert edited.shape == (SIZE, SIZE, 3) and edited.dtype == np.uint8
    source = reenactor.source
    assert source.render.sum() > 0 and source.box[2] > 0
    pasted = edit_image(reenactor, files["source"], yaw=15.0, paste_back=True)
    assert pasted.shape == (256, 256, 3)

    path = edit_to_file(
        files["run"], files["source"], tmp_path / "e.png", expression_deltas={1: -2.0}
    )
    with Image.open(path) as image:
        assert image.size == (SIZE, SIZE) and image.text["synthetic_media"] == "true"
        assert image.text["Comment"].startswith("Synthetic media generated by neuralhead")
    strip = edit_to_file(
        reenactor, files["source"], tmp_path / "s.png", sweep_target="yaw", sweep_steps=3
    )
    with Image.open(strip) as image:
        assert image.size == (3 * SIZE, SIZE)
    video = edit_to_file(
        reenactor, files["source"], tmp_path / "s.mp4", sweep_target=2, sweep_steps=4
    )
    assert probe_video(video).num_frames == 4 and is_marked_synthetic(video)
    with pytest.raises(InputError, match="should end in .png"):
        edit_to_file(reenactor, files["source"], tmp_path / "e.jpg")


# --------------------------------------------------------------------------------------------
# Video reenactment and bad inputs


def test_reenact_video_writes_a_marked_video_with_sound(files, tmp_path):
    result = reenact_video(
        files["run"], files["source"], files["driving"], tmp_path / "out.mp4", progress=False
    )
    info = probe_video(result.path)
    assert result.num_frames == info.num_frames == FRAMES and result.fps == 25.0
    assert info.has_audio and result.has_audio and is_marked_synthetic(result.path)
    assert (info.width, info.height) == (SIZE, SIZE)

    wide = reenact_video(
        files["run_noaudio"],
        files["source"],
        files["silent"],
        tmp_path / "wide.mp4",
        camera="absolute",
        paste_back=True,
        side_by_side=True,
        progress=False,
    )
    info = probe_video(wide.path)
    assert (info.width, info.height) == (512, 256) and not info.has_audio
    with VideoReader(wide.path) as reader:
        assert sum(1 for _ in reader) == FRAMES


def test_bad_inputs_are_explained(files, tmp_path):
    with pytest.raises(NoFaceError, match="no face found in the source image blank.png"):
        HeadGANReenactor.from_checkpoint(files["run"]).prepare_source(files["blank"])
    with pytest.raises(InputError, match="has no sound: pass --audio"):
        reenact_video(
            files["run"], files["source"], files["silent"], tmp_path / "o.mp4", progress=False
        )
    with pytest.raises(InputError, match="checkpoint .* does not exist"):
        load_headgan_run(tmp_path / "missing")
    with pytest.raises(InputError, match="is not a HeadGAN checkpoint"):
        load_headgan_run(files["root"])
    broken = tmp_path / "broken"
    make_run(broken, audio=True)
    (broken / "headgan" / "audio_stats.npz").unlink()
    with pytest.raises(InputError, match="has no audio_stats.npz"):
        load_headgan_run(broken)
    (broken / "headgan" / "face_model.npz").unlink()
    with pytest.raises(InputError, match="has no face_model.npz"):
        load_headgan_run(broken)
    assert is_headgan_checkpoint(files["run"]) and is_headgan_checkpoint(files["run"] / "headgan")
    assert not is_headgan_checkpoint(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# Command line and benchmark


def test_command_line(files, tmp_path, capsys):
    run, source = str(files["run"]), str(files["source"])
    assert (
        main(["compress", str(files["driving"]), str(tmp_path / "c.nhc"), "--checkpoint", run]) == 0
    )
    assert "1750 bytes/s (14.0 kbit/s)" in capsys.readouterr().out
    assert read_stream(tmp_path / "c.nhc").header.image_size == SIZE
    args = ["decompress", str(tmp_path / "c.nhc"), str(tmp_path / "d.mp4"), "--checkpoint", run]
    assert main([*args, "--audio", str(files["driving"])]) == 0
    assert probe_video(tmp_path / "d.mp4").num_frames == FRAMES
    args = ["edit", source, str(tmp_path / "e.png"), "--checkpoint", run, "--expression", "0=1.5"]
    assert main([*args, "--yaw", "10", "--frontalise"]) == 0
    assert (tmp_path / "e.png").is_file()
    reenact = [
        "reenact",
        "--checkpoint",
        run,
        "--driving",
        str(files["driving"]),
        "--out",
        str(tmp_path / "r.mp4"),
    ]
    assert main([*reenact, "--source", source, "--camera", "absolute"]) == 0
    assert probe_video(tmp_path / "r.mp4").num_frames == FRAMES
    capsys.readouterr()
    assert main(reenact) == 2
    assert "--source IMAGE" in capsys.readouterr().err
    assert main([*reenact, "--source", source, "--motion", "absolute"]) == 2
    assert "--motion only apply to DNP portraits" in capsys.readouterr().err


def test_benchmark_builds_the_paper_generator():
    net, inputs = _model_and_inputs("headgan", 32, 1, torch.device("cpu"))
    assert sum(p.numel() for p in net.parameters()) == 51_749_158
    with torch.inference_mode():
        assert net(**inputs)["image"].shape == (1, 3, 32, 32)
    assert PAPER_MS["headgan"][256] == 41.0
    row = {"model": "headgan", "resolution": 256, "device": "cpu", "precision": "fp32", "status": "ok",
           "ms_median": 900.0, "fps": 1.1, "peak_memory_mb": 300.0, "paper_ms_v100": 41.0}  # fmt: skip
    assert "headgan" in format_results({"results": [row]})
