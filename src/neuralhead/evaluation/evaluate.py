"""``neuralhead evaluate``: a portrait scored on held-out frames, beside a baseline.

Self-reenactment (DNP Sec. 4.1, "Reconstruction"): the held-out frames' tracked parameters
drive the portrait and the output is compared with the real frames: L1 (0-255), PSNR, SSIM,
and LPIPS / FID when their pretrained weights are present (otherwise listed as unavailable).
FID compares the set of generated frames with the set of real frames of the split (not
frame by frame). On a few hundred frames it is strongly biased upwards and only comparable
between results with the same number of frames (see :mod:`neuralhead.metrics.fid`).
The output is also re-tracked, and its pose, expression and gaze are compared with those it
was asked to show (Table 2, with our tracker in place of DECA). Every number is reported for
the nearest-neighbour retrieval baseline too, and for the real frames re-tracked at the same
resolution (the tracker's own noise floor).

Cross-reenactment (``driving=VIDEO``): another person's video drives the portrait; the output
is re-tracked and compared with the mapped parameters, and its head motion with the driver's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from neuralhead.data.format import DatasetFiles
from neuralhead.dnp.pipeline import driving_parameters, render_frames
from neuralhead.dnp.portrait import Portrait
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.evaluation.baseline import NearestNeighbourBaseline
from neuralhead.evaluation.tracked import (
    SequenceTracker,
    parameter_errors,
    relative_rotation_error,
)
from neuralhead.fileio import write_json_atomic
from neuralhead.inference.common import OUTPUT_AUDIO_RATE
from neuralhead.inference.driving_input import from_dataset, open_driver
from neuralhead.media.video import VideoWriter
from neuralhead.metrics.fid import FID
from neuralhead.metrics.image import l1_255, psnr, ssim
from neuralhead.metrics.inception import FIDInceptionV3
from neuralhead.visualize import error_map, grid, label

SHEET_ROWS = 6


def _read_frame(files: DatasetFiles, frame: int, size: int) -> np.ndarray:
    image = cv2.imread(str(files.frame_path(frame)))
    if image is None:
        raise InputError(f"cannot read frame {files.frame_path(frame)}")
    if image.shape[0] != size:
        interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR
        image = cv2.resize(image, (size, size), interpolation=interp)
    return np.ascontiguousarray(image[:, :, ::-1])


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


class _ImageScores:
    """Running per-frame image metrics for one method."""

    def __init__(self, lpips: torch.nn.Module | None) -> None:
        self.lpips = lpips
        self.values: dict[str, list[float]] = {"l1_255": [], "psnr": [], "ssim": []}
        if lpips is not None:
            self.values["lpips"] = []

    @torch.no_grad()
    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        p, t = _to_tensor(pred), _to_tensor(target)
        self.values["l1_255"].append(float(l1_255(p, t)[0]))
        self.values["psnr"].append(float(psnr(p, t)[0]))
        self.values["ssim"].append(float(ssim(p, t)[0]))
        if self.lpips is not None:
            self.values["lpips"].append(float(self.lpips(p, t)[0]))

    def summary(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.values.items() if v}


def _load_lpips() -> tuple[torch.nn.Module | None, str | None]:
    from neuralhead.metrics.lpips import LPIPS

    try:
        return LPIPS.from_pretrained().eval(), None
    except WeightsMissingError as exc:
        return None, str(exc)


def _load_fid() -> tuple[FIDInceptionV3 | None, str | None]:
    try:
        return FIDInceptionV3.from_pretrained(), None
    except WeightsMissingError as exc:
        return None, str(exc)


def evaluate_portrait(
    checkpoint: str | Path,
    data: str | Path | None = None,
    split: str = "heldout",
    driving: str | Path | None = None,
    out: str | Path | None = None,
    sheet: str | Path | None = None,
    max_frames: int | None = None,
    tracking: bool = True,
    device: str = "cpu",
    progress: bool = True,
    limit: bool = True,
) -> dict[str, Any]:
    """Score the portrait at ``checkpoint``; writes the metrics JSON and a contact sheet.

    ``limit`` applies to the cross-reenactment: keep the driver's motion inside the portrait's
    training range (see :func:`neuralhead.dnp.driving.relative_motion`).
    """
    portrait = Portrait.load(checkpoint, device)
    own = portrait.data.info.get("dataset")
    data_dir = Path(data) if data is not None else (Path(own) if own else None)
    if data_dir is None or not data_dir.is_dir():
        raise InputError(f"dataset {data_dir} not found: pass --data DATASET_DIR")
    files = DatasetFiles.open(data_dir)
    out = Path(out) if out else Path(checkpoint) / "eval" / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet = Path(sheet) if sheet else out.with_name(out.stem + "_sheet.png")
    size = portrait.config.image_size

    driver = from_dataset(files, split, max_frames, only_valid=True)
    params, _ = driving_parameters(portrait, driver, "absolute")
    baseline = NearestNeighbourBaseline(portrait.data)
    nn_rows = baseline.nearest(params.pose, params.gaze, params.expression)
    train_files = DatasetFiles.open(own) if own and Path(own).is_dir() else None

    lpips, lpips_reason = _load_lpips()
    scores = {"model": _ImageScores(lpips), "nearest_neighbour": _ImageScores(lpips)}
    fid_network, fid_reason = _load_fid()
    fids: dict[str, FID] = {}
    if fid_network is not None:
        fids["model"] = FID(fid_network)
        if train_files is not None:
            fids["nearest_neighbour"] = FID(fid_network)
    sheet_at = set(np.linspace(0, len(driver.frames) - 1, min(SHEET_ROWS, len(driver.frames))).astype(int))
    sheet_rows = []
    basis = portrait.data.basis
    trackers: dict[str, SequenceTracker] = {}
    if tracking:
        trackers = {"model": SequenceTracker(basis), "ground_truth_retracked": SequenceTracker(basis)}
        if train_files is not None:
            trackers["nearest_neighbour"] = SequenceTracker(basis)
    for i, generated in enumerate(render_frames(portrait, params, device=device, progress=progress, desc="evaluating")):
        target = _read_frame(files, int(driver.frames[i]), size)
        scores["model"].add(generated, target)
        nn_image = None
        if train_files is not None:
            nn_image = _read_frame(train_files, int(portrait.data.frames[nn_rows[i]]), size)
            scores["nearest_neighbour"].add(nn_image, target)
        if fids:
            # The real frames' features are computed once and shared by both methods.
            real_features = fids["model"].features(_to_tensor(target))
            for name, image in (("model", generated), ("nearest_neighbour", nn_image)):
                if name in fids:
                    fids[name].update_features(real_features, real=True)
                    fids[name].update(_to_tensor(image), real=False)
        if trackers:
            trackers["model"].add(generated)
            trackers["ground_truth_retracked"].add(target)
            if nn_image is not None:
                trackers["nearest_neighbour"].add(nn_image)
        if i in sheet_at:
            row = [label(target, f"ground truth #{driver.frames[i]}"), label(generated, "generated"),
                   label(error_map(generated, target), "error")]
            if nn_image is not None:
                row += [label(nn_image, "nearest neighbour"), label(error_map(nn_image, target), "error")]
            sheet_rows.append(row)
    cv2.imwrite(str(sheet), grid(sheet_rows)[:, :, ::-1])

    methods: dict[str, dict[str, float]] = {name: s.summary() for name, s in scores.items() if s.values["psnr"]}
    if trackers:
        asked = (params.pose, params.gaze, params.expression)
        for name, tracker in trackers.items():
            methods.setdefault(name, {}).update(parameter_errors(tracker.result(), *asked))

    unavailable = {
        "fvd": "not part of the portrait evaluation; compare two videos with "
        "`neuralhead evaluate --pred VIDEO --target VIDEO`"
    }
    if lpips is None:
        unavailable["lpips"] = lpips_reason
    if fid_network is None:
        unavailable["fid"] = fid_reason
    elif len(driver.frames) < 2:
        unavailable["fid"] = f"FID needs at least 2 frames, the {split} split has {len(driver.frames)}"
    else:
        for name, fid in fids.items():
            methods.setdefault(name, {})["fid"] = fid.compute()
    if train_files is None:
        unavailable["nearest_neighbour"] = f"the training dataset {own} is not available"
    report: dict[str, Any] = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "step": portrait.step,
        "data": str(files.root.resolve()),
        "split": split,
        "num_frames": len(driver.frames),
        "resolution": size,
        "methods": methods,
        "unavailable": unavailable,
        "sheet": str(sheet),
    }
    if driving is not None:
        report["cross_reenactment"] = cross_reenactment(
            portrait, Path(driving), out.parent, device, progress, limit
        )
    write_json_atomic(out, report)
    report["json"] = str(out)
    return report


def cross_reenactment(
    portrait: Portrait,
    driving: Path,
    out_dir: Path,
    device: str = "cpu",
    progress: bool = True,
    limit: bool = True,
) -> dict[str, Any]:
    """Drive the portrait by another video; measure how the output follows the driver."""
    size = portrait.config.image_size
    audio = (portrait.data.info.get("audio") or {}).get("extractor", "logmel")
    with open_driver(driving, size=int(portrait.data.info.get("size", size)), audio_extractor=audio,
                     progress=progress) as driver:
        params, motion = driving_parameters(portrait, driver, "relative", limit=limit)
        video = out_dir / f"cross_{driving.stem}.mp4"
        tracker = SequenceTracker(portrait.data.basis)
        sound = driver.audio(OUTPUT_AUDIO_RATE)
        with VideoWriter(
            video,
            driver.fps,
            audio=sound,
            audio_sample_rate=OUTPUT_AUDIO_RATE if sound is not None else None,
            generator="neuralhead dnp evaluate",
        ) as writer:
            for frame in render_frames(portrait, params, device=device, progress=progress, desc="cross-reenacting"):
                writer.write(frame)
                tracker.add(frame)
        tracked = tracker.result()
        errors = parameter_errors(tracked, params.pose, params.gaze, params.expression)
        errors["head_motion_deg"] = relative_rotation_error(tracked.pose, driver.pose)
        # How much of that the training-range limit accounts for: the asked-for motion vs the
        # driver's own (zero when nothing was clipped).
        errors["head_motion_limited_deg"] = relative_rotation_error(params.pose, driver.pose)
        errors["rotation_correlation"] = _rotation_correlation(tracked.pose, driver.pose)
        rotation_range = _rotation_range_deg(driver.pose)
    return {"driving": str(driving), "motion": motion, "limited_to_training_range": limit,
            "num_frames": len(params), "video": str(video), "driver_rotation_range_deg": rotation_range,
            **errors}


def _rotation_correlation(tracked: np.ndarray, driver: np.ndarray) -> dict[str, float]:
    """Pearson correlation over time of each Euler angle, output vs driver."""
    ok = ~np.isnan(tracked[:, 0])
    out = {}
    for i, name in enumerate(("pitch", "yaw", "roll")):
        a, b = tracked[ok, i], driver[ok, i]
        out[name] = float(np.corrcoef(a, b)[0, 1]) if ok.sum() > 2 and a.std() > 0 and b.std() > 0 else float("nan")
    return out


def _rotation_range_deg(pose: np.ndarray) -> dict[str, float]:
    spread = np.degrees(pose[:, :3].max(0) - pose[:, :3].min(0))
    return {"pitch": float(spread[0]), "yaw": float(spread[1]), "roll": float(spread[2])}


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of a report."""
    columns = ["l1_255", "psnr", "ssim", "lpips", "fid", "pose_deg", "expression_l1", "gaze_deg", "face_found"]
    methods = report["methods"]
    shown = [c for c in columns if any(c in m for m in methods.values())]
    lines = [
        f"{report['num_frames']} {report['split']} frames of {report['data']} at {report['resolution']}px "
        f"(checkpoint step {report['step']})",
        f"{'method':<24}" + "".join(f"{c:>14}" for c in shown),
    ]
    for name, values in methods.items():
        cells = "".join(f"{_cell(values.get(c)):>14}" for c in shown)
        lines.append(f"{name:<24}{cells}")
    cross = report.get("cross_reenactment")
    if cross:
        lines.append(
            f"cross-reenactment by {Path(cross['driving']).name} ({cross['num_frames']} frames): "
            f"pose error vs asked {cross['pose_deg']:.2f} deg; head motion vs driver "
            f"{cross['head_motion_deg']:.2f} deg (of which the training-range limit "
            f"{cross['head_motion_limited_deg']:.2f} deg); correlation with the driver "
            + ", ".join(f"{k} {v:.2f}" for k, v in cross["rotation_correlation"].items())
            + f"; gaze {cross['gaze_deg']:.2f} deg; expression L1 {cross['expression_l1']:.3f} -> {cross['video']}"
        )
    for name, reason in report["unavailable"].items():
        lines.append(f"{name}: unavailable ({reason})")
    lines.append(f"metrics: {report.get('json', '')}  contact sheet: {report['sheet']}")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.4g}"
