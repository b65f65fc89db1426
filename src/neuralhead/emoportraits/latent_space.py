"""The latent expression space of EMOPortraits: PCA, AUC_z, the mouth basis and its loss.

* :class:`ExpressionPCA` and :func:`explained_variance` / :func:`auc_z` follow Eq. 1 of the
  main paper (Sec. 4.1): the expression codes ``z`` are standardised per dimension, the
  covariance ``1/(n-1) Z_std^T Z_std`` is eigen-decomposed, its eigenvalues sorted in
  descending order give the explained variances ``EV_i``, and ``AUC_z``, the area under
  their cumulative curve, measures how collapsed the space is: about 1/2 for codes spread
  evenly over all dimensions, 1 for codes on a single line (:func:`auc_z`).
* :func:`mouth_basis` builds the mouth set ``Z_m`` of Sec. 5.2 from one video whose upper
  face is held still (:func:`freeze_upper_face`) and fits its PCA; :func:`pca_loss` is the
  mouth PCA loss of Eq. 6 on its first ``n`` components.
* :func:`analyse` writes the numbers and the plot of Fig. 3 for prepared datasets.
* :func:`component_effects` and :func:`write_component_figure` answer Fig. 8's question,
  which principal components move the mouth, by rendering a source along each and measuring
  the change in its mouth and eye regions.
* :func:`add_analyse_arguments` / :func:`run_analyse`, :func:`add_mouth_basis_arguments` /
  :func:`run_mouth_basis` and :func:`add_components_arguments` / :func:`run_components` are
  the command-line entry points.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import safe_open

from neuralhead.data.dataset import PortraitDataset
from neuralhead.data.format import DatasetFiles
from neuralhead.emoportraits.losses import landmark_region_masks
from neuralhead.errors import InputError, NoFaceError
from neuralhead.fileio import save_safetensors_atomic, write_atomic, write_json_atomic
from neuralhead.megaportraits.base_model import DriverMotion, MegaPortraitsBase, Pose
from neuralhead.nn.blocks import check_input
from neuralhead.tracking.mediapipe_backend import FaceMeshTracker
from neuralhead.tracking.topology import (
    LEFT_EYE_CORNERS,
    NOSE_TIP,
    NUM_LANDMARKS,
    RIGHT_EYE_CORNERS,
)
from neuralhead.training.cli_args import positive_int
from neuralhead.visualize import grid, label, to_uint8

#: ``format`` entry of the metadata of a saved :class:`ExpressionPCA`.
PCA_FORMAT = "neuralhead-expression-pca"
PCA_VERSION = 1

#: Mesh points of the upper face that barely move with expression (our selection): the eye
#: corners (33, 133, 263, 362), the nose bridge (168, 6, 197) and the forehead (10, 151, 9,
#: 109, 338, 67, 297). Eyebrows and eyelids are left out: they move with the expression.
UPPER_FACE_ANCHORS = (33, 133, 263, 362, 168, 6, 197, 10, 151, 9, 109, 338, 67, 297)

#: Where :func:`upper_face_mask` cuts the face and how wide its soft edge is, in eye widths
#: (our choices: the cut passes below the lower lids, above the nostrils).
UPPER_FACE_CUT = 0.15
UPPER_FACE_FEATHER = 0.1

#: Cumulative explained-variance levels :func:`analyse` reports the component counts of (Fig. 3).
VARIANCE_THRESHOLDS = (0.90, 0.95, 0.99)

#: Steps along a component, in standard deviations of its coefficient, that
#: :func:`component_effects` renders (our choice: Fig. 8 shows a few steps either side of z_0).
COMPONENT_STEPS = (-2.0, -1.0, 1.0, 2.0)

#: Smallest side, in pixels, of a tile of the component figure, so that its labels fit (our
#: choice).
FIGURE_MIN_TILE = 128


# ------------------------------------------------------------------------------------------
# PCA of the expression codes (Eq. 1)


@dataclass(eq=False)
class ExpressionPCA:
    """Principal components of expression codes ``z`` (main paper Eq. 1 and Sec. 5.2).

    Attributes:
        mean: ``(d,)`` mean code of the fitted set.
        scale: ``(d,)`` per-dimension standard deviation the codes are divided by (Eq. 1's
            ``sigma(Z)``); ones when fitted without standardisation.
        components: ``(k, d)`` orthonormal rows, by decreasing explained variance.
        explained_variance: ``(k,)`` explained-variance ratios ``EV_i`` of those components
            (of the total over all ``d``, so they sum to 1 only when ``k = d``).
        eigenvalues: ``(k,)`` the eigenvalues ``lambda_i`` themselves, i.e. the variance of
            each coefficient ``PC_z(i)`` over the fitted set, or None. :meth:`fit` sets them;
            files saved before they were stored load with None, and
            :attr:`coefficient_std` then falls back to one unit per component.

    The coefficients ``PC_z(k)`` of a code are those of its standardised form
    ``(z - mean) / scale`` on the components (:meth:`project`).
    """

    mean: torch.Tensor
    scale: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    eigenvalues: torch.Tensor | None = None

    def __post_init__(self) -> None:
        d = self.mean.shape[-1] if self.mean.dim() == 1 else -1
        if d < 1:
            raise InputError(f"ExpressionPCA.mean must be (d,), got {tuple(self.mean.shape)}")
        if self.scale.shape != (d,) or not bool((self.scale > 0).all()):
            raise InputError(f"ExpressionPCA.scale must be ({d},) and positive")
        if self.components.dim() != 2 or self.components.shape[1] != d:
            raise InputError(
                f"ExpressionPCA.components must be (k, {d}), got {tuple(self.components.shape)}"
            )
        k = self.components.shape[0]
        if not 1 <= k <= d or self.explained_variance.shape != (k,):
            raise InputError(
                f"ExpressionPCA needs 1 to {d} components and one explained variance each, "
                f"got {k} and {tuple(self.explained_variance.shape)}"
            )
        if self.eigenvalues is not None and (
            self.eigenvalues.shape != (k,)
            or not bool((self.eigenvalues >= 0).all())
            or not bool(torch.isfinite(self.eigenvalues).all())
        ):
            raise InputError(
                f"ExpressionPCA.eigenvalues must be ({k},), finite and non-negative, "
                f"got shape {tuple(self.eigenvalues.shape)}"
            )

    @property
    def dim(self) -> int:
        """Length ``d`` of the codes."""
        return self.mean.shape[0]

    @property
    def num_components(self) -> int:
        """Number ``k`` of components kept."""
        return self.components.shape[0]

    @property
    def coefficient_std(self) -> torch.Tensor:
        """``(k,)`` standard deviation of each coefficient ``PC_z(i)`` over the fitted set,
        ``sqrt(lambda_i)``; ones when :attr:`eigenvalues` is unknown (older files)."""
        if self.eigenvalues is None:
            return torch.ones_like(self.explained_variance)
        return self.eigenvalues.sqrt()

    @classmethod
    def fit(
        cls, z: torch.Tensor, *, standardize: bool = True, num_components: int | None = None
    ) -> ExpressionPCA:
        """PCA of codes ``z`` ``(N, d)`` as in Eq. 1, keeping ``num_components`` (default all d).

        Computed in float64 and stored in ``z``'s floating dtype. A dimension that is constant
        over the set keeps scale 1 (dividing by its zero deviation is undefined; it carries no
        variance either way). Each component's sign is fixed so that its largest entry is
        positive, so refits of the same data agree.
        """
        if z.dim() != 2:
            raise InputError(
                f"ExpressionPCA.fit expects codes of shape (N, d), got {tuple(z.shape)}"
            )
        n, d = z.shape
        if n < 2:
            raise InputError(f"ExpressionPCA.fit needs at least 2 codes, got {n}")
        if num_components is None:
            num_components = d
        if not 1 <= num_components <= d:
            raise InputError(
                f"num_components must be between 1 and {d} (the code length), got {num_components}"
            )
        if not bool(torch.isfinite(z).all()):
            raise InputError("ExpressionPCA.fit got codes with NaN or infinite values")
        dtype = z.dtype if z.is_floating_point() else torch.float32
        z64 = z.detach().to(device="cpu", dtype=torch.float64)
        mean = z64.mean(0)
        scale = torch.ones_like(mean)
        if standardize:
            std = z64.std(0)
            scale = torch.where(std > 0, std, scale)
        centred = (z64 - mean) / scale
        eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / (n - 1))
        eigenvalues = eigenvalues.flip(0).clamp_min(0)
        components = vectors.flip(1).T[:num_components]
        total = eigenvalues.sum()
        if total <= 0:
            raise InputError(f"the {n} codes are all equal: their PCA is undefined")
        largest = components.abs().argmax(1)
        components = components * components[torch.arange(num_components), largest].sign()[:, None]
        return cls(
            mean=mean.to(dtype),
            scale=scale.to(dtype),
            components=components.to(dtype),
            explained_variance=(eigenvalues[:num_components] / total).to(dtype),
            eigenvalues=eigenvalues[:num_components].to(dtype),
        )

    def _check_codes(self, z: torch.Tensor, name: str) -> None:
        if z.dim() < 1 or z.shape[-1] != self.dim:
            raise InputError(f"{name} must be (..., {self.dim}) codes, got {tuple(z.shape)}")

    def _check_count(self, n: int) -> None:
        if not 1 <= n <= self.num_components:
            raise InputError(
                f"this PCA has {self.num_components} components; asked for {n} "
                f"(use 1 to {self.num_components})"
            )

    def _like(self, tensor: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=z.device, dtype=z.dtype)

    def project(self, z: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """The first ``n`` (default all) coefficients ``PC_z(k)`` of codes ``z`` ``(..., d)``."""
        self._check_codes(z, "project's z")
        n = self.num_components if n is None else n
        self._check_count(n)
        standardised = (z - self._like(self.mean, z)) / self._like(self.scale, z)
        return standardised @ self._like(self.components[:n], z).T

    def reconstruct(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Codes ``(..., d)`` whose first coefficients are ``coefficients`` ``(..., n)`` and the
        rest zero (exactly the inverse of :meth:`project` when all d components are kept)."""
        if coefficients.dim() < 1:
            raise InputError("reconstruct expects coefficients of shape (..., n)")
        n = coefficients.shape[-1]
        self._check_count(n)
        return self._unstandardise(coefficients) + self._like(self.mean, coefficients)

    def _unstandardise(self, coefficients: torch.Tensor) -> torch.Tensor:
        """The code offset (without the mean) of ``coefficients`` on the first components."""
        components = self._like(self.components[: coefficients.shape[-1]], coefficients)
        return (coefficients @ components) * self._like(self.scale, coefficients)

    def replace_components(
        self, z_keep: torch.Tensor, z_from: torch.Tensor, n: int
    ) -> torch.Tensor:
        """``z_keep`` with its first ``n`` coefficients replaced by those of ``z_from``.

        ``z_keep + scale * ((PC_from - PC_keep) @ components[:n])``: every other coefficient
        of ``z_keep``, and the part of it outside the kept components, is unchanged (Sec. 5.2:
        the mouth from speech, the rest of the expression from a video).
        """
        self._check_codes(z_keep, "replace_components' z_keep")
        self._check_codes(z_from, "replace_components' z_from")
        difference = self.project(z_from, n) - self.project(z_keep, n)
        return z_keep + self._unstandardise(difference)

    def save(self, path: str | os.PathLike) -> None:
        """Write the PCA as a safetensors file with its format and sizes in the metadata.

        ``eigenvalues`` is written when known; readers that predate it ignore it, so the
        format version stays 1.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "mean": self.mean,
            "scale": self.scale,
            "components": self.components,
            "explained_variance": self.explained_variance,
        }
        if self.eigenvalues is not None:
            tensors["eigenvalues"] = self.eigenvalues
        metadata = {
            "format": PCA_FORMAT,
            "version": str(PCA_VERSION),
            "dim": str(self.dim),
            "num_components": str(self.num_components),
        }
        save_safetensors_atomic(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExpressionPCA:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"expression PCA file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != PCA_FORMAT:
                    raise InputError(f"{path} is not an expression PCA file (format {PCA_FORMAT})")
                if int(metadata.get("version", 0)) > PCA_VERSION:
                    raise InputError(f"{path} was written by a newer neuralhead")
                names = ("mean", "scale", "components", "explained_variance")
                missing = [name for name in names if name not in f.keys()]
                if missing:
                    raise InputError(f"{path} lacks the tensors {', '.join(missing)}")
                optional = [name for name in ("eigenvalues",) if name in f.keys()]
                return cls(**{name: f.get_tensor(name) for name in (*names, *optional)})
        except SafetensorError as exc:
            raise InputError(f"cannot read the expression PCA file {path}: {exc}") from None


def explained_variance(z: torch.Tensor) -> torch.Tensor:
    """Explained-variance ratios ``EV_i`` ``(d,)`` of codes ``z`` ``(N, d)``, descending (Eq. 1)."""
    return ExpressionPCA.fit(z).explained_variance


def auc_z(z: torch.Tensor) -> float:
    """``AUC_z = 1/d sum_i sum_{k<=i} lambda_k / sum_j lambda_j`` of codes ``z`` (Eq. 1).

    The mean of the cumulative explained-variance curve: ``(d + 1) / (2d)`` for a space
    spread evenly over its d dimensions, 1 for codes on one line; lower is a broader space.
    """
    return float(explained_variance(z).double().cumsum(0).mean())


def pca_loss(z_i: torch.Tensor, z_j: torch.Tensor, pca: ExpressionPCA, n: int = 8) -> torch.Tensor:
    """Mouth PCA loss (Eq. 6): ``1/n sum_{k<=n} |PC_{z_i}(k) - PC_{z_j}(k)|``, batch mean.

    ``z_i``, ``z_j``: ``(B, d)`` codes, differentiable in both; ``pca`` is the mouth basis
    (:func:`mouth_basis`).
    """
    if z_i.shape != z_j.shape:
        raise InputError(
            f"pca_loss needs codes of equal shape, got {tuple(z_i.shape)} and {tuple(z_j.shape)}"
        )
    return (pca.project(z_i, n) - pca.project(z_j, n)).abs().mean()


# ------------------------------------------------------------------------------------------
# A still upper face (Sec. 5.2)


def _check_landmarks(landmarks: torch.Tensor, frames: int, name: str) -> None:
    if landmarks.dim() != 3 or landmarks.shape[-1] != 2 or landmarks.shape[0] != frames:
        raise InputError(
            f"{name} must be ({frames}, {NUM_LANDMARKS}, 2) pixel coordinates, got {tuple(landmarks.shape)}"
        )
    if landmarks.shape[1] != NUM_LANDMARKS:
        raise InputError(
            f"{name} must hold the {NUM_LANDMARKS} points of the MediaPipe face mesh "
            f"(refined, with irises), got {landmarks.shape[1]}"
        )


def _similarity(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares similarity ``target ≈ a * source + b`` of 2D points as complex numbers.

    ``source`` ``(M, 2)``, ``target`` ``(B, M, 2)``; returns complex ``a`` (scale and
    rotation) and ``b`` (translation), each ``(B,)``.
    """
    src = torch.complex(source[..., 0].double(), source[..., 1].double())
    dst = torch.complex(target[..., 0].double(), target[..., 1].double())
    src_mean, dst_mean = src.mean(-1, keepdim=True), dst.mean(-1, keepdim=True)
    src_c, dst_c = src - src_mean, dst - dst_mean
    spread = (src_c.abs() ** 2).sum(-1)
    if spread <= 0:
        raise InputError("the reference frame's upper-face landmarks all coincide")
    a = (src_c.conj() * dst_c).sum(-1) / spread
    if bool((a.abs() == 0).any()):
        raise InputError("a frame's upper-face landmarks all coincide")
    return a, (dst_mean - a[:, None] * src_mean)[:, 0]


