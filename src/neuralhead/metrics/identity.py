"""CSIM: identity preservation as the cosine similarity of face-recognition embeddings.

HeadGAN (Appendix E, "Cosine Similarity") computes ArcFace (Deng et al., CVPR 2019)
embeddings of each generated frame and of the corresponding driving frame and averages
their cosine similarity over the data set; in cross-reenactment, where there is no ground
truth, every generated frame is compared with the one source image instead. MegaPortraits
(Sec. 4.3) and EmoPortraits (Sec. 6.1) report the same measure. 1 is the same identity
embedding, higher is better.

The network is :class:`neuralhead.pretrained.arcface.ArcFace` (registry entry
:data:`ARCFACE_WEIGHTS`), or any module with its call signature: RGB images ``(B, 3, H, W)``
in ``[0, 1]`` in, embeddings ``(B, D)`` out. ArcFace only ever saw faces aligned to a fixed
five-point template (:data:`ARCFACE_TEMPLATE`): its embeddings of a whole frame, or of a face
tilted, shifted or scaled away from that template, measure the framing as much as the
identity. :func:`csim` and :class:`CSIM` therefore take each image's five landmarks (eye
centres, nose tip, mouth corners; :func:`five_points_from_mesh` reads them off the project's
face mesh) and align the faces with :func:`align_faces` first. Without landmarks the images
go to the network as they are, which is only meaningful for crops already aligned that way.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.tracking.topology import (
    LEFT_EYE_LOWER,
    LEFT_EYE_UPPER,
    LEFT_IRIS_CENTER,
    MOUTH_CORNERS,
    NOSE_TIP,
    NUM_LANDMARKS,
    NUM_MESH,
    RIGHT_EYE_LOWER,
    RIGHT_EYE_UPPER,
    RIGHT_IRIS_CENTER,
)

#: Registry name of the ArcFace weights (:mod:`neuralhead.weights`).
ARCFACE_WEIGHTS = "arcface-r100-ms1mv3"

#: Images per forward pass in :class:`CSIM`; our choice, small enough for a CPU.
DEFAULT_BATCH_SIZE = 16

#: Side of the aligned crop :data:`ARCFACE_TEMPLATE` is given for.
ARCFACE_TEMPLATE_SIZE = 112
#: Where insightface puts five facial landmarks in the 112x112 crops its ArcFace models are
#: trained and evaluated on, in pixels (x right, y down, pixel centres at whole numbers as in
#: OpenCV's ``warpAffine``, which insightface warps with). The figures are the array
#: ``arcface_dst`` (``arcface_src`` in older releases) of insightface's
#: ``python-package/insightface/utils/face_align.py``, which fits a least-squares similarity
#: from a detector's five points to them. Order: the eye on the image's left (the subject's
#: right eye), the eye on the image's right, the nose tip, the mouth corner on the image's
#: left, then the one on its right.
ARCFACE_TEMPLATE: tuple[tuple[float, float], ...] = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)

# Eye centres on a 468-point mesh (no iris points): the mean of the lid contour, each point
# once (the corners open both the upper and the lower lid).
_RIGHT_EYE_CONTOUR = tuple(dict.fromkeys(RIGHT_EYE_UPPER + RIGHT_EYE_LOWER))
_LEFT_EYE_CONTOUR = tuple(dict.fromkeys(LEFT_EYE_UPPER + LEFT_EYE_LOWER))


def _check_images(images: torch.Tensor, name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected {name} as RGB images (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected {name} as float images in [0, 1], got {images.dtype}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"expected {name} in [0, 1], got values in [{float(images.min()):.3g}, "
            f"{float(images.max()):.3g}]"
        )


def _check_points(points: torch.Tensor, batch: int, name: str) -> None:
    if points.ndim != 3 or points.shape[1:] != (5, 2) or points.shape[0] != batch:
        raise ValueError(
            f"expected {name} as five (x, y) points per image, ({batch}, 5, 2), got "
            f"{tuple(points.shape)}"
        )
    if not points.is_floating_point():
        raise ValueError(f"expected {name} as float pixel coordinates, got {points.dtype}")
    if not torch.isfinite(points).all():
        raise ValueError(f"{name} holds NaN or infinite coordinates (an image without a face?)")


def _device(network: nn.Module) -> torch.device:
    parameter = next(network.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def similarity_matrix_2d(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity ``target ≈ s R source + t`` of 2D points, as ``(..., 2, 3)``.

    ``source`` and ``target`` are ``(..., N, 2)``. Umeyama's (1991) solution, in the closed
    form it takes in the plane: with the centred points and ``sR = [[a, -b], [b, a]]``, the
    error is quadratic in ``(a, b)``, so no SVD is needed and the gradient is smooth
    everywhere (:func:`neuralhead.geometry.rotation.similarity_transform` solves the 3D case).
    Reflections cannot arise in this parametrisation. The result maps a column ``(x, y, 1)``.
    """
    source_mean = source.mean(-2, keepdim=True)
    target_mean = target.mean(-2, keepdim=True)
    xs, xt = source - source_mean, target - target_mean
    spread = (xs**2).sum((-1, -2))
    a = (xs * xt).sum((-1, -2)) / spread
    b = (xs[..., 0] * xt[..., 1] - xs[..., 1] * xt[..., 0]).sum(-1) / spread
    linear = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)
    shift = target_mean.transpose(-1, -2) - linear @ source_mean.transpose(-1, -2)
    return torch.cat([linear, shift], -1)


