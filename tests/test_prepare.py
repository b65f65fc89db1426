"""``neuralhead prepare`` end to end, on small videos made from scikit-image's public-domain
astronaut portrait: the dataset's files and metadata, tracking accuracy against a known
in-plane rotation, frames without a face, and one-line errors for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from neuralhead.data import format as dataset_format
from neuralhead.data.format import DatasetFiles
from neuralhead.data.prepare import PrepareOptions, prepare_video
from neuralhead.errors import InputError, NoFaceError
from neuralhead.media.video import VideoReader, VideoWriter
from neuralhead.tracking.mediapipe_backend import FaceMeshTracker
from neuralhead.tracking.template import load_template
from neuralhead.tracking.topology import RIGID

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:label\\(\\) is deprecated:DeprecationWarning"),
]

FPS = 25
SIZE = 256  # of the test videos
NUM_FRAMES = 30
FACE_CENTRE = (225.0, 125.0)  # in the 512x512 astronaut
# In-plane rotation (cv2's sign: counter-clockwise on screen) and shift of each frame.
ANGLES = 8.0 * np.sin(np.linspace(0, 2 * np.pi, NUM_FRAMES))
SHIFTS = np.stack(
    [10 * np.sin(np.linspace(0, np.pi, NUM_FRAMES)), np.linspace(-5, 5, NUM_FRAMES)], 1
)
BLANK = 120  # grey level of frames without a face


def warp(angle: float = 0.0, shift=(0.0, 0.0)) -> np.ndarray:
    """The 2x3 map from the astronaut to a frame: turn by ``angle`` degrees about the face
    (cv2's sign: counter-clockwise on screen), then centre the face and shift it."""
    matrix = cv2.getRotationMatrix2D(FACE_CENTRE, angle, 1.0)
    matrix[:, 2] += [SIZE / 2 + shift[0] - FACE_CENTRE[0], SIZE / 2 + shift[1] - FACE_CENTRE[1]]
    return matrix


def clip_frame(angle: float = 0.0, shift=(0.0, 0.0)) -> np.ndarray:
    """A SIZE x SIZE view of the astronaut's face, turned and shifted."""
    return cv2.warpAffine(
        skimage.data.astronaut(), warp(angle, shift), (SIZE, SIZE), borderMode=cv2.BORDER_REPLICATE
    )


def write_clip(
    path: Path,
    num_frames: int = NUM_FRAMES,
    moving: bool = True,
    blank: tuple[int, ...] = (),
    audio: bool = True,
) -> Path:
    wav = None
    if audio:
        t = np.arange(round(num_frames / FPS * 16000)) / 16000
        wav = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    with VideoWriter(path, FPS, audio=wav, audio_sample_rate=16000 if audio else None) as writer:
        for i in range(num_frames):
            if i in blank:
                writer.write(np.full((SIZE, SIZE, 3), BLANK, np.uint8))
            elif moving:
                writer.write(clip_frame(ANGLES[i % NUM_FRAMES], SHIFTS[i % NUM_FRAMES]))
            else:
                writer.write(clip_frame())
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prepare")


@pytest.fixture(scope="module")
def clip(workdir) -> Path:
    return write_clip(workdir / "talk.mp4")


@pytest.fixture(scope="module")
def dataset(clip, workdir) -> DatasetFiles:
    """The clip prepared at 128x128 with the default fixed crop; the only expression fit here."""
    return prepare_video(
        clip, workdir / "talk", PrepareOptions(size=128, num_expression=8), progress=False
    )


def fast_options(dataset: DatasetFiles, **kwargs) -> PrepareOptions:
    """Options that reuse ``dataset``'s expression basis and skip the masks, to save time."""
    kwargs.setdefault("size", 128)
    return PrepareOptions(expression_basis=str(dataset.root), write_masks=False, **kwargs)


def source_landmarks(files: DatasetFiles) -> np.ndarray:
    """The dataset's landmarks mapped back from crop pixels to the source video's pixels."""
    landmarks = files.array("landmarks", mmap=False).astype(np.float64)
    boxes = files.array("crop_boxes").astype(np.float64)
    factor = boxes[:, None, 2:3] / files.size
    out = landmarks * factor
    out[..., :2] += boxes[:, None, :2]
    return out


# ---------------------------------------------------------------------------------- dataset files
def test_dataset_has_every_documented_file(dataset):
    root, n = dataset.root, NUM_FRAMES
    documented = re.findall(
        r"^ {4}(\S+\.(?:npy|npz|json|wav))", dataset_format.__doc__, re.MULTILINE
    )
    assert len(documented) == 11
    for name in documented:
        assert (root / name).is_file(), name
    assert not list(root.glob(".*"))  # no temporary files left behind
    shapes = {
        "landmarks": (n, 478, 3), "canonical": (n, 478, 3), "pose": (n, 6), "expression": (n, 8),
        "gaze": (n, 2), "valid": (n,), "crop_boxes": (n, 3),
    }  # fmt: skip
    assert set(shapes) == set(dataset_format.ARRAYS)
    for name, shape in shapes.items():
        array = dataset.array(name)
        assert array.shape == shape, name
        assert np.all(np.isfinite(array)), name
    assert dataset.array("valid").dtype == bool and dataset.array("valid").all()
    assert dataset.array("crop_boxes").dtype == np.int64
    assert dataset.array("landmarks").dtype == np.float32
    windows = np.load(root / "audio_windows.npy")
    assert windows.shape == (n, 16, 29) and windows.dtype == np.float32
    basis = dataset.expression_basis()
    assert basis.num_components == 8 and basis.mean.shape == (468, 3)

    frames = sorted((root / "frames").glob("*.png"))
    masks = sorted((root / "masks").glob("*.png"))
    assert [p.name for p in frames] == [f"{i:06d}.png" for i in range(n)]
    assert [p.name for p in masks] == [p.name for p in frames]
    assert cv2.imread(str(frames[0])).shape == (128, 128, 3)
    mask = cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (128, 128) and mask.dtype == np.uint8
    assert mask[40:90, 40:90].mean() > 200  # the face is foreground

    with wave.open(str(root / "audio.wav")) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        assert wav.getnframes() / 16000 == pytest.approx(n / FPS, abs=0.05)
    # A steady 440 Hz tone: every window peaks in the same mel band.
    assert len(set(windows[:, 8].argmax(1))) == 1


def test_meta(dataset, clip):
    meta = json.loads((dataset.root / "meta.json").read_text())
    assert meta == dataset.meta
    assert (
        meta["format"] == dataset_format.FORMAT_NAME
        and meta["version"] == dataset_format.FORMAT_VERSION
    )
    assert meta["fps"] == FPS and dataset.fps == FPS
    assert meta["size"] == 128 and meta["num_frames"] == NUM_FRAMES
    assert meta["tracker"].startswith("mediapipe-0.10.21/")
    assert meta["source"] == {
        "path": str(clip.resolve()),
        "width": SIZE,
        "height": SIZE,
        "fps": FPS,
    }
    assert meta["faces"] == {"found": NUM_FRAMES, "missing": 0}
    heldout = round(0.1 * NUM_FRAMES)
    assert meta["split"] == {
        "heldout_fraction": 0.1,
        "num_train": NUM_FRAMES - heldout,
        "num_heldout": heldout,
    }
    assert dataset.split_range("train") == range(NUM_FRAMES - heldout)
    assert dataset.split_range("heldout") == range(NUM_FRAMES - heldout, NUM_FRAMES)
    assert meta["expression"]["num_components"] == 8
    assert (
        meta["expression"]["fitted_on"] == f"training frames with a face ({NUM_FRAMES - heldout})"
    )
    assert meta["crop"] == {"mode": "fixed", "scale": 2.0}
    assert meta["audio"]["sample_rate"] == 16000 and meta["audio"]["feature_dim"] == 29
    assert meta["frames_written"] and meta["masks_written"]


def test_landmarks_match_the_written_frames(dataset):
    landmarks = dataset.array("landmarks")
    assert np.all((landmarks[..., :2] > 0) & (landmarks[..., :2] < 128))
    with FaceMeshTracker(static=True) as tracker:
        for i in (0, 17):
            frame = cv2.imread(str(dataset.frame_path(i)))[:, :, ::-1].copy()
            found = tracker.process(frame)
            error = np.linalg.norm(found[:, :2] - landmarks[i, :, :2], axis=-1)
            assert np.median(error) < 1.5, f"frame {i}: median {np.median(error):.2f} px"


def test_parameters_are_consistent(dataset):
    canonical = dataset.array("canonical")
    template = load_template().vertices
    # The pose fit leaves the rigid points on the template.
    assert np.abs(canonical[:, list(RIGID)] - template[list(RIGID)]).mean() < 0.03
    # Coefficients of the training frames are centred, in units of the strongest mode.
    train = dataset.array("expression")[dataset.split_range("train")]
    basis = dataset.expression_basis()
    assert np.allclose(train.mean(0), 0.0, atol=1e-3)
    relative = (basis.stddev / basis.stddev[0]) ** 2
    assert np.allclose(train.var(0), relative, atol=1e-3) and train.var(0)[0] == pytest.approx(1.0, abs=1e-3)
    # A still face with open eyes looks about straight ahead.
    assert np.abs(np.degrees(dataset.array("gaze"))).max() < 15.0
    # The fixed crop is one box inside the frame, of twice the face's size.
    boxes = dataset.array("crop_boxes")
    assert np.all(boxes == boxes[0])
    x0, y0, side = boxes[0]
    assert 0 <= x0 and 0 <= y0 and x0 + side <= SIZE and y0 + side <= SIZE


def test_tracked_pose_follows_a_known_rotation(dataset):
    pose = dataset.array("pose", mmap=False).astype(np.float64)
    angles = np.degrees(pose[:, :3])
    # cv2 turns counter-clockwise for a positive angle; positive roll is clockwise on screen.
    roll_error = (angles[:, 2] - angles[0, 2]) + (ANGLES - ANGLES[0])
    assert np.abs(roll_error).max() < 2.5
    # An in-plane rotation leaves yaw and pitch alone, and the astronaut faces the camera.
    assert np.abs(angles[:, :2] - np.median(angles[:, :2], 0)).max() < 3.0
    assert np.abs(angles[:, 1]).max() < 5.0
    # tx, ty follow the head: they are where the template's origin (between the eyes and the
    # nose) is, as a fraction of the crop. That point is fixed on the astronaut: find it by least
    # squares through every frame's warp, then every frame must agree, in source pixels.
    x0, y0, side = dataset.array("crop_boxes")[0]
    origin = (pose[:, 3:5] + 1.0) / 2.0 * side + [x0, y0]
    warps = np.stack([warp(a, s) for a, s in zip(ANGLES, SHIFTS)])
    on_astronaut = np.linalg.lstsq(
        warps[:, :, :2].reshape(-1, 2), (origin - warps[:, :, 2]).reshape(-1), rcond=None
    )[0]
    expected = warps[:, :, :2] @ on_astronaut + warps[:, :, 2]
    assert np.abs(origin - expected).max() < 1.5


# ---------------------------------------------------------------------------------- options
@pytest.mark.parametrize("mode", ["track", "full"])
def test_crop_modes(dataset, clip, workdir, mode):
    size = 256 if mode == "full" else 128
    files = prepare_video(
        clip,
        workdir / f"crop-{mode}",
        fast_options(dataset, crop_mode=mode, size=size),
        progress=False,
    )
    assert files.meta["crop"]["mode"] == mode and files.meta["size"] == size
    assert cv2.imread(str(files.frame_path(NUM_FRAMES - 1))).shape == (size, size, 3)
    assert not (files.root / "masks").exists() and not files.meta["masks_written"]
    boxes = files.array("crop_boxes")
    if mode == "full":
        assert np.all(boxes == [0, 0, SIZE])
        # A full crop at the video's own size is the video itself.
        with VideoReader(clip) as reader:
            for i, frame in enumerate(reader):
                if i in (0, 11):
                    written = cv2.imread(str(files.frame_path(i)))[:, :, ::-1]
                    assert np.array_equal(written, frame)
    else:
        centre_x = boxes[:, 0] + boxes[:, 2] / 2
        assert np.ptp(centre_x) > 5  # follows the face's horizontal movement
        assert np.abs(np.diff(boxes, 2, axis=0)).max() <= 2
    # The crop changes the landmarks' frame of reference, nothing else.
    assert np.allclose(source_landmarks(files), source_landmarks(dataset), atol=0.02)
    assert np.allclose(files.array("pose")[:, :3], dataset.array("pose")[:, :3], atol=1e-4)
    assert np.allclose(files.array("canonical"), dataset.array("canonical"), atol=1e-4)
    assert np.allclose(files.array("gaze"), dataset.array("gaze"), atol=1e-4)


def test_reused_expression_basis(dataset, workdir, clip):
    files = prepare_video(
        clip, workdir / "reuse", fast_options(dataset, max_frames=12), progress=False
    )
    source = dataset.expression_basis()
    reused = files.expression_basis()
    for name in ("mean", "components", "stddev", "explained_variance_ratio"):
        assert np.array_equal(getattr(reused, name), getattr(source, name))
    assert reused.num_frames == source.num_frames
    fitted_on = files.meta["expression"]["fitted_on"]
    assert fitted_on == f"external: {(dataset.root / 'expression_basis.npz').resolve()}"
    assert files.num_frames == 12 and files.array("expression").shape == (12, 8)
    # The same frames in the same basis give the same coefficients.
    assert np.allclose(files.array("expression"), dataset.array("expression")[:12], atol=1e-2)
    # A basis given as the .npz itself works too; a missing one is an InputError.
    options = fast_options(dataset, max_frames=3, write_frames=False)
    options.expression_basis = str(dataset.root / "expression_basis.npz")
    prepare_video(clip, workdir / "reuse-npz", options, progress=False)
    options.expression_basis = str(workdir / "nowhere")
    with pytest.raises(InputError, match="expression basis .* not found"):
        prepare_video(clip, workdir / "reuse-missing", options, progress=False)
    # The bad basis is caught before any work: nothing is left behind, so a rerun just works.
    assert not (workdir / "reuse-missing").exists()
    options.expression_basis = str(dataset.root)
    assert prepare_video(clip, workdir / "reuse-missing", options, progress=False).num_frames == 3


def test_failed_prepare_leaves_nothing_behind(workdir, tmp_path):
    blank = tmp_path / "blank.mp4"
    with VideoWriter(blank, 25) as writer:
        for _ in range(6):
            writer.write(np.full((64, 64, 3), 128, np.uint8))
    out = workdir / "failed"
    with pytest.raises(NoFaceError):
        prepare_video(blank, out, PrepareOptions(size=64), progress=False)
    assert not out.exists()


def test_output_directory_is_not_overwritten_unless_asked(dataset, clip, workdir):
    out = workdir / "again"
    prepare_video(clip, out, fast_options(dataset, max_frames=10), progress=False)
    (out / "stale.txt").write_text("left from an earlier run")
    with pytest.raises(InputError, match="is not empty .*--overwrite"):
        prepare_video(clip, out, fast_options(dataset, max_frames=6), progress=False)
    assert DatasetFiles.open(out).num_frames == 10
    files = prepare_video(
        clip, out, fast_options(dataset, max_frames=6, overwrite=True), progress=False
    )
    assert files.num_frames == 6 and files.array("landmarks").shape == (6, 478, 3)
    assert not (out / "stale.txt").exists()
    assert len(list((out / "frames").glob("*.png"))) == 6
    # --overwrite replaces prepared datasets only, never some other directory.
    other = workdir / "documents"
    other.mkdir()
    (other / "thesis.tex").write_text("important")
    with pytest.raises(InputError, match="not a prepared dataset"):
        prepare_video(clip, other, fast_options(dataset, overwrite=True), progress=False)
    assert (other / "thesis.tex").read_text() == "important"


def test_bad_options_are_input_errors(clip, workdir):
    for options, message in [
        (PrepareOptions(size=100), "--size must be a multiple of 16"),
        (PrepareOptions(crop_mode="wide"), "--crop must be fixed, track or full"),
        (PrepareOptions(heldout_fraction=1.0), "--heldout must be in"),
        (PrepareOptions(num_expression=0), "--num-expression"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            prepare_video(clip, workdir / "bad-options", options, progress=False)
    with pytest.raises(InputError, match="video file not found: .*nope.mp4"):
        prepare_video(workdir / "nope.mp4", workdir / "bad-options", progress=False)
    assert not (workdir / "bad-options").exists()


# ---------------------------------------------------------------------------------- missing faces
def test_frames_without_a_face_are_flagged_and_interpolated(dataset, workdir):
    blank = (12, 13, 14)
    clip = write_clip(workdir / "gap.mp4", 24, moving=False, blank=blank)
    files = prepare_video(clip, workdir / "gap", fast_options(dataset), progress=False)
    valid = files.array("valid")
    assert np.array_equal(np.flatnonzero(~valid), blank)
    assert files.meta["faces"] == {"found": 21, "missing": 3}
    landmarks = files.array("landmarks", mmap=False)
    assert np.all(np.isfinite(landmarks))
    before, after = landmarks[11], landmarks[15]
    for i in blank:
        w = (i - 11) / 4
        assert np.allclose(landmarks[i], (1 - w) * before + w * after, atol=1e-4)
        assert np.all(landmarks[i] >= np.minimum(before, after) - 1e-4)
        assert np.all(landmarks[i] <= np.maximum(before, after) + 1e-4)
    for name in ("pose", "expression", "gaze", "canonical"):
        assert np.all(np.isfinite(files.array(name))), name


def test_gap_at_the_start_repeats_the_first_face(dataset, workdir):
    clip = write_clip(workdir / "late.mp4", 12, moving=False, blank=(0, 1), audio=False)
    files = prepare_video(
        clip, workdir / "late", fast_options(dataset, write_frames=False), progress=False
    )
    landmarks = files.array("landmarks")
    assert np.array_equal(files.array("valid"), [False, False] + [True] * 10)
    assert np.array_equal(landmarks[0], landmarks[2]) and np.array_equal(landmarks[1], landmarks[2])
    assert files.meta["audio"] is None and not (files.root / "audio.wav").exists()


def test_mostly_blank_clip_is_rejected(workdir):
    clip = write_clip(
        workdir / "mostly-blank.mp4", 20, moving=False, blank=tuple(range(6, 20)), audio=False
    )
    with pytest.raises(NoFaceError) as error:
        prepare_video(clip, workdir / "mostly-blank", progress=False)
    message = str(error.value)
    assert "no face found in 70% of the frames of mostly-blank.mp4" in message
    assert "50%" in message and "\n" not in message
    assert not (workdir / "mostly-blank" / "meta.json").exists()


def test_clip_without_a_face_is_rejected(workdir):
    clip = write_clip(workdir / "empty-room.mp4", 8, blank=tuple(range(8)), audio=False)
    with pytest.raises(NoFaceError, match="no face found in any of the 8 frames of empty-room.mp4"):
        prepare_video(clip, workdir / "empty-room", progress=False)


# ---------------------------------------------------------------------------------- command line
PROGRESS_BAR = re.compile(r"^(tracking|cropping): +\d+%\|")


def neuralhead_command() -> list[str]:
    script = Path(sys.executable).with_name("neuralhead")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "neuralhead"]


def stderr_lines(stderr: str) -> list[str]:
    """stderr's lines, less tqdm's progress bars (which it redraws with carriage returns)."""
    return [
        line
        for line in re.split(r"[\r\n]+", stderr)
        if line.strip() and not PROGRESS_BAR.match(line)
    ]


@pytest.fixture(scope="module")
def cli_runs(workdir, clip, dataset) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every command-line case, run side by side (each pays for importing torch and mediapipe)."""
    bad = workdir / "bad-input"
    bad.mkdir()
    (bad / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    data = clip.read_bytes()
    # The index is at the front (faststart), so decoding starts and stops at the cut.
    (bad / "cut.mp4").write_bytes(data[: len(data) * 2 // 3])
    cv2.imwrite(str(bad / "portrait.png"), clip_frame()[:, :, ::-1])
    write_clip(bad / "no-face.mp4", 10, blank=tuple(range(10)))
    cases = {
        "corrupt": [str(bad / "noise.mp4"), str(bad / "out-corrupt")],
        "truncated": [str(bad / "cut.mp4"), str(bad / "out-truncated")],
        "image": [str(bad / "portrait.png"), str(bad / "out-image")],
        "no-face": [str(bad / "no-face.mp4"), str(bad / "out-no-face")],
        "ok": [str(clip), str(bad / "out-ok"), "--size", "64", "--crop", "full", "--no-masks",
               "--max-frames", "5", "--expression-basis", str(dataset.root)],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(
            [*neuralhead_command(), "prepare", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[name] = (
            subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
            Path(cases[name][1]),
        )
    return results


@pytest.mark.parametrize(
    "case, message",
    [
        ("corrupt", r"could not open video .*noise\.mp4: not a readable media file \("),
        (
            "truncated",
            r"video .*cut\.mp4 is truncated or corrupt: decoding stopped after \d+ frames",
        ),
        ("image", r".*portrait\.png is an image, not a video$"),
        ("no-face", r"no face found in any of the 10 frames of no-face\.mp4$"),
    ],
)
def test_cli_bad_input_is_one_error_line(cli_runs, case, message):
    result, out = cli_runs[case]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1, result.stderr  # nothing else: no native logging, no warnings
    assert lines[0].startswith("error: ")
    assert re.match(message, lines[0][len("error: ") :]), lines[0]
    # The error is the last line and starts a line of its own (a progress bar is ended first).
    assert result.stderr.rstrip("\n").split("\n")[-1] == lines[0]
    assert result.stdout == ""
    assert not (out / "meta.json").exists()


def test_cli_prepares_a_dataset(cli_runs, dataset):
    result, out = cli_runs["ok"]
    assert result.returncode == 0, result.stderr
    assert stderr_lines(result.stderr) == []
    assert result.stdout.startswith("prepared 5 frames (0 without a face, interpolated) at 64x64")
    files = DatasetFiles.open(out)
    assert files.num_frames == 5 and files.size == 64
    assert files.meta["expression"]["fitted_on"].startswith("external: ")
    assert np.array_equal(
        files.expression_basis().components, dataset.expression_basis().components
    )
    assert cv2.imread(str(files.frame_path(4))).shape == (64, 64, 3)


def test_dataset_without_meta_is_not_a_dataset(tmp_path):
    with pytest.raises(InputError, match="not a prepared dataset"):
        DatasetFiles.open(tmp_path)
