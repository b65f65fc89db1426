"""Video and audio file I/O: streaming readers and writers on PyAV.

Everything here works a frame (or a chunk of audio) at a time, and every problem with a
file the user gave is raised as :class:`~neuralhead.errors.InputError` with one line.
"""

from neuralhead.media.audio import (
    audio_duration,
    has_audio,
    iter_audio,
    load_audio,
    write_wav,
)
from neuralhead.media.video import (
    VideoInfo,
    VideoReader,
    VideoWriter,
    is_marked_synthetic,
    probe_video,
    read_container_metadata,
)

__all__ = [
    "VideoInfo",
    "VideoReader",
    "VideoWriter",
    "audio_duration",
    "has_audio",
    "is_marked_synthetic",
    "iter_audio",
    "load_audio",
    "probe_video",
    "read_container_metadata",
    "write_wav",
]