def align_faces(
    images: torch.Tensor, points: torch.Tensor, size: int = ARCFACE_TEMPLATE_SIZE
) -> torch.Tensor:
    """Faces warped onto ArcFace's five-point template: ``(B, 3, size, size)`` in ``[0, 1]``.

    ``images`` are ``(B, 3, H, W)`` in ``[0, 1]``; ``points`` ``(B, 5, 2)`` are each image's
    eye centres, nose tip and mouth corners in its own pixels, in :data:`ARCFACE_TEMPLATE`'s
    order and convention (pixel centres at whole numbers). As insightface's ``norm_crop``
    does, a least-squares similarity (rotation, uniform scale, translation) is fitted from
    the points to the template, scaled by ``size / 112``, and the image is resampled through
    it bilinearly, black outside the image. Differentiable in the images and the points, so
    it also serves identity losses.
    """
    _check_images(images, "images")
    _check_points(points, images.shape[0], "points")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    dtype = torch.promote_types(points.dtype, torch.float32)
    template = torch.tensor(ARCFACE_TEMPLATE, dtype=dtype, device=images.device)
    forward = similarity_matrix_2d(
        points.to(device=images.device, dtype=dtype), template * (size / ARCFACE_TEMPLATE_SIZE)
    )
    # The fit runs from the points to the template, as insightface's does (the residuals are
    # weighed in template pixels); sampling needs the inverse map, crop pixel -> image pixel,
    # and the inverse of sR is its transpose over s^2.
    linear, shift = forward[..., :2], forward[..., 2:]
    inverse = linear.transpose(-1, -2) / (linear[:, :1, :1] ** 2 + linear[:, 1:, :1] ** 2)
    coords = torch.arange(size, dtype=dtype, device=images.device)
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    crop = torch.stack([u.flatten(), v.flatten()])
    source = inverse @ (crop - shift)
    height, width = images.shape[-2:]
    # grid_sample with align_corners=False puts the centre of pixel i at (2i + 1) / n - 1.
    scale = torch.tensor([2.0 / width, 2.0 / height], dtype=dtype, device=images.device)
    grid = (source + 0.5) * scale[:, None] - 1.0
    grid = grid.transpose(-1, -2).reshape(-1, size, size, 2).to(images.dtype)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Bilinear weights sum to one, but rounding can step a hair past 1.
    return warped.clamp(0.0, 1.0)


def five_points_from_mesh(landmarks: torch.Tensor) -> torch.Tensor:
    """ArcFace's five alignment points ``(B, 5, 2)`` from face-mesh landmarks.

    ``landmarks`` are ``(B, 478, 2|3)`` or ``(B, 468, 2|3)`` mediapipe face-mesh points in
    pixels (:class:`~neuralhead.tracking.mediapipe_backend.FaceMeshTracker`; only x and y
    are used). The eye centres are the iris centres where the 478-point mesh has them and
    the mean of the lid contour on the 468-point one; the nose tip and the outer mouth
    corners are single mesh points (:mod:`neuralhead.tracking.topology`). The order is
    :data:`ARCFACE_TEMPLATE`'s, left to right as seen in the image: the subject's right eye
    comes first.
    """
    if (
        landmarks.ndim != 3
        or landmarks.shape[1] not in (NUM_LANDMARKS, NUM_MESH)
        or landmarks.shape[2] not in (2, 3)
    ):
        raise ValueError(
            f"expected face-mesh landmarks (B, {NUM_LANDMARKS} or {NUM_MESH}, 2 or 3), got "
            f"{tuple(landmarks.shape)}"
        )
    xy = landmarks[..., :2]
    if landmarks.shape[1] == NUM_LANDMARKS:
        right_eye, left_eye = xy[:, RIGHT_IRIS_CENTER], xy[:, LEFT_IRIS_CENTER]
    else:
        right_eye = xy[:, _RIGHT_EYE_CONTOUR].mean(1)
        left_eye = xy[:, _LEFT_EYE_CONTOUR].mean(1)
    right_mouth, left_mouth = MOUTH_CORNERS
    return torch.stack(
        [right_eye, left_eye, xy[:, NOSE_TIP], xy[:, right_mouth], xy[:, left_mouth]], 1
    )