def upper_face_mask(
    landmarks: torch.Tensor,
    height: int,
    width: int,
    *,
    cut: float = UPPER_FACE_CUT,
    feather: float = UPPER_FACE_FEATHER,
) -> torch.Tensor:
    """Soft mask ``(B, 1, H, W)`` of the upper face of mesh ``landmarks`` ``(B, 478, 2)``.

    One everywhere above a line parallel to the line through the eye corners, ``cut`` eye
    widths (the distance between the outer corners) below their centre, i.e. below the lower
    lids and through the lower nose bridge; zero below it, with a linear edge ``feather`` eye
    widths wide centred on the line. "Below" points towards the nose tip.
    """
    corners = landmarks[:, [*RIGHT_EYE_CORNERS, *LEFT_EYE_CORNERS]].double()
    centre = corners.mean(1)
    across = (
        landmarks[:, LEFT_EYE_CORNERS[0]].double() - landmarks[:, RIGHT_EYE_CORNERS[0]].double()
    )
    eye_width = across.norm(dim=-1).clamp_min(1e-6)
    down = torch.stack([-across[:, 1], across[:, 0]], -1) / eye_width[:, None]
    towards_nose = ((landmarks[:, NOSE_TIP].double() - centre) * down).sum(-1)
    down = down * torch.where(towards_nose < 0, -1.0, 1.0)[:, None]
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    pixels = torch.stack([xs, ys], -1).to(landmarks.device)
    below = torch.einsum("hwc,bc->bhw", pixels, down) - (centre * down).sum(-1)[:, None, None]
    edge = (cut * eye_width[:, None, None] - below) / (feather * eye_width[:, None, None]) + 0.5
    return edge.clamp(0, 1)[:, None].to(landmarks.dtype)


