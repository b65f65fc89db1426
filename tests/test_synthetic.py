"""The synthetic talking-portrait clip: trajectories, the rig, rendering, and the tracker's view.

The tracker tests run mediapipe on rendered frames, so they check what the demo relies on:
that the clip is trackable and that tracked pose and expression follow the ground truth.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralhead.data.synthetic import (
    AUDIO_SAMPLE_RATE,
    EXPRESSION_NAMES,
    SyntheticPortrait,
    Trajectory,
    default_portrait,
    scripted_trajectory,
    synthesize_clip,
    synthetic_speech,
)
from neuralhead.errors import NoFaceError
from neuralhead.geometry.rotation import matrix_to_euler
from neuralhead.media import VideoReader, is_marked_synthetic, load_audio, probe_video
from neuralhead.tracking import topology as T
from neuralhead.tracking.gaze import gaze_angles
from neuralhead.tracking.mediapipe_backend import FaceMeshTracker
from neuralhead.tracking.pose import fit_head_pose

SIZE = 256


@pytest.fixture(scope="module")
def portrait() -> SyntheticPortrait:
    return default_portrait(SIZE)


@pytest.fixture(scope="module")
def tracker():
    with FaceMeshTracker(static=True) as t:
        yield t


def single_frame(**controls: object) -> Trajectory:
    """A one-frame trajectory: the neutral frame with the given fields set."""
    traj = Trajectory.neutral(1)
    for name, value in controls.items():
        getattr(traj, name)[0] = value
    return traj


# --- trajectories -----------------------------------------------------------------------------


def test_trajectory_shapes_ranges_and_determinism() -> None:
    n = 500
    traj = scripted_trajectory(n, fps=25.0, seed=0)
    assert len(traj) == n and traj.fps == 25.0
    assert traj.pose.shape == (n, 3) and traj.translation.shape == (n, 2)
    assert traj.gaze.shape == (n, 2) and traj.scale.shape == (n,)
    assert traj.expression().shape == (n, len(EXPRESSION_NAMES))
    for name in ("pose", "translation", "scale", "gaze", *EXPRESSION_NAMES):
        assert getattr(traj, name).dtype == np.float32

    pitch, yaw, roll = np.abs(np.degrees(traj.pose)).max(0)
    assert 8 < yaw <= 20 and 5 < pitch <= 12 and 2 < roll <= 8
    assert np.abs(traj.translation).max() <= 0.03 and np.abs(traj.scale - 1).max() <= 0.04
    for name in ("jaw_open", "smile", "blink_left", "blink_right"):
        values = getattr(traj, name)
        assert values.min() >= 0 and values.max() <= 1
    assert traj.brow_raise.min() >= -1 and traj.brow_raise.max() <= 1
    # Speech with pauses, blinks that close the eyes, expressions that come and go.
    assert traj.jaw_open.max() > 0.8 and (traj.jaw_open < 0.01).mean() > 0.1
    assert traj.blink_left.max() > 0.99 and (traj.blink_left > 0.5).mean() < 0.1
    assert traj.smile.max() > 0.3 and traj.brow_raise.max() > 0.3
    assert np.degrees(np.abs(traj.gaze)).max() > 8
    # Smooth head motion: no jumps of more than a degree between frames.
    assert np.degrees(np.abs(np.diff(traj.pose, axis=0))).max() < 1.0

    again = scripted_trajectory(n, fps=25.0, seed=0)
    for name in ("pose", "translation", "scale", "gaze", *EXPRESSION_NAMES):
        np.testing.assert_array_equal(getattr(traj, name), getattr(again, name))
    # A shorter clip of the same seed is the beginning of the longer one.
    short = scripted_trajectory(200, fps=25.0, seed=0)
    np.testing.assert_array_equal(short.expression(), traj.expression()[:200])
    np.testing.assert_array_equal(short.gaze, traj.gaze[:200])


def test_different_seeds_give_different_trajectories() -> None:
    a = scripted_trajectory(400, seed=0)
    b = scripted_trajectory(400, seed=1)
    assert np.degrees(np.abs(a.pose - b.pose)).mean() > 3.0
    assert np.abs(np.corrcoef(a.pose[:, 1], b.pose[:, 1])[0, 1]) < 0.9
    assert np.abs(a.jaw_open - b.jaw_open).mean() > 0.1
    assert not np.array_equal(a.blink_left, b.blink_left)


def test_amplitude_zero_is_the_still_portrait_that_blinks() -> None:
    traj = scripted_trajectory(200, seed=3, amplitude=0.0)
    assert np.all(traj.pose == 0) and np.all(traj.jaw_open == 0) and np.all(traj.scale == 1)
    assert traj.blink_left.max() > 0.99


def test_trajectory_save_load_round_trip(tmp_path: Path) -> None:
    traj = scripted_trajectory(50, fps=30.0, seed=2)
    traj.save(tmp_path / "t.npz")
    loaded = Trajectory.load(tmp_path / "t.npz")
    assert loaded.fps == 30.0
    for name in ("pose", "translation", "scale", "gaze", *EXPRESSION_NAMES):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(traj, name))


def test_trajectory_rejects_bad_shapes() -> None:
    traj = Trajectory.neutral(4)
    with pytest.raises(ValueError, match="jaw_open"):
        dataclasses.replace(traj, jaw_open=np.zeros(3))
    with pytest.raises(ValueError, match="pose"):
        dataclasses.replace(traj, pose=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="fps"):
        dataclasses.replace(traj, fps=0.0)
    with pytest.raises(ValueError, match="num_frames"):
        scripted_trajectory(0)


# --- the rig ------------------------------------------------------------------------------------


def test_neutral_landmarks_are_the_source_landmarks(portrait: SyntheticPortrait) -> None:
    np.testing.assert_allclose(
        portrait.landmarks(Trajectory.neutral(1), 0), portrait.source_landmarks, atol=1e-3
    )


def test_controls_move_the_landmarks_where_asked(portrait: SyntheticPortrait) -> None:
    rest = portrait.landmarks(Trajectory.neutral(1), 0)

    def moved(**controls: object) -> np.ndarray:
        return portrait.landmarks(single_frame(**controls), 0)

    def lip_gap(lm: np.ndarray) -> float:
        return float(lm[T.LIPS_INNER_LOWER[5], 1] - lm[T.LIPS_INNER_UPPER[5], 1])

    def eye_height(lm: np.ndarray, upper: tuple[int, ...], lower: tuple[int, ...]) -> float:
        return float(lm[lower[4], 1] - lm[upper[4], 1])

    open_mouth = moved(jaw_open=1.0)
    assert lip_gap(open_mouth) > lip_gap(rest) + 8  # pixels at 256
    assert open_mouth[T.CHIN, 1] > rest[T.CHIN, 1] + 5
    np.testing.assert_allclose(open_mouth[list(T.RIGID[:15])], rest[list(T.RIGID[:15])], atol=0.5)

    smile = moved(smile=1.0)
    corners = list(T.MOUTH_CORNERS)
    assert np.ptp(smile[corners, 0]) > np.ptp(rest[corners, 0]) + 4
    assert smile[list(T.MOUTH_CORNERS), 1].mean() < rest[list(T.MOUTH_CORNERS), 1].mean() - 2

    blink = moved(blink_left=1.0)
    assert eye_height(blink, T.LEFT_EYE_UPPER, T.LEFT_EYE_LOWER) == pytest.approx(0, abs=0.1)
    assert eye_height(blink, T.RIGHT_EYE_UPPER, T.RIGHT_EYE_LOWER) == pytest.approx(
        eye_height(rest, T.RIGHT_EYE_UPPER, T.RIGHT_EYE_LOWER)
    )

    raised = moved(brow_raise=1.0)
    brows = list(T.LEFT_EYEBROW + T.RIGHT_EYEBROW)
    assert (raised[brows, 1] < rest[brows, 1] - 3).all()
    frown = moved(brow_raise=-1.0)
    assert (frown[brows, 1] > rest[brows, 1]).all()

    # Gaze moves the irises so that the tracking code's gaze estimate reads it back.
    gaze = np.radians([15.0, -10.0]).astype(np.float32)
    looking = moved(gaze=gaze)
    fit = fit_head_pose(np.stack([rest, looking]))
    measured = gaze_angles(fit.canonicalize(np.stack([rest, looking])))
    np.testing.assert_allclose(measured[1] - measured[0], gaze, atol=np.radians(1.0))
    assert looking[T.LEFT_IRIS_CENTER, 0] < rest[T.LEFT_IRIS_CENTER, 0]  # towards image left


def test_pose_rotates_the_landmarks(portrait: SyntheticPortrait) -> None:
    angles = np.radians([6.0, -15.0, 4.0])
    lm = portrait.landmarks(single_frame(pose=angles), 0)
    rest = portrait.landmarks(Trajectory.neutral(1), 0)
    fit = fit_head_pose(np.stack([rest, lm]))
    relative = fit.rotation[1] @ fit.rotation[0].T
    recovered = matrix_to_euler(torch.from_numpy(relative).double()).numpy()
    np.testing.assert_allclose(recovered, angles, atol=np.radians(0.5))


# --- rendering ----------------------------------------------------------------------------------


def test_render_shape_and_neutral_frame_is_the_source(portrait: SyntheticPortrait) -> None:
    frame = portrait.render(Trajectory.neutral(1), 0)
    assert frame.shape == (SIZE, SIZE, 3) and frame.dtype == np.uint8
    diff = np.abs(frame.astype(np.float32) - portrait.source.astype(np.float32))
    assert diff.mean() < 0.5 and np.quantile(diff, 0.99) < 4


def test_expressions_leave_the_background_alone(portrait: SyntheticPortrait) -> None:
    rest = portrait.render(Trajectory.neutral(1), 0).astype(np.float32)
    traj = single_frame(jaw_open=1.0, smile=1.0, brow_raise=1.0, blink_left=1.0)
    diff = np.abs(portrait.render(traj, 0).astype(np.float32) - rest).max(-1)
    assert diff.max() > 100  # the mouth opened
    face = portrait.source_landmarks[: T.NUM_MESH]
    (left, top), (right, chin) = face[:, :2].min(0).astype(int), face[:, :2].max(0).astype(int)
    # Above the head and beside it (the neck and collar below the chin may follow the jaw).
    assert diff[: top - 20].max() <= 8
    assert diff[: chin - 20, : left - 20].max() <= 8
    assert diff[: chin - 20, right + 20 :].max() <= 8


def test_consecutive_frames_change_smoothly(portrait: SyntheticPortrait) -> None:
    traj = scripted_trajectory(60, seed=0)
    frames = np.stack([portrait.render(traj, i) for i in range(40, 44)]).astype(np.float32)
    steps = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    assert steps.max() < 6


def test_portrait_rejects_an_image_without_a_face() -> None:
    with pytest.raises(NoFaceError):
        SyntheticPortrait(np.full((200, 200, 3), 128, np.uint8), size=128)


# --- what the tracker sees ----------------------------------------------------------------------


def test_tracker_recovers_scripted_head_pose(portrait: SyntheticPortrait, tracker) -> None:
    rest = tracker.process(portrait.render(Trajectory.neutral(1), 0))
    assert rest is not None
    poses = np.radians(
        [[0, 18, 0], [0, -18, 0], [10, 0, 0], [-10, 0, 0], [0, 0, 7], [-6, 12, -5], [8, -10, 4]]
    )
    errors = []
    for pose in poses:
        traj = single_frame(pose=pose, jaw_open=0.5, smile=0.3, gaze=np.radians([5.0, 3.0]))
        lm = tracker.process(portrait.render(traj, 0))
        assert lm is not None, f"no face found at pose {np.degrees(pose)}"
        fit = fit_head_pose(np.stack([rest, lm]))
        relative = fit.rotation[1] @ fit.rotation[0].T
        errors.append(matrix_to_euler(torch.from_numpy(relative).double()).numpy() - pose)
    errors = np.abs(np.degrees(np.array(errors)))
    assert errors[:, 0].max() < 3.5, f"pitch errors {errors[:, 0]}"
    assert errors[:, 1].max() < 3.5, f"yaw errors {errors[:, 1]}"
    assert errors[:, 2].max() < 2.0, f"roll errors {errors[:, 2]}"


def test_tracker_sees_mouth_blinks_and_finds_every_frame(
    portrait: SyntheticPortrait, tracker
) -> None:
    def canonical(traj: Trajectory) -> np.ndarray:
        lm = tracker.process(portrait.render(traj, 0))
        assert lm is not None
        return fit_head_pose(lm[None]).canonicalize(lm[None])[0]

    rest = canonical(Trajectory.neutral(1))
    open_mouth = canonical(single_frame(jaw_open=1.0))
    closed_eyes = canonical(single_frame(blink_left=1.0, blink_right=1.0))

    def gap(c: np.ndarray) -> float:
        return float(c[T.LIPS_INNER_LOWER[5], 1] - c[T.LIPS_INNER_UPPER[5], 1])

    def eye(c: np.ndarray) -> float:
        return float(c[T.LEFT_EYE_LOWER[4], 1] - c[T.LEFT_EYE_UPPER[4], 1])

    assert gap(open_mouth) > gap(rest) + 0.12  # template units (eye corners 1 apart)
    assert eye(closed_eyes) < 0.5 * eye(rest)

    traj = scripted_trajectory(400, seed=1)
    for i in range(0, 400, 25):
        assert tracker.process(portrait.render(traj, i)) is not None, f"frame {i}: no face"


# --- audio and the clip -------------------------------------------------------------------------


def test_speech_follows_the_jaw() -> None:
    traj = scripted_trajectory(250, seed=0)
    audio = synthetic_speech(traj)
    assert audio.dtype == np.float32 and len(audio) == 10 * AUDIO_SAMPLE_RATE
    assert np.abs(audio).max() <= 1.0
    per_frame = audio.reshape(len(traj), -1)
    rms = np.sqrt((per_frame**2).mean(1))
    assert np.corrcoef(rms, traj.jaw_open)[0, 1] > 0.8
    assert rms[traj.jaw_open < 1e-3].max(initial=0.0) < 0.02


def test_synthesize_clip_round_trip(tmp_path: Path, portrait: SyntheticPortrait) -> None:
    traj = scripted_trajectory(30, seed=0)
    path = tmp_path / "clip.mp4"
    npz = synthesize_clip(path, traj, portrait)
    info = probe_video(path)
    assert (info.width, info.height, info.fps) == (SIZE, SIZE, 25.0)
    assert info.has_audio and info.audio_sample_rate == AUDIO_SAMPLE_RATE
    assert is_marked_synthetic(path)
    with VideoReader(path) as reader:
        frames = list(reader)
    assert len(frames) == 30
    expected = portrait.render(traj, 7).astype(np.float32)
    assert np.abs(frames[7].astype(np.float32) - expected).mean() < 3
    audio = load_audio(path, AUDIO_SAMPLE_RATE)
    assert abs(len(audio) - 1.2 * AUDIO_SAMPLE_RATE) < 0.1 * AUDIO_SAMPLE_RATE
    assert np.abs(audio).max() > 0.05
    assert npz == path.with_suffix(".npz")
    np.testing.assert_array_equal(Trajectory.load(npz).pose, traj.pose)

    silent = tmp_path / "silent.mp4"
    synthesize_clip(silent, Trajectory.neutral(5), portrait, audio=False)
    assert not probe_video(silent).has_audio


def test_synthesize_clip_rejects_a_portrait_of_another_size(
    tmp_path: Path, portrait: SyntheticPortrait
) -> None:
    with pytest.raises(ValueError, match="256"):
        synthesize_clip(tmp_path / "x.mp4", Trajectory.neutral(2), portrait, size=128)
