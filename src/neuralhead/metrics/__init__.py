"""Evaluation metrics, callable on batched torch tensors from evaluation scripts and from
training loops alike; :mod:`neuralhead.evaluation.paired` applies them to two folders or
videos of frames.

:data:`METRICS` describes every metric; :func:`available_metrics` says which can be computed
here and why not where one cannot. A metric whose pretrained network is missing is reported
as unavailable, never replaced by a made-up number.

Pixel metrics (:mod:`.image`), LPIPS, CSIM (:mod:`.identity`), and the pose, gaze,
expression and mouth-landmark errors (:mod:`.pose`, :mod:`.landmarks`) give one value per
image; FID and FVD (:mod:`.fid`, :mod:`.fvd`) are properties of two sets and are
accumulated with ``update`` / ``compute``, as is :class:`CSIM`.
"""

from __future__ import annotations

from dataclasses import dataclass

from neuralhead import weights
from neuralhead.errors import InputError, WeightsMissingError
from neuralhead.metrics.fid import (
    FID,
    FeatureStatistics,
    fid_from_features,
    frechet_distance,
    inception_features,
)
from neuralhead.metrics.fvd import CLIP_LENGTH, FVD, I3D_WEIGHTS, video_clips
from neuralhead.metrics.identity import ARCFACE_WEIGHTS, CSIM, csim, identity_embeddings
from neuralhead.metrics.image import l1_255, psnr, ssim
from neuralhead.metrics.inception import FIDInceptionV3
from neuralhead.metrics.landmarks import mouth_landmark_distance, mouth_shape_error
from neuralhead.metrics.lpips import LPIPS
from neuralhead.metrics.pose import (
    ard_deg,
    are_deg,
    expression_distance,
    gaze_angle_deg,
    pose_distance_deg,
    rotation_angle_deg,
)


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is and what it needs.

    ``weights`` names the registry entries (:mod:`neuralhead.weights`) it loads;
    ``unsupported`` is set when this version of neuralhead cannot compute it at all.
    """

    name: str
    higher_is_better: bool
    needs_weights: bool
    description: str
    weights: tuple[str, ...] = ()
    unsupported: str | None = None


@dataclass(frozen=True)
class MetricAvailability:
    """Whether a metric can be computed here; ``reason`` says why not when it cannot."""

    name: str
    available: bool
    reason: str | None = None


METRICS: dict[str, MetricInfo] = {
    info.name: info
    for info in (
        MetricInfo("l1_255", False, False, "mean absolute error on the 0-255 scale"),
        MetricInfo("psnr", True, False, "peak signal-to-noise ratio, dB"),
        MetricInfo("ssim", True, False, "structural similarity (Wang et al. 2004)"),
        MetricInfo(
            "lpips",
            False,
            True,
            "learned perceptual distance, VGG16 v0.1 (Zhang et al. 2018)",
            weights=("vgg16-imagenet", "lpips-vgg-v0.1"),
        ),
        MetricInfo(
            "fid",
            False,
            True,
            "Frechet Inception distance (Heusel et al. 2017)",
            weights=("inception-v3-fid",),
        ),
        MetricInfo(
            "fvd",
            False,
            True,
            f"Frechet video distance on {CLIP_LENGTH}-frame clips (Unterthiner et al. 2018)",
            weights=(I3D_WEIGHTS,),
        ),
        MetricInfo(
            "csim",
            True,
            True,
            "cosine similarity of ArcFace identity embeddings (HeadGAN App. E)",
            weights=(ARCFACE_WEIGHTS,),
        ),
        MetricInfo("rotation_angle_deg", False, False, "geodesic head-rotation error, degrees"),
        MetricInfo(
            "ard_deg", False, False, "average rotation distance, L1 of Euler angles, degrees"
        ),
        MetricInfo(
            "are_deg", False, False, "average rotation error from the frontal pose, degrees"
        ),
        MetricInfo("gaze_angle_deg", False, False, "angle between gaze directions, degrees"),
        MetricInfo("expression_distance", False, False, "mean L1 between expression coefficients"),
        MetricInfo(
            "mouth_landmark_distance",
            False,
            False,
            "mean mouth-landmark distance / inter-ocular distance",
        ),
        MetricInfo(
            "mouth_shape_error",
            False,
            False,
            "MAE of frontalised mouth landmarks, corners at (-1, 0), (1, 0) (EmoPortraits)",
        ),
    )
}


def available_metrics() -> dict[str, MetricAvailability]:
    """Availability of every metric in :data:`METRICS`, keyed by name.

    A metric that needs weights is available only when all its files are present and pass
    their SHA-256 check; otherwise ``reason`` carries the loader's message, which says how to
    obtain the missing file.
    """
    result = {}
    for info in METRICS.values():
        reason = info.unsupported
        if reason is None:
            for name in info.weights:
                try:
                    weights.weights_path(name)
                # InputError: the network that registers the file is not in this install.
                except (WeightsMissingError, InputError) as exc:
                    reason = str(exc)
                    break
        result[info.name] = MetricAvailability(info.name, reason is None, reason)
    return result


__all__ = [
    "ARCFACE_WEIGHTS",
    "CLIP_LENGTH",
    "CSIM",
    "FID",
    "FIDInceptionV3",
    "FVD",
    "FeatureStatistics",
    "I3D_WEIGHTS",
    "LPIPS",
    "METRICS",
    "MetricAvailability",
    "MetricInfo",
    "ard_deg",
    "are_deg",
    "available_metrics",
    "csim",
    "expression_distance",
    "fid_from_features",
    "frechet_distance",
    "gaze_angle_deg",
    "identity_embeddings",
    "inception_features",
    "l1_255",
    "mouth_landmark_distance",
    "mouth_shape_error",
    "pose_distance_deg",
    "psnr",
    "rotation_angle_deg",
    "ssim",
    "video_clips",
]