def _paste_upper_face(
    reference: torch.Tensor,
    reference_landmarks: torch.Tensor,
    frames: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    cut: float = UPPER_FACE_CUT,
    feather: float = UPPER_FACE_FEATHER,
) -> torch.Tensor:
    """``frames`` ``(B, 3, H, W)`` with the upper face of ``reference`` ``(3, H, W)`` aligned
    onto each (see :func:`freeze_upper_face`)."""
    height, width = frames.shape[-2:]
    anchors = list(UPPER_FACE_ANCHORS)
    a, b = _similarity(reference_landmarks[anchors], landmarks[:, anchors])
    # Each output pixel p samples the reference at the inverse map (p - b) / a; pixel centres
    # sit on integer coordinates, hence align_corners=True.
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    pixels = torch.complex(xs, ys).to(a.device)
    source = (pixels[None] - b[:, None, None]) / a[:, None, None]
    grid = torch.stack(
        [2 * source.real / (width - 1) - 1, 2 * source.imag / (height - 1) - 1], -1
    ).to(frames.dtype)
    # A channel of ones tells how much of each output pixel came from inside the reference.
    padded = torch.cat([reference, torch.ones_like(reference[:1])])[None].expand(
        len(frames), -1, -1, -1
    )
    warped = F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    colour, inside = warped[:, :3], warped[:, 3:]
    mask = upper_face_mask(landmarks, height, width, cut=cut, feather=feather).to(frames.dtype)
    return frames + mask * (colour - inside * frames)


