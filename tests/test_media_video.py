"""Video I/O: round trips through VideoWriter/VideoReader, the synthetic-media mark, and
one-line InputErrors for every kind of bad input file."""

from __future__ import annotations

import os
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

import neuralhead
from neuralhead.errors import InputError
from neuralhead.media import (
    VideoReader,
    VideoWriter,
    audio_duration,
    is_marked_synthetic,
    load_audio,
    probe_video,
    read_container_metadata,
    write_wav,
)


def smooth_frame(i: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth colour gradient that moves with i: easy for a lossy codec to keep."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack(
        [
            128 + 80 * np.sin(xx / 20 + i / 5),
            128 + 80 * np.cos(yy / 15),
            60 + (xx + yy) * 120 / (height + width) + i,
        ],
        axis=-1,
    ).astype(np.uint8)


def write_video(path: Path, num_frames: int = 30, fps: float = 25, **kwargs) -> list[np.ndarray]:
    frames = [smooth_frame(i) for i in range(num_frames)]
    with VideoWriter(path, fps, **kwargs) as writer:
        for frame in frames:
            writer.write(frame)
    return frames


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_round_trip_frames_size_and_audio(tmp_path):
    path = tmp_path / "talk.mp4"
    sr = 16000
    audio = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(1.2 * sr)) / sr)).astype(np.float32)
    frames = write_video(path, 30, 25, audio=audio, audio_sample_rate=sr)

    info = probe_video(path)
    assert (info.width, info.height, info.fps, info.num_frames) == (64, 48, 25.0, 30)
    assert info.duration == pytest.approx(1.2)
    assert info.has_audio and info.audio_sample_rate == sr

    with VideoReader(path) as reader:
        assert len(reader) == 30
        decoded = list(reader)
    assert len(decoded) == 30
    for original, frame in zip(frames, decoded):
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
        assert np.abs(frame.astype(np.int16) - original).mean() < 3.0

    assert audio_duration(path) == pytest.approx(1.2, abs=1 / 25)
    # AAC decodes whole 1024-sample frames, so the decoded track may run past the header's
    # duration by less than one frame.
    assert 0 <= len(load_audio(path, sr)) - 1.2 * sr < 1024


@pytest.mark.parametrize("seconds", [0.5, 2.0])
def test_audio_is_padded_or_trimmed_to_video_length(tmp_path, seconds):
    path = tmp_path / "v.mp4"
    sr = 16000
    audio = (0.3 * np.sin(2 * np.pi * 300 * np.arange(int(seconds * sr)) / sr)).astype(np.float32)
    write_video(path, 30, 25, audio=audio, audio_sample_rate=sr)
    assert audio_duration(path) == pytest.approx(1.2, abs=1 / 25)
    track = load_audio(path, sr)
    if seconds < 1.2:
        assert np.abs(track[int(0.7 * sr) : int(1.15 * sr)]).max() < 0.01
    assert np.abs(track[int(0.1 * sr) : int(0.4 * sr)]).max() > 0.2


def test_stereo_audio_and_non_integer_frame_rate(tmp_path):
    path = tmp_path / "ntsc.mp4"
    sr = 48000
    audio = np.zeros((sr, 2), np.float32)
    write_video(path, 12, 30000 / 1001, audio=audio, audio_sample_rate=sr)
    info = probe_video(path)
    assert info.fps == pytest.approx(29.97, abs=0.01)
    assert info.audio_sample_rate == sr and info.num_frames == 12


def test_reader_restarts_runs_side_by_side_and_closes(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, 10)
    reader = VideoReader(path)
    first = list(reader)
    assert len(first) == 10
    pairs = list(zip(reader, reader))
    assert len(pairs) == 10
    for (a, b), frame in zip(pairs, first):
        np.testing.assert_array_equal(a, frame)
        np.testing.assert_array_equal(b, frame)
    loop = iter(reader)
    np.testing.assert_array_equal(next(loop), first[0])
    reader.close()
    assert list(loop) == []


def test_odd_frame_size_is_padded_to_even(tmp_path):
    path = tmp_path / "odd.mp4"
    frames = [smooth_frame(i, 47, 63) for i in range(5)]
    with VideoWriter(path, 25) as writer:
        for frame in frames:
            writer.write(frame)
    decoded = list(VideoReader(path))
    assert decoded[0].shape == (48, 64, 3)
    assert np.abs(decoded[0][:47, :63].astype(np.int16) - frames[0]).mean() < 3.0