def identity_embeddings(images: torch.Tensor, network: nn.Module) -> torch.Tensor:
    """Unit-length identity embeddings ``(B, D)`` of images ``(B, 3, H, W)`` in ``[0, 1]``.

    The network's output is normalised again, so a module that does not normalise (an
    untrained stand-in) gives cosine similarities all the same.
    """
    _check_images(images, "images")
    embeddings = network(images.to(_device(network)))
    return F.normalize(embeddings.float(), dim=-1)


def csim(
    pred: torch.Tensor,
    target: torch.Tensor,
    network: nn.Module,
    *,
    pred_points: torch.Tensor | None = None,
    target_points: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cosine similarity of identity embeddings, one value per pair, ``(B,)`` in [-1, 1].

    ``pred`` is ``(B, 3, H, W)`` in ``[0, 1]``; ``target`` has the same shape, or one image
    ``(1, 3, H', W')`` that every ``pred`` image is compared with (HeadGAN's reenactment
    protocol, where the source image is the only reference). Gradients reach ``pred``, so the
    function also serves as an identity loss (``1 - csim``).

    ``pred_points`` ``(B, 5, 2)`` and ``target_points`` (one row per ``target`` image) are the
    five landmarks of :func:`align_faces`; the images that have them are aligned to ArcFace's
    template first, each with its own points, and may then differ in size. Images without
    points go to the network as they are: that is only meaningful for crops already aligned
    to the template.
    """
    _check_images(pred, "pred")
    _check_images(target, "target")
    if pred_points is not None:
        pred = align_faces(pred, pred_points)
    if target_points is not None:
        target = align_faces(target, target_points)
    if target.shape[0] != 1 and target.shape != pred.shape:
        raise ValueError(
            "target must have the shape of pred (after alignment) or be a single reference "
            f"image, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if target.shape == pred.shape:
        # One pass over both: half the per-call overhead of two.
        u, v = identity_embeddings(torch.cat([pred, target]), network).split(pred.shape[0])
    else:
        u, v = identity_embeddings(pred, network), identity_embeddings(target, network)
    return (u * v).sum(dim=-1)


class CSIM:
    """Running mean of :func:`csim` over batches, for evaluation scripts and training loops.

    ``update(pred, target)`` adds one similarity per pair (``batch_size`` images per forward
    pass, without gradients) and returns them; :meth:`compute` is their mean over everything
    added since construction or :meth:`reset`.
    """

    def __init__(self, network: nn.Module, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.network = network
        self.batch_size = batch_size
        self.reset()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        download: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> CSIM:
        """A :class:`CSIM` on ArcFace IResNet-100 with its released weights (an explicit
        ``path``, else the cache directory); raises
        :class:`~neuralhead.errors.WeightsMissingError` saying how to obtain the file when
        it is absent."""
        from neuralhead.pretrained.arcface import ArcFace

        return cls(ArcFace.from_pretrained(path, download=download), batch_size)

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    @torch.no_grad()
    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        *,
        pred_points: torch.Tensor | None = None,
        target_points: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add the similarities of a batch of pairs (see :func:`csim`, which also says what
        the optional five-point landmarks do); returns them, ``(B,)``."""
        # Checked whole: a short points tensor would otherwise only fail at its last chunk.
        _check_images(pred, "pred")
        _check_images(target, "target")
        if pred_points is not None:
            _check_points(pred_points, pred.shape[0], "pred_points")
        if target_points is not None:
            _check_points(target_points, target.shape[0], "target_points")
        # A single reference image (and its points) goes with every chunk.
        per_pair = target.shape[0] != 1
        chunks = []
        for start in range(0, pred.shape[0], self.batch_size):
            part = slice(start, start + self.batch_size)
            values = csim(
                pred[part],
                target[part] if per_pair else target,
                self.network,
                pred_points=None if pred_points is None else pred_points[part],
                target_points=(
                    target_points[part] if per_pair and target_points is not None else target_points
                ),
            )
            chunks.append(values.cpu())
        values = torch.cat(chunks) if chunks else torch.zeros(0)
        self.total += float(values.double().sum())
        self.count += values.numel()
        return values

    def compute(self) -> float:
        """Mean similarity over every pair added so far."""
        if self.count == 0:
            raise ValueError("CSIM: no images were added")
        return self.total / self.count