def freeze_upper_face(
    frames: torch.Tensor,
    landmarks: torch.Tensor,
    reference: int = 0,
    *,
    cut: float = UPPER_FACE_CUT,
    feather: float = UPPER_FACE_FEATHER,
) -> torch.Tensor:
    """Frames with the upper face of frame ``reference`` pasted over every frame (Sec. 5.2).

    The paper builds its mouth set ``Z_m`` from a video edited to use "a still upper face from
    the first frame in all subsequent frames". Here it is automatic: for each frame a
    least-squares similarity transform maps the reference's :data:`UPPER_FACE_ANCHORS` onto the
    frame's, the reference is warped by it (bilinear), and its part above the line of
    :func:`upper_face_mask` replaces the frame's, with a feathered edge; the lower face, and
    any pixel the warped reference does not cover, stay the frame's own.

    Args:
        frames: ``(T, 3, H, W)`` images (any value range).
        landmarks: ``(T, 478, 2)`` MediaPipe face-mesh points of each frame, in pixels.
        reference: the frame whose upper face is kept.
        cut, feather: the line's distance below the eye corners and the edge's width, in eye
            widths (see :func:`upper_face_mask`).
    """
    check_input(frames, name="freeze_upper_face frames", channels=3, spatial_dims=2)
    if min(frames.shape[-2:]) < 2:
        raise InputError(
            f"freeze_upper_face needs frames of at least 2x2 pixels, got {tuple(frames.shape)}"
        )
    _check_landmarks(landmarks, len(frames), "freeze_upper_face landmarks")
    if not 0 <= reference < len(frames):
        raise InputError(f"reference frame {reference} is out of range for {len(frames)} frames")
    landmarks = landmarks.to(frames.device)
    return _paste_upper_face(
        frames[reference], landmarks[reference], frames, landmarks, cut=cut, feather=feather
    )


# ------------------------------------------------------------------------------------------
# Codes of images and datasets


def expression_codes(
    model: MegaPortraitsBase, images: torch.Tensor, batch_size: int = 16
) -> torch.Tensor:
    """Expression codes ``z`` ``(N, d)`` of ``images`` ``(N, 3, H, W)`` in [0, 1].

    E_motion as at inference: the head pose from ``model.estimate_pose``, then
    ``model.expression_encoder(image, pose)``, in eval mode (no dropout on ``z``) and without
    gradients. The model's training mode is restored afterwards; the codes are returned on
    ``images``' device.
    """
    check_input(images, name="expression_codes images", channels=3, spatial_dims=2)
    if len(images) == 0:
        raise InputError("expression_codes needs at least one image")
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    parameter = next(model.parameters())
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            codes = []
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size].to(parameter.device, parameter.dtype)
                codes.append(
                    model.expression_encoder(batch, model.estimate_pose(batch)).to(images.device)
                )
    finally:
        model.train(training)
    return torch.cat(codes)


def _spread(frames: np.ndarray, limit: int | None) -> np.ndarray:
    """At most ``limit`` of ``frames``, evenly spaced and including the first (our choice)."""
    if limit is not None and limit < 1:
        raise InputError(f"the frame limit must be positive, got {limit}")
    if limit is None or len(frames) <= limit:
        return frames
    return frames[np.unique(np.linspace(0, len(frames) - 1, limit).round().astype(int))]


def _valid_frames(
    dataset_dir: str | os.PathLike, image_size: int, max_frames: int | None
) -> tuple[PortraitDataset, np.ndarray]:
    """The reader of a prepared dataset at ``image_size`` and its chosen frames with a face
    (every split: the analyses look at all of a video)."""
    dataset = PortraitDataset(dataset_dir, "all", image_size, progress=False)
    return dataset, _spread(dataset.frames, max_frames)