def test_display_rotation_is_applied(tmp_path):
    path = tmp_path / "phone.mp4"
    frame = smooth_frame(0, 32, 64)
    frame[:, :32] = 255  # left half white, so a wrong rotation cannot go unnoticed
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    info = probe_video(path)
    assert (info.rotation, info.width, info.height) == (90, 32, 64)
    decoded = next(iter(VideoReader(path)))
    assert decoded.shape == (64, 32, 3)
    assert np.abs(decoded.astype(np.int16) - np.rot90(frame)).mean() < 4.0


def test_synthetic_mark_round_trip(tmp_path):
    path = tmp_path / "fake.mp4"
    write_video(
        path,
        3,
        generator="dnp-test",
        description="driven by audio",
        extra_metadata={"source_model": "dnp-256-tiny"},
    )
    metadata = read_container_metadata(path)
    tag = f"Synthetic media generated by neuralhead {neuralhead.__version__} (dnp-test)"
    assert metadata["comment"] == tag
    assert metadata["description"] == f"{tag}. driven by audio"
    assert metadata["synthetic_media"] == "true"
    assert metadata["generator"] == "dnp-test"
    assert metadata["source_model"] == "dnp-256-tiny"
    assert is_marked_synthetic(path)


@pytest.mark.parametrize("faststart", [True, False])
def test_unmarked_video(tmp_path, faststart):
    path = tmp_path / "real.mp4"
    write_video(path, 3, synthetic=False, faststart=faststart)
    assert not is_marked_synthetic(path)
    assert "synthetic_media" not in read_container_metadata(path)


def test_extra_metadata_cannot_remove_the_mark(tmp_path):
    with pytest.raises(ValueError, match="synthetic"):
        VideoWriter(tmp_path / "x.mp4", 25, extra_metadata={"synthetic_media": "false"})


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "broken.mp4"
    with pytest.raises(ValueError, match="size"), VideoWriter(path, 25) as writer:
        writer.write(smooth_frame(0))
        writer.write(smooth_frame(1, 32, 32))
    assert os.listdir(tmp_path) == []


def test_writer_rejects_bad_frames(tmp_path):
    with VideoWriter(tmp_path / "v.mp4", 25) as writer:
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((8, 8, 3), np.float32))
        writer.write(smooth_frame(0))
    with pytest.raises(ValueError, match="no frames"):
        VideoWriter(tmp_path / "empty.mp4", 25).close()
    assert sorted(os.listdir(tmp_path)) == ["v.mp4"]


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as error:
        probe_video(tmp_path / "nope.mp4")
    assert one_line(error) == f"video file not found: {tmp_path / 'nope.mp4'}"


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_image_is_rejected(tmp_path, suffix):
    path = tmp_path / f"portrait{suffix}"
    assert cv2.imwrite(str(path), smooth_frame(0))
    with pytest.raises(InputError) as error:
        VideoReader(path)
    assert one_line(error) == f"{path} is an image, not a video"


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(5000), b""])
def test_not_a_media_file(tmp_path, content):
    path = tmp_path / "noise.mp4"
    path.write_bytes(content)
    with pytest.raises(InputError) as error:
        probe_video(path)
    assert one_line(error).startswith(f"could not open video {path}: not a readable media file (")


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "speech.wav"
    write_wav(path, np.zeros(1600, np.float32), 16000)
    with pytest.raises(InputError) as error:
        VideoReader(path)
    assert one_line(error) == f"{path} has no video stream"


def test_truncated_file_with_index_at_end_fails_at_open(tmp_path):
    path = tmp_path / "cut.mp4"
    write_video(path, 30, faststart=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as error:
        VideoReader(path)
    assert one_line(error).startswith(f"could not open video {path}: not a readable media file")


def test_truncated_file_with_index_at_front_fails_while_decoding(tmp_path):
    path = tmp_path / "cut.mp4"
    rng = np.random.default_rng(0)
    # Noise frames make every packet large, so that half the bytes is about half the frames.
    with VideoWriter(path, 25) as writer:
        for _ in range(30):
            writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    reader = VideoReader(path)
    assert len(reader) == 30  # the index at the front still describes the whole video
    decoded = 0
    with pytest.raises(InputError) as error:
        for _ in reader:
            decoded += 1
    assert 0 < decoded < 30
    assert one_line(error).startswith(
        f"video {path} is truncated or corrupt: decoding stopped after {decoded} frames"
    )
