"""Reenacting a trained DNP portrait from files: drive, render, write the video."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from neuralhead.dnp.driving import (
    DrivingParameters,
    absolute_motion,
    audio_context,
    relative_motion,
    replayed_motion,
)
from neuralhead.dnp.portrait import Portrait
from neuralhead.errors import InputError
from neuralhead.inference.common import OUTPUT_AUDIO_RATE
from neuralhead.inference.driving_input import Driver, open_driver
from neuralhead.media.video import VideoWriter
from neuralhead.visualize import to_uint8


@dataclass
class ReenactOptions:
    """Settings of ``neuralhead reenact`` for DNP portraits."""

    motion: str = "auto"  # auto | absolute | relative
    split: str = "all"  # frames of a prepared-dataset driver: all | train | heldout
    driver_reference: int = 0  # driver frame that relative motion is measured from
    limit: bool = True  # keep relative motion inside the training range
    side_by_side: bool = False
    batch_size: int = 8
    device: str = "cpu"
    max_frames: int | None = None
    progress: bool = True


@dataclass
class ReenactResult:
    path: Path
    num_frames: int
    fps: float
    motion: str
    has_audio: bool


def resolve_motion(portrait: Portrait, driver: Driver, motion: str) -> str:
    """``auto`` means absolute for the portrait's own dataset or a parameter file, else relative."""
    if motion not in ("auto", "absolute", "relative"):
        raise InputError(f"--motion must be auto, absolute or relative, got {motion!r}")
    if motion != "auto":
        return motion
    if driver.kind == "params":
        return "absolute"
    own = portrait.data.info.get("dataset")
    if driver.kind == "dataset" and own and Path(own).resolve() == driver.path.resolve():
        return "absolute"
    return "relative"


def driving_parameters(
    portrait: Portrait, driver: Driver, motion: str, reference: int = 0, limit: bool = True
) -> tuple[DrivingParameters, str]:
    """The portrait's per-frame inputs for ``driver`` and the motion mode actually used."""
    audio_driven = portrait.config.driver == "audio"
    if driver.kind == "audio":
        params, motion = replayed_motion(portrait.data, driver.num_frames), "replayed"
    else:
        motion = resolve_motion(portrait, driver, motion)
        if driver.expression is not None and driver.canonical is None:
            if motion == "relative":
                raise InputError("relative motion needs landmarks; this parameter file has expression only")
            params = DrivingParameters(pose=driver.pose, gaze=driver.gaze, expression=driver.expression)
        elif motion == "absolute":
            params = absolute_motion(portrait.data, driver.pose, driver.gaze, driver.canonical)
        else:
            params = relative_motion(
                portrait.data, driver.pose, driver.gaze, driver.canonical, reference, limit
            )
        if params.expression.shape[1] != portrait.config.num_expression:
            raise InputError(
                f"driver gives {params.expression.shape[1]} expression coefficients, "
                f"the portrait expects {portrait.config.num_expression}"
            )
    if audio_driven:
        if driver.audio_windows is None:
            raise InputError(
                f"this portrait is audio-driven, but {driver.path.name} has no sound to drive it"
            )
        expected = (portrait.config.audio_window, portrait.config.audio_dim)
        if tuple(driver.audio_windows.shape[1:]) != expected:
            raise InputError(
                f"driver audio features are {tuple(driver.audio_windows.shape[1:])}, the portrait "
                f"was trained on {expected}: use the same audio feature extractor"
            )
        params.audio = audio_context(driver.audio_windows, portrait.config.audio_attention_frames)
    elif driver.kind == "audio":
        raise InputError(
            "this portrait is expression-driven; audio alone can drive only a portrait trained "
            "with an audio preset (e.g. --preset dnp-256-audio)"
        )
    return params, motion


@torch.no_grad()
def render_frames(
    portrait: Portrait,
    params: DrivingParameters,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "rendering",
) -> Iterator[np.ndarray]:
    """Generate one RGB uint8 frame per row of ``params``, batch by batch."""
    model = portrait.model.to(device).eval()
    bar = tqdm(total=len(params), desc=desc, unit="frame", disable=not progress)
    for start in range(0, len(params), batch_size):
        rows = slice(start, min(start + batch_size, len(params)))
        inputs = params.tensors(rows, device)
        images = model(**inputs).image
        for image in images:
            yield to_uint8(image)
        bar.update(rows.stop - rows.start)
    bar.close()


def reenact(checkpoint: str | Path, driving: str | Path, out: str | Path, options: ReenactOptions) -> ReenactResult:
    """Drive the portrait at ``checkpoint`` by ``driving`` and write ``out`` (mp4)."""
    portrait = Portrait.load(checkpoint, options.device)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = portrait.config.image_size
    audio_info = portrait.data.info.get("audio") or {}
    with open_driver(
        driving,
        size=int(portrait.data.info.get("size", size)),
        audio_extractor=audio_info.get("extractor", "logmel"),
        split=options.split,
        max_frames=options.max_frames,
        fps=float(portrait.data.info.get("fps", 25.0)),
        progress=options.progress,
    ) as driver:
        params, motion = driving_parameters(
            portrait, driver, options.motion, options.driver_reference, options.limit
        )
        sound = driver.audio(OUTPUT_AUDIO_RATE)
        frames = render_frames(portrait, params, options.batch_size, options.device, options.progress)
        side = driver.driver_frames(size) if options.side_by_side else None
        description = f"DNP portrait {Path(checkpoint).name}, {motion} motion from {Path(driving).name}"
        with VideoWriter(
            out,
            driver.fps,
            audio=sound,
            audio_sample_rate=OUTPUT_AUDIO_RATE if sound is not None else None,
            generator="neuralhead dnp",
            description=description,
        ) as writer:
            for frame in frames:
                if side is not None:
                    frame = np.concatenate([next(side), frame], axis=1)
                writer.write(frame)
    return ReenactResult(out, len(params), driver.fps, motion, sound is not None)