def _image_batches(
    dataset: PortraitDataset, frames: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """``(frame numbers, images (B, 3, S, S) in [0, 1])`` a batch at a time."""
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        yield chunk, torch.stack([dataset.image_uint8(int(f)) for f in chunk]).float() / 255.0


def mouth_basis(
    model: MegaPortraitsBase,
    dataset_dir: str | os.PathLike,
    *,
    num_components: int | None = None,
    max_frames: int | None = None,
    batch_size: int = 16,
) -> ExpressionPCA:
    """PCA of the mouth set ``Z_m`` (Sec. 5.2) of one prepared video.

    The video should show one person moving their mouth. Every frame with a face (at most
    ``max_frames``, evenly spaced) is read at ``model.config.image_size``, gets the upper
    face of the first of them (:func:`freeze_upper_face`, with the dataset's landmarks scaled
    to that size), and is encoded (:func:`expression_codes`); the PCA of these codes, with
    standardisation as in Eq. 1, keeps ``num_components`` (default all). Frames are read a
    batch at a time; only the codes are kept.
    """
    size = int(model.config.image_size)
    dataset, frames = _valid_frames(dataset_dir, size, max_frames)
    if len(frames) < 2:
        raise InputError(
            f"{dataset_dir} has {len(frames)} frame with a face; the mouth basis needs 2 or more"
        )
    files: DatasetFiles = dataset.files
    landmarks = files.array("landmarks", mmap=False)
    if landmarks.ndim != 3 or landmarks.shape[1] != NUM_LANDMARKS:
        raise InputError(
            f"{files.root}/landmarks.npy must be (N, {NUM_LANDMARKS}, 3), got {landmarks.shape}"
        )
    landmarks = torch.from_numpy(landmarks[..., :2] * (size / files.size)).float()
    reference = int(frames[0])
    reference_image = dataset.image_uint8(reference).float() / 255.0
    codes = []
    for chunk, images in _image_batches(dataset, frames, batch_size):
        frozen = _paste_upper_face(reference_image, landmarks[reference], images, landmarks[chunk])
        codes.append(expression_codes(model, frozen, batch_size))
    return ExpressionPCA.fit(torch.cat(codes), num_components=num_components)


def _components_for(cumulative: torch.Tensor, level: float) -> int:
    """Fewest leading components whose cumulative explained variance reaches ``level``."""
    reached = torch.nonzero(cumulative >= level - 1e-9)
    return int(reached[0]) + 1 if len(reached) else len(cumulative)


def _dataset_codes(
    model: MegaPortraitsBase,
    dataset_dirs: Iterable[str | os.PathLike],
    max_frames_per_dataset: int | None,
    batch_size: int,
) -> tuple[torch.Tensor, list[dict]]:
    """Codes ``(N, d)`` of every chosen frame with a face of every dataset, and per dataset
    its path and number of frames."""
    dirs = [Path(d) for d in dataset_dirs]
    if not dirs:
        raise InputError("the expression space needs at least one prepared dataset directory")
    size = int(model.config.image_size)
    codes, datasets = [], []
    for root in dirs:
        dataset, frames = _valid_frames(root, size, max_frames_per_dataset)
        for _, images in _image_batches(dataset, frames, batch_size):
            codes.append(expression_codes(model, images, batch_size))
        datasets.append({"path": str(root), "frames": len(frames)})
    if sum(d["frames"] for d in datasets) < 2:
        raise InputError("the expression space needs at least 2 frames with a face")
    return torch.cat(codes), datasets


def analyse(
    model: MegaPortraitsBase,
    dataset_dirs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    max_frames_per_dataset: int | None = None,
    batch_size: int = 16,
) -> dict:
    """The expression space of ``model`` over prepared datasets, as in Sec. 4.1 and Fig. 3.

    Encodes every frame with a face of every dataset (at most ``max_frames_per_dataset`` each,
    evenly spaced), then computes Eq. 1: the explained-variance ratios, their cumulative
    curve, ``AUC_z`` and the number of components that reach 90, 95 and 99 % of the variance.
    Writes ``out_dir/expression_space.json`` (the returned dict), ``expression_space.png``
    (the cumulative curve and the leading ratios as bars) and ``expression_codes.safetensors``
    (the codes, for comparing models later).
    """
    z, datasets = _dataset_codes(model, dataset_dirs, max_frames_per_dataset, batch_size)
    ratios = explained_variance(z).double()
    cumulative = ratios.cumsum(0)
    result = {
        "num_frames": len(z),
        "expression_dim": z.shape[1],
        "datasets": datasets,
        "auc_z": float(cumulative.mean()),
        "components_for_variance": {
            f"{round(100 * level)}": _components_for(cumulative, level)
            for level in VARIANCE_THRESHOLDS
        },
        "explained_variance": ratios.tolist(),
        "cumulative_explained_variance": cumulative.tolist(),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "expression_space.json", result)
    save_safetensors_atomic(
        {"z": z}, out / "expression_codes.safetensors", {"datasets": json.dumps(datasets)}
    )
    _plot(result, out / "expression_space.png")
    return result


def _plot(result: dict, path: Path, *, bars: int = 32) -> None:
    """Fig. 3-style plot: cumulative explained variance (with AUC_z and the 90/95/99 % counts)
    and the explained-variance ratios of the first ``bars`` components."""
    from matplotlib.figure import Figure  # the Agg canvas; no pyplot, no global backend

    cumulative = result["cumulative_explained_variance"]
    ratios = result["explained_variance"]
    ranks = range(1, len(cumulative) + 1)
    figure = Figure(figsize=(10, 4), dpi=100)
    left, right = figure.subplots(1, 2)
    left.plot(ranks, cumulative, color="tab:blue")
    left.fill_between(ranks, cumulative, alpha=0.2, color="tab:blue")
    for level, count in result["components_for_variance"].items():
        left.axhline(int(level) / 100, color="grey", linestyle=":", linewidth=0.8)
        left.plot([count], [int(level) / 100], "o", color="tab:red", markersize=4)
        left.annotate(
            f"{level} %: {count}",
            (count, int(level) / 100),
            textcoords="offset points",
            xytext=(6, -10),
            fontsize=8,
        )
    left.set(
        xlabel="principal component",
        ylabel="cumulative explained variance",
        ylim=(0, 1.02),
        title=f"AUC_z = {result['auc_z']:.3f} ({result['num_frames']} codes)",
    )
    shown = min(bars, len(ratios))
    right.bar(range(1, shown + 1), ratios[:shown], color="tab:blue")
    right.set(
        xlabel="principal component",
        ylabel="explained variance ratio",
        title=f"first {shown} of {len(ratios)} components",
    )
    figure.tight_layout()
    figure.savefig(path)


# ------------------------------------------------------------------------------------------
# Which components move the mouth (Sec. 5.2, Fig. 8)


def _check_steps(steps: Iterable[float]) -> list[float]:
    try:
        values = sorted(float(step) for step in steps)
    except (TypeError, ValueError):
        raise InputError(f"steps must be numbers, got {steps!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise InputError(f"steps must be one or more finite numbers, got {steps!r}")
    return values


def _source_regions(
    source: torch.Tensor, landmarks: torch.Tensor | None, size: int
) -> dict[str, torch.Tensor]:
    """Eye and mouth masks ``(1, 1, S, S)`` of the source from its ``landmarks``, tracked with
    the static face mesh when not given."""
    if landmarks is None:
        with FaceMeshTracker(static=True) as tracker:
            points = tracker.process(to_uint8(source[0], (0.0, 1.0)))
        if points is None:
            raise NoFaceError(
                "no face found in the source image: give its landmarks or a source with a face"
            )
        landmarks = torch.from_numpy(points[:, :2])[None]
    elif not torch.is_tensor(landmarks) or landmarks.dim() != 3 or landmarks.shape[0] != 1:
        shape = tuple(landmarks.shape) if torch.is_tensor(landmarks) else type(landmarks).__name__
        raise InputError(
            f"landmarks must be (1, {NUM_LANDMARKS}, 2) pixels of the source, got {shape}"
        )
    masks = landmark_region_masks(landmarks, size)
    regions = {}
    for name in ("mouth", "eyes"):
        if not bool(masks[name].any()):
            raise InputError(f"the {name} of the landmarks lie outside the {size}x{size} source")
        regions[name] = masks[name].cpu()
    return regions


def _pose_batch(pose: Pose, batch: int) -> Pose:
    return {key: value.expand(batch, *value.shape[1:]) for key, value in pose.items()}


def component_effects(
    model: MegaPortraitsBase,
    source: torch.Tensor,
    pca: ExpressionPCA,
    *,
    num_components: int = 8,
    steps: Sequence[float] = COMPONENT_STEPS,
    landmarks: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> dict:
    """How much each leading principal component moves the mouth and the eyes (Sec. 5.2).

    Fig. 8 renders the source with its own code ``z_0`` moved along a principal component
    ``v_1`` and shows that a PCA of general codes moves blinks and gaze along with the mouth,
    while the mouth basis ``Z_m`` isolates the mouth. This measures it: the source is encoded
    once; for each of the first ``num_components`` components ``k`` and each step ``s`` it is
    rendered with its own pose and ``z_0`` moved so that its coefficient ``PC_z(k)`` grows by
    ``s`` times that coefficient's standard deviation ``sqrt(lambda_k)``
    (:attr:`ExpressionPCA.coefficient_std`; one coefficient unit for a PCA without
    eigenvalues), all other coefficients kept. Against the render at ``z_0``, the mean absolute
    pixel change (images in [0, 1], mean over channels) is taken inside the mouth and the eye
    masks of :func:`~neuralhead.emoportraits.losses.landmark_region_masks` and over the whole
    image, then averaged over the steps. ``mouth_share = mouth / (mouth + eyes)`` (0.5 when
    neither moves) is our summary of Fig. 8's visual judgement.

    Args:
        model: the EMOPortraits (or MegaPortraits) base model; run in eval mode without
            gradients, its training mode restored afterwards.
        source: ``(1, 3, S, S)`` in [0, 1], ``S = model.config.image_size``.
        pca: the basis whose components are tried (:func:`mouth_basis` or a PCA of general
            codes), of the model's code length.
        num_components: how many leading components to try.
        steps: the steps in standard deviations (sorted; 0 gives the ``z_0`` render again).
        landmarks: ``(1, 478, 2)`` face-mesh points of the source in pixels; tracked with
            MediaPipe's static face mesh when None (:class:`~neuralhead.errors.NoFaceError`
            without a face).
        mask: ``(1, 1, S, S)`` foreground of the source for E_app, as reenactment gives it
            (:meth:`MegaPortraitsBase.encode_source`).

    Returns:
        ``steps`` (sorted), ``step_unit`` ("standard deviation" or "coefficient"),
        ``reference_column`` (the column of the ``z_0`` render: the number of negative
        steps), ``components``: one dict per component with ``component`` (1-based, as the
        paper's ``v_1``), ``explained_variance``, ``coefficient_std``, ``mouth``, ``eyes``,
        ``overall``, ``mouth_share`` and the per-step changes ``per_step`` (``mouth``,
        ``eyes``, ``overall`` lists in the order of ``steps``); and ``renders``, a CPU tensor
        ``(K, len(steps) + 1, 3, S, S)``: per component the renders by step with the ``z_0``
        render at ``reference_column``.
    """
    size = int(model.config.image_size)
    if not torch.is_tensor(source) or tuple(source.shape) != (1, 3, size, size):
        shape = tuple(source.shape) if torch.is_tensor(source) else type(source).__name__
        raise InputError(
            f"the source must be (1, 3, {size}, {size}) in [0, 1] (config.image_size), got {shape}"
        )
    if pca.dim != model.config.expression_dim:
        raise InputError(
            f"the PCA is of {pca.dim}-dimensional codes, the model's are "
            f"{model.config.expression_dim}-dimensional"
        )
    if (
        isinstance(num_components, bool)
        or not isinstance(num_components, int)
        or not 1 <= num_components <= pca.num_components
    ):
        raise InputError(
            f"num_components must be between 1 and {pca.num_components} (the PCA's "
            f"components), got {num_components!r}"
        )
    steps = _check_steps(steps)
    if mask is not None and (not torch.is_tensor(mask) or tuple(mask.shape) != (1, 1, size, size)):
        shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise InputError(f"the source mask must be (1, 1, {size}, {size}), got {shape}")
    regions = _source_regions(source, landmarks, size)

    parameter = next(model.parameters())
    std = pca.coefficient_std[:num_components].double()
    # Coefficient offsets (K, steps, K): step s of component k moves PC_z(k) alone.
    offsets = torch.zeros(num_components, len(steps), num_components, dtype=torch.float64)
    offsets[torch.arange(num_components), :, torch.arange(num_components)] = std[
        :, None
    ] * torch.tensor(steps, dtype=torch.float64)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            state = model.encode_source(
                source.to(parameter.device, parameter.dtype),
                None if mask is None else mask.to(parameter.device, parameter.dtype),
            )
            z_0 = state.z_s
            moves = pca._unstandardise(offsets.to(z_0))
            reference = model.render(state, DriverMotion(pose=state.pose, z_d=z_0))["image"]
            renders = torch.stack(
                [
                    model.render(
                        state,
                        DriverMotion(pose=_pose_batch(state.pose, len(steps)), z_d=z_0 + move),
                    )["image"].cpu()
                    for move in moves
                ]
            ).float()
    finally:
        model.train(training)
    reference = reference.cpu().float()

    change = (renders - reference).abs().mean(2, keepdim=True)  # (K, steps, 1, S, S)
    measured = {"overall": change.mean((2, 3, 4))}
    for name, region in regions.items():
        measured[name] = (change * region).sum((2, 3, 4)) / region.sum()
    components = []
    for k in range(num_components):
        per_step = {name: measured[name][k].tolist() for name in ("mouth", "eyes", "overall")}
        mouth, eyes, overall = (float(measured[n][k].mean()) for n in ("mouth", "eyes", "overall"))
        components.append(
            {
                "component": k + 1,
                "explained_variance": float(pca.explained_variance[k]),
                "coefficient_std": float(std[k]),
                "mouth": mouth,
                "eyes": eyes,
                "overall": overall,
                "mouth_share": mouth / (mouth + eyes) if mouth + eyes > 0 else 0.5,
                "per_step": per_step,
            }
        )
    column = sum(step < 0 for step in steps)
    grid_renders = torch.cat(
        [
            renders[:, :column],
            reference[None].expand(num_components, 1, -1, -1, -1),
            renders[:, column:],
        ],
        1,
    )
    return {
        "steps": steps,
        "step_unit": "coefficient" if pca.eigenvalues is None else "standard deviation",
        "reference_column": column,
        "components": components,
        "renders": grid_renders,
    }


def _text_tile(lines: Sequence[str], size: int) -> np.ndarray:
    """A black ``size`` x ``size`` tile with white ``lines`` of text, one under the other."""
    tile = np.zeros((size, size, 3), np.uint8)
    scale = max(size / 512.0, 0.35)
    step = int(30 * scale) + 6
    for i, text in enumerate(lines):
        origin = (4, step * (i + 1))
        cv2.putText(
            tile, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA
        )
    return tile


def write_component_figure(effects: dict, path: str | os.PathLike) -> None:
    """Fig. 8-style PNG of :func:`component_effects`' result.

    One row per component: a tile naming it (``v1`` ...) with its mouth share, then its
    renders from the most negative step to the most positive, ``z0`` among them. Tiles smaller
    than :data:`FIGURE_MIN_TILE` pixels are enlarged (nearest neighbour) so that their labels
    fit.
    """
    renders = effects.get("renders")
    components = effects.get("components")
    steps = effects.get("steps")
    if (
        not torch.is_tensor(renders)
        or renders.dim() != 5
        or renders.shape[2] != 3
        or not components
        or len(components) != renders.shape[0]
        or steps is None
        or len(steps) + 1 != renders.shape[1]
    ):
        raise InputError("write_component_figure needs the result of component_effects")
    size = renders.shape[-1]
    tile = max(size, FIGURE_MIN_TILE)
    unit = " sd" if effects.get("step_unit") == "standard deviation" else ""
    titles = [f"{step:+g}{unit}" for step in steps]
    titles.insert(effects["reference_column"], "z0")
    rows = []
    for component, images in zip(components, renders):
        row = [
            _text_tile(
                [f"v{component['component']}", f"mouth share {component['mouth_share']:.2f}"], tile
            )
        ]
        for title, image in zip(titles, images):
            pixels = to_uint8(image, (0.0, 1.0))
            if size < tile:
                pixels = cv2.resize(pixels, (tile, tile), interpolation=cv2.INTER_NEAREST)
            row.append(label(pixels, title))
        rows.append(row)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(grid(rows)[:, :, ::-1]))
    if not ok:
        raise InputError(f"could not encode the component figure for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(png.tobytes()))


# ------------------------------------------------------------------------------------------
# Command line


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def add_analyse_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``analyse``: CHECKPOINT DATA_DIR... --out DIR [--max-frames N]."""
    parser.add_argument(
        "checkpoint",
        type=Path,
        metavar="CHECKPOINT",
        help="EMOPortraits (or MegaPortraits) run directory or saved model",
    )
    parser.add_argument(
        "data_dirs", type=Path, nargs="+", metavar="DATA_DIR", help="prepared datasets"
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="writes expression_space.json, expression_space.png and expression_codes.safetensors",
    )
    parser.add_argument(
        "--max-frames",
        type=positive_int,
        default=None,
        metavar="N",
        help="at most N evenly spaced frames per dataset (default all)",
    )
    _add_common(parser)


def run_analyse(args: argparse.Namespace) -> int:
    from neuralhead.emoportraits.checkpoints import load_main_model

    model = load_main_model(args.checkpoint).to(args.device)
    result = analyse(
        model,
        args.data_dirs,
        args.out,
        max_frames_per_dataset=args.max_frames,
        batch_size=args.batch_size,
    )
    counts = result["components_for_variance"]
    print(
        f"expression codes: {result['num_frames']} frames of {len(result['datasets'])} dataset(s), "
        f"{result['expression_dim']} dimensions"
    )
    print(f"AUC_z: {result['auc_z']:.4f} (lower is a broader space)")
    print("components for " + ", ".join(f"{level} %: {count}" for level, count in counts.items()))
    print(f"wrote {args.out / 'expression_space.json'} and {args.out / 'expression_space.png'}")
    return 0


def add_mouth_basis_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mouth-basis``: CHECKPOINT DATA_DIR --out FILE.safetensors [--components N]."""
    parser.add_argument(
        "checkpoint",
        type=Path,
        metavar="CHECKPOINT",
        help="EMOPortraits (or MegaPortraits) run directory or saved model",
    )
    parser.add_argument(
        "data_dir",
        type=Path,
        metavar="DATA_DIR",
        help="prepared video of one person moving their mouth (Sec. 5.2)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="PCA file (.safetensors)"
    )
    parser.add_argument(
        "--components",
        type=positive_int,
        default=None,
        metavar="N",
        help="components to keep (default all)",
    )
    parser.add_argument(
        "--max-frames",
        type=positive_int,
        default=None,
        metavar="N",
        help="at most N evenly spaced frames (default all)",
    )
    _add_common(parser)


def run_mouth_basis(args: argparse.Namespace) -> int:
    from neuralhead.emoportraits.checkpoints import load_main_model

    model = load_main_model(args.checkpoint).to(args.device)
    pca = mouth_basis(
        model,
        args.data_dir,
        num_components=args.components,
        max_frames=args.max_frames,
        batch_size=args.batch_size,
    )
    pca.save(args.out)
    leading = ", ".join(f"{100 * float(v):.1f}" for v in pca.explained_variance[:8])
    print(
        f"mouth basis: {pca.num_components} of {pca.dim} components; "
        f"explained variance of the first ones (%): {leading}"
    )
    print(f"wrote {args.out}")
    return 0


def add_components_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``components``: CHECKPOINT SOURCE_IMAGE (--basis FILE | --data DIR...)
    --out DIR [--components N] [--steps S...] [--max-frames N]."""
    parser.add_argument(
        "checkpoint",
        type=Path,
        metavar="CHECKPOINT",
        help="EMOPortraits (or MegaPortraits) run directory or saved model",
    )
    parser.add_argument(
        "source_image",
        type=Path,
        metavar="SOURCE_IMAGE",
        help="image with a face; cropped as reenactment crops its source",
    )
    basis = parser.add_mutually_exclusive_group(required=True)
    basis.add_argument(
        "--basis",
        type=Path,
        metavar="FILE",
        help="saved expression PCA (.safetensors, e.g. from mouth-basis)",
    )
    basis.add_argument(
        "--data",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="prepared datasets whose codes are fitted with a PCA, as analyse encodes them",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="writes components.json and components.png",
    )
    parser.add_argument(
        "--components",
        type=positive_int,
        default=8,
        metavar="N",
        help="leading components to try (default 8)",
    )
    parser.add_argument(
        "--steps",
        type=float,
        nargs="+",
        default=list(COMPONENT_STEPS),
        metavar="S",
        help="steps in standard deviations of each component (default -2 -1 1 2)",
    )
    parser.add_argument(
        "--max-frames",
        type=positive_int,
        default=None,
        metavar="N",
        help="with --data: at most N evenly spaced frames per dataset (default all)",
    )
    _add_common(parser)


def run_components(args: argparse.Namespace) -> int:
    from neuralhead.emoportraits.checkpoints import load_main_model
    from neuralhead.megaportraits.reenact import MegaPortraitsReenactor

    model = load_main_model(args.checkpoint).to(args.device)
    if args.basis is not None:
        pca = ExpressionPCA.load(args.basis)
        basis = {"file": str(args.basis)}
    else:
        z, datasets = _dataset_codes(model, args.data, args.max_frames, args.batch_size)
        pca = ExpressionPCA.fit(z)
        basis = {"datasets": datasets}
    source = MegaPortraitsReenactor(model, device=args.device).prepare_source(args.source_image)
    effects = component_effects(
        model,
        source.image,
        pca,
        num_components=args.components,
        steps=args.steps,
        mask=source.mask,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {key: value for key, value in effects.items() if key != "renders"}
    write_json_atomic(
        out / "components.json",
        {"checkpoint": str(args.checkpoint), "source": str(args.source_image), "basis": basis}
        | summary,
    )
    write_component_figure(effects, out / "components.png")
    for component in effects["components"]:
        print(
            f"v{component['component']}: mouth share {component['mouth_share']:.3f} "
            f"(mean change: mouth {component['mouth']:.4f}, eyes {component['eyes']:.4f}, "
            f"overall {component['overall']:.4f})"
        )
    print(f"wrote {out / 'components.json'} and {out / 'components.png'}")
    return 0
