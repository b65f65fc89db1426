"""Generated frames scored against reference frames: two folders of images or two videos.

``neuralhead evaluate --pred A --target B`` and :func:`evaluate_pairs`. Frame ``i`` of the
prediction is compared with frame ``i`` of the target (self-reenactment, or any method's
output beside its ground truth), with the metrics the papers report:

* per frame, averaged over frames: L1 (0-255), PSNR, SSIM and LPIPS (DNP Sec. 4.1, HeadGAN
  App. E, MegaPortraits Sec. 4.4);
* CSIM (HeadGAN App. E) per frame pair with a face in both images, averaged over those
  (their number is ``csim_frames`` in the report): each image's face is warped onto ArcFace's
  five-point template (:func:`~neuralhead.metrics.identity.align_faces`) with the eye, nose
  and mouth points of its own tracked face mesh, as ArcFace expects its input. With tracking
  disabled (``tracking=False``, ``neuralhead evaluate --no-tracking``) or unavailable, every
  pair's whole frames are compared instead, which is only meaningful for aligned face crops;
  ``csim_aligned`` in the report says which was done;
* over the two sets: FID on frames and FVD on 16-frame clips (HeadGAN App. E);
* on the faces re-tracked with the project's tracker (mediapipe face mesh, as in
  :mod:`neuralhead.evaluation.tracked`), over frames where a face is found in both: the
  geodesic head-rotation error, HeadGAN's ARD and ARE, the gaze angle, the expression
  distance and two mouth-landmark errors (:mod:`neuralhead.metrics.landmarks`).

Expression coefficients are only comparable in one basis: by default a basis is fitted to
the target's tracked frames (:class:`~neuralhead.tracking.expression.ExpressionBasis`, 32
components as ``neuralhead prepare`` uses, fewer for short clips); pass a dataset's
``expression_basis.npz`` to measure in that person's basis instead.

Frames are read one at a time (videos are streamed), processed ``batch_size`` at a time and
dropped; what stays is one number per frame and metric, the running FID/FVD statistics, and,
when tracked metrics are asked for, the face-mesh landmarks of both sequences (11 KB per
frame pair).
A metric whose network or input is missing is listed under ``unavailable`` with the reason,
never estimated.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from neuralhead import weights
from neuralhead.errors import InputError, NeuralheadError, WeightsMissingError
from neuralhead.fileio import write_json_atomic
from neuralhead.geometry.rotation import matrix_to_euler
from neuralhead.media.video import VideoReader
from neuralhead.metrics import METRICS
from neuralhead.metrics.fid import FID
from neuralhead.metrics.fvd import FVD
from neuralhead.metrics.identity import CSIM, five_points_from_mesh
from neuralhead.metrics.image import l1_255, psnr, ssim
from neuralhead.metrics.landmarks import mouth_landmark_distance, mouth_shape_error
from neuralhead.metrics.pose import (
    ard_deg,
    are_deg,
    expression_distance,
    gaze_angle_deg,
    rotation_angle_deg,
)
from neuralhead.tracking.expression import ExpressionBasis
from neuralhead.tracking.gaze import gaze_angles
from neuralhead.tracking.mediapipe_backend import FaceMeshTracker
from neuralhead.tracking.pose import fit_head_pose
from neuralhead.tracking.topology import NUM_LANDMARKS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

PIXEL_METRICS = ("l1_255", "psnr", "ssim")
NETWORK_METRICS = ("lpips", "csim", "fid", "fvd")
TRACKED_METRICS = (
    "rotation_angle_deg",
    "ard_deg",
    "are_deg",
    "gaze_angle_deg",
    "expression_distance",
    "mouth_landmark_distance",
    "mouth_shape_error",
)
#: Every metric :func:`evaluate_pairs` computes, in report order.
PAIRED_METRICS = PIXEL_METRICS + NETWORK_METRICS + TRACKED_METRICS

#: Frames per batch for the networks; our choice, modest for a CPU.
DEFAULT_BATCH_SIZE = 8
#: Components of an expression basis fitted to the target (``neuralhead prepare``'s default).
EXPRESSION_COMPONENTS = 32
# A fitted basis whose strongest mode has less spread than this (template units, where the
# eyes' outer corners are 1 apart) means the target's face never moves: its coefficients
# would be noise divided by almost nothing.
_MIN_EXPRESSION_SPREAD = 1e-6


class FrameSource:
    """The frames of a folder of images (sorted by file name) or of a video file.

    Iterating yields RGB ``uint8`` arrays ``(H, W, 3)`` one at a time; a video is decoded as
    it is read. ``names`` lists a folder's image files; ``num_frames`` is exact for a
    folder and the container's estimate (or ``None``) for a video.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.names: list[str] | None = None
        if self.path.is_dir():
            self.names = sorted(
                p.name
                for p in self.path.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not self.names:
                raise InputError(
                    f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder {self.path}"
                )
            self.num_frames: int | None = len(self.names)
            self.kind = f"folder of {len(self.names)} images"
        else:
            self._video = VideoReader(self.path)
            self.num_frames = self._video.info.num_frames
            self.kind = "video"

    def __iter__(self) -> Generator[np.ndarray, None, None]:
        if self.names is None:
            yield from self._video
            return
        for name in self.names:
            image = cv2.imread(str(self.path / name), cv2.IMREAD_COLOR)
            if image is None:
                raise InputError(f"cannot read the image {self.path / name}")
            yield np.ascontiguousarray(image[:, :, ::-1])


def _check_names(pred: FrameSource, target: FrameSource) -> None:
    """Two folders must hold the same file names: frame i of one is compared with frame i
    of the other, and a missing file would shift every pair after it."""
    if pred.names is None or target.names is None or pred.names == target.names:
        return
    if len(pred.names) != len(target.names):
        raise InputError(
            f"{pred.path} holds {len(pred.names)} images and {target.path} "
            f"{len(target.names)}; the folders must hold the same frames"
        )
    a, b = next((a, b) for a, b in zip(pred.names, target.names) if a != b)
    raise InputError(
        f"the folders hold differently named images: {pred.path / a} stands where "
        f"{target.path / b} does; the folders must hold the same file names"
    )


def _pairs(
    pred: FrameSource, target: FrameSource, max_frames: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Frame pairs in order; InputError when one source ends before the other."""
    pred_frames, target_frames = iter(pred), iter(target)
    try:
        for index in itertools.count():
            if max_frames is not None and index >= max_frames:
                return
            a, b = next(pred_frames, None), next(target_frames, None)
            if a is None and b is None:
                return
            if a is None or b is None:
                short, long = (pred, target) if a is None else (target, pred)
                raise InputError(
                    f"{short.path} has {index} frames and {long.path} more; pred and target "
                    "must have the same number of frames"
                )
            if a.shape != b.shape:
                raise InputError(
                    f"frame {index}: {pred.path} is {a.shape[1]}x{a.shape[0]} and {target.path} "
                    f"{b.shape[1]}x{b.shape[0]}; pred and target frames must have the same size"
                )
            yield a, b
    finally:
        pred_frames.close()
        target_frames.close()


def _load_network(name: str, networks: Mapping[str, nn.Module] | None) -> nn.Module:
    """The network behind a metric: given by the caller, else loaded with its published
    weights (WeightsMissingError / ImportError when it cannot be)."""
    if networks is not None and name in networks:
        return networks[name]
    # Find every file first: building a network only to learn that its weights are missing
    # costs seconds (ArcFace-100 alone has 65M parameters to initialise).
    for weights_name in METRICS[name].weights:
        weights.weights_path(weights_name)
    if name == "lpips":
        from neuralhead.metrics.lpips import LPIPS

        return LPIPS.from_pretrained()
    if name == "fid":
        from neuralhead.metrics.inception import FIDInceptionV3

        return FIDInceptionV3.from_pretrained()
    if name == "csim":
        from neuralhead.pretrained.arcface import ArcFace

        return ArcFace.from_pretrained()
    from neuralhead.pretrained.i3d import I3D

    return I3D.from_pretrained()


class _LandmarkTrack:
    """Face-mesh landmarks of one frame sequence, tracked in video mode.

    :class:`~neuralhead.evaluation.tracked.SequenceTracker` reads pose, gaze and expression
    in a basis fixed in advance; here the basis may be fitted to the target after tracking,
    and the mouth metrics need the landmarks themselves, so they are kept (with ``keep``;
    CSIM's alignment only needs each frame's landmarks while its batch is scored).
    """

    def __init__(self, keep: bool = True) -> None:
        self._tracker = FaceMeshTracker()
        self._keep = keep
        self._landmarks: list[np.ndarray] = []

    def add(self, frame: np.ndarray) -> np.ndarray:
        """The frame's landmarks ``(478, 3)`` in pixels, NaN without a face."""
        points = self._tracker.process(frame)
        if points is None:
            points = np.full((NUM_LANDMARKS, 3), np.nan, np.float32)
        if self._keep:
            self._landmarks.append(points)
        return points

    def close(self) -> None:
        self._tracker.close()

    def landmarks(self) -> np.ndarray:
        """``(N, 478, 3)`` in pixels; frames without a face are NaN."""
        return np.stack(self._landmarks)


def _tracked_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    wanted: Sequence[str],
    basis_path: Path | None,
) -> tuple[dict[str, float], dict[str, Any], dict[str, str]]:
    """Tracked metrics over frames with a face in both: (values, tracking info, unavailable)."""
    found_pred = ~np.isnan(pred[:, 0, 0])
    found_target = ~np.isnan(target[:, 0, 0])
    both = found_pred & found_target
    info: dict[str, Any] = {
        "face_found_pred": float(found_pred.mean()),
        "face_found_target": float(found_target.mean()),
        "frames_compared": int(both.sum()),
    }
    if not both.any():
        reason = (
            f"no frame where the tracker found a face in both pred ({int(found_pred.sum())} of "
            f"{len(pred)} frames) and target ({int(found_target.sum())} of {len(target)})"
        )
        return {}, info, dict.fromkeys(wanted, reason)

    pred, target = pred[both], target[both]
    fit_pred, fit_target = fit_head_pose(pred), fit_head_pose(target)
    rot_pred = torch.from_numpy(fit_pred.rotation).double()
    rot_target = torch.from_numpy(fit_target.rotation).double()
    euler_pred, euler_target = matrix_to_euler(rot_pred), matrix_to_euler(rot_target)
    canonical_pred = fit_pred.canonicalize(pred)
    canonical_target = fit_target.canonicalize(target)

    computed: dict[str, Callable[[], torch.Tensor]] = {
        "rotation_angle_deg": lambda: rotation_angle_deg(rot_pred, rot_target),
        "ard_deg": lambda: ard_deg(euler_pred, euler_target),
        "are_deg": lambda: are_deg(euler_pred),
        "gaze_angle_deg": lambda: gaze_angle_deg(
            torch.from_numpy(gaze_angles(canonical_pred)),
            torch.from_numpy(gaze_angles(canonical_target)),
        ),
        "mouth_landmark_distance": lambda: mouth_landmark_distance(
            torch.from_numpy(pred), torch.from_numpy(target)
        ),
        "mouth_shape_error": lambda: mouth_shape_error(
            torch.from_numpy(canonical_pred), torch.from_numpy(canonical_target)
        ),
    }
    values = {name: float(computed[name]().mean()) for name in wanted if name in computed}
    unavailable: dict[str, str] = {}
    if "expression_distance" in wanted:
        if basis_path is not None:
            basis = ExpressionBasis.load(basis_path)
            info["expression_basis"] = str(basis_path)
        elif len(canonical_target) >= 2:
            components = min(EXPRESSION_COMPONENTS, len(canonical_target) - 1)
            basis = ExpressionBasis.fit(canonical_target, components)
            info["expression_basis"] = f"fitted to the target's frames, {components} components"
        else:
            basis = None
            unavailable["expression_distance"] = (
                "fitting an expression basis to the target needs 2 frames with a face in both; "
                "pass expression_basis"
            )
        if basis is not None and basis.stddev[0] < _MIN_EXPRESSION_SPREAD:
            unavailable["expression_distance"] = (
                "the target's face shape does not change over its frames, so no expression "
                "basis can be fitted to it; pass expression_basis"
            )
        elif basis is not None:
            values["expression_distance"] = float(
                expression_distance(
                    torch.from_numpy(basis.project(canonical_pred)),
                    torch.from_numpy(basis.project(canonical_target)),
                ).mean()
            )
    return values, info, unavailable


class _Scores:
    """Running per-frame and set metrics over batches of frame pairs.

    Networks are loaded at construction; a metric whose network cannot be is recorded in
    ``unavailable`` with the reason and skipped.
    """

    def __init__(
        self,
        wanted: Sequence[str],
        networks: Mapping[str, nn.Module] | None,
        batch_size: int,
        device: str | torch.device,
    ) -> None:
        self.device = device
        self.unavailable: dict[str, str] = {}
        loaded: dict[str, nn.Module] = {}
        for name in NETWORK_METRICS:
            if name not in wanted:
                continue
            try:
                loaded[name] = _load_network(name, networks).to(device).eval()
            except WeightsMissingError as exc:
                self.unavailable[name] = str(exc)
            except (ImportError, InputError) as exc:  # a network or registry entry not installed
                self.unavailable[name] = f"its network is not part of this installation ({exc})"
        self.lpips = loaded.get("lpips")
        self.identity = CSIM(loaded["csim"], batch_size) if "csim" in loaded else None
        self.fid = FID(loaded["fid"], batch_size) if "fid" in loaded else None
        self.fvd = FVD(loaded["fvd"]) if "fvd" in loaded else None
        self.per_frame: dict[str, list[float]] = {n: [] for n in PIXEL_METRICS if n in wanted}
        self.per_frame.update({name: [] for name in ("lpips", "csim") if name in loaded})

    @torch.no_grad()
    def add(
        self,
        batch: list[tuple[np.ndarray, np.ndarray]],
        landmarks: list[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        """Score a batch of frame pairs; ``landmarks`` are each pair's face meshes (NaN
        where no face was found), or None when faces are not tracked and CSIM is computed
        on whole frames."""
        pred = _to_tensor([a for a, _ in batch], self.device)
        target = _to_tensor([b for _, b in batch], self.device)
        try:
            for name, metric in (("l1_255", l1_255), ("psnr", psnr), ("ssim", ssim)):
                if name in self.per_frame:
                    self.per_frame[name] += metric(pred, target).tolist()
            if self.lpips is not None:
                self.per_frame["lpips"] += self.lpips(pred, target).tolist()
        except ValueError as exc:  # frames too small for SSIM's window or LPIPS's pooling
            raise InputError(str(exc)) from exc
        if self.identity is not None:
            self.per_frame["csim"] += _identity_similarities(self.identity, pred, target, landmarks)
        if self.fid is not None:
            self.fid.update(pred, real=False)
            self.fid.update(target, real=True)
        if self.fvd is not None:
            self.fvd.update_frames(pred, real=False)
            self.fvd.update_frames(target, real=True)

    def results(self) -> tuple[dict[str, float], dict[str, str]]:
        """Means of the per-frame metrics and the set metrics; (values, unavailable)."""
        unavailable: dict[str, str] = {}
        if self.identity is not None and not self.per_frame["csim"]:
            unavailable["csim"] = (
                "no frame pair where the tracker found a face in both pred and target, so no "
                "face to align for ArcFace"
            )
        values = {name: float(np.mean(v)) for name, v in self.per_frame.items() if v}
        for name, accumulator in (("fid", self.fid), ("fvd", self.fvd)):
            if accumulator is not None:
                try:
                    values[name] = accumulator.compute()
                except ValueError as exc:  # too few frames or clips for a covariance
                    unavailable[name] = str(exc)
        return values, unavailable


def evaluate_pairs(
    pred: str | Path,
    target: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    out: str | Path | None = None,
    max_frames: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    expression_basis: str | Path | None = None,
    networks: Mapping[str, nn.Module] | None = None,
    device: str | torch.device = "cpu",
    tracking: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the frames at ``pred`` against those at ``target`` (see the module docstring).

    Each path is a folder of images, compared pairwise in file-name order (the two folders
    must hold the same file names), or a video file; a folder can be compared with a video.
    Both must have the same number of frames (the first ``max_frames`` when given) of the
    same size; otherwise :class:`~neuralhead.errors.InputError` says what differs.

    ``metrics`` picks a subset of :data:`PAIRED_METRICS` (default: all). ``networks`` maps
    ``"lpips"``, ``"fid"``, ``"csim"`` or ``"fvd"`` to a network used instead of loading the
    published weights (a custom or test network with the same call signature). The report
    is returned, and written as JSON to ``out`` when given (atomically); a progress bar goes
    to stderr unless ``progress`` is false.

    ``tracking=False`` skips the face tracker: the tracked metrics are then unavailable and
    CSIM compares whole frames, unaligned (``csim_aligned`` is false in the report), which
    is only meaningful for frames that are already face crops aligned as ArcFace expects.
    """
    wanted = list(PAIRED_METRICS if metrics is None else dict.fromkeys(metrics))
    unknown = [name for name in wanted if name not in PAIRED_METRICS]
    if unknown:
        raise InputError(
            f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(PAIRED_METRICS)}"
        )
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"max_frames must be at least 1, got {max_frames}")
    basis_path = Path(expression_basis) if expression_basis is not None else None
    if basis_path is not None and not basis_path.is_file():
        raise InputError(f"expression basis {basis_path} not found")

    pred_source, target_source = FrameSource(pred), FrameSource(target)
    _check_names(pred_source, target_source)

    scores = _Scores(wanted, networks, batch_size, device)
    unavailable = dict(scores.unavailable)
    tracked = [name for name in TRACKED_METRICS if name in wanted]
    # Why CSIM, if computed, compares whole frames rather than aligned faces.
    unaligned_reason: str | None = None
    if not tracking:
        unavailable.update(dict.fromkeys(tracked, "face tracking is disabled"))
        tracked, unaligned_reason = [], "face tracking is disabled"
    tracks: list[_LandmarkTrack] = []
    if tracked or (tracking and scores.identity is not None):
        try:
            tracks = [_LandmarkTrack(keep=bool(tracked)) for _ in range(2)]
        except NeuralheadError as exc:  # mediapipe is missing
            unavailable.update(dict.fromkeys(tracked, str(exc)))
            tracked, unaligned_reason = [], str(exc)

    expected = pred_source.num_frames or target_source.num_frames
    if expected is not None and max_frames is not None:
        expected = min(expected, max_frames)
    count, size = 0, (0, 0)
    with contextlib.ExitStack() as stack:
        for track in tracks:
            stack.callback(track.close)
        bar = stack.enter_context(
            tqdm(
                total=expected,
                desc="evaluating",
                unit="frame",
                file=sys.stderr,
                disable=not progress,
            )
        )
        pairs = stack.enter_context(
            contextlib.closing(_pairs(pred_source, target_source, max_frames))
        )
        batch: list[tuple[np.ndarray, np.ndarray]] = []
        landmarks: list[tuple[np.ndarray, np.ndarray]] = []
        for a, b in pairs:
            size = a.shape[:2]
            count += 1
            batch.append((a, b))
            if tracks:
                landmarks.append((tracks[0].add(a), tracks[1].add(b)))
            if len(batch) == batch_size:
                scores.add(batch, landmarks if tracks else None)
                batch, landmarks = [], []
            bar.update(1)
        if batch:
            scores.add(batch, landmarks if tracks else None)

    values, set_unavailable = scores.results()
    unavailable.update(set_unavailable)
    report: dict[str, Any] = {
        "pred": str(pred_source.path),
        "pred_kind": pred_source.kind,
        "target": str(target_source.path),
        "target_kind": target_source.kind,
        "num_frames": count,
        "size": [int(size[1]), int(size[0])],
    }
    if tracked:
        tracked_values, report["tracking"], tracked_unavailable = _tracked_metrics(
            tracks[0].landmarks(), tracks[1].landmarks(), tracked, basis_path
        )
        values.update(tracked_values)
        unavailable.update(tracked_unavailable)
    if scores.identity is not None:
        report["csim_frames"] = len(scores.per_frame["csim"])
        report["csim_aligned"] = bool(tracks)
        if not tracks:
            report["csim_unaligned_reason"] = unaligned_reason
    report["metrics"] = {name: values[name] for name in PAIRED_METRICS if name in values}
    report["unavailable"] = {n: unavailable[n] for n in PAIRED_METRICS if n in unavailable}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, report)
        report["json"] = str(out)
    return report


def _identity_similarities(
    identity: CSIM,
    pred: torch.Tensor,
    target: torch.Tensor,
    landmarks: list[tuple[np.ndarray, np.ndarray]] | None,
) -> list[float]:
    """CSIM of a batch of frame pairs: of the faces aligned with each image's own face mesh,
    for the pairs with a face in both, or of the whole frames when ``landmarks`` is None."""
    if landmarks is None:
        return identity.update(pred, target).tolist()
    # A pair without a face on either side is skipped: there is nothing to align, and
    # ArcFace's embedding of a face-less frame says nothing about identity.
    faces = [
        i for i, (a, b) in enumerate(landmarks) if not (np.isnan(a).any() or np.isnan(b).any())
    ]
    if not faces:
        return []
    meshes = torch.from_numpy(np.stack([np.stack(landmarks[i]) for i in faces]))
    index = torch.tensor(faces, device=pred.device)
    values = identity.update(
        pred[index],
        target[index],
        pred_points=five_points_from_mesh(meshes[:, 0]),
        target_points=five_points_from_mesh(meshes[:, 1]),
    )
    return values.tolist()


def _to_tensor(frames: list[np.ndarray], device: str | torch.device) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(frames)).to(device)
    return batch.permute(0, 3, 1, 2).float() / 255.0


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of a report from :func:`evaluate_pairs`."""
    width, height = report["size"]
    lines = [
        f"pred:   {report['pred']} ({report['pred_kind']})",
        f"target: {report['target']} ({report['target_kind']})",
        f"{report['num_frames']} frame pairs at {width}x{height}",
        f"{'metric':<26}{'value':>12}  better",
    ]
    for name, value in report["metrics"].items():
        better = "higher" if METRICS[name].higher_is_better else "lower"
        lines.append(f"{name:<26}{_cell(value):>12}  {better}")
    tracking = report.get("tracking")
    if tracking:
        lines.append(
            f"tracking: face found in {tracking['face_found_pred']:.0%} of pred and "
            f"{tracking['face_found_target']:.0%} of target frames; tracked metrics over "
            f"{tracking['frames_compared']} frames"
        )
    if "csim_frames" in report:
        if report["csim_aligned"]:
            lines.append(
                f"csim: faces aligned to ArcFace's five-point template, over "
                f"{report['csim_frames']} frame pairs with a face in both"
            )
        else:
            lines.append(
                f"csim: whole frames, not aligned ({report['csim_unaligned_reason']}); "
                "only meaningful for aligned face crops"
            )
    # Metrics sharing a cause (the tracked ones without a face) share one line.
    by_reason: dict[str, list[str]] = {}
    for name, reason in report["unavailable"].items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        lines.append(f"{', '.join(names)}: unavailable ({reason})")
    if "json" in report:
        lines.append(f"metrics: {report['json']}")
    return "\n".join(lines)


def _cell(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.4g}"
