"""Image augmentation for training the MegaPortraits base model (App. B.1).

Two augmentations, both drawn from an explicit :class:`torch.Generator` so that a step's
augmentation is a function of its seed (a resumed run sees the same images):

* :class:`PairAugmentation`, for the source and target frames: "color jitter and random
  flip" (B.1). One draw is shared by the source and the target of a pair (our choice): the
  target's colours must stay predictable from the source, whose appearance is what the
  model renders.
* :class:`DriverAugmentation`, for the driver before the motion encoder E_mtn: after "a
  center crop around the face" (the expression encoder's own pose-aligned crop, so that
  training sees the crops inference sees), a random warp that "severely degrades the shape
  of the facial features, yet keeps the expression intact", then "a severe color jitter"
  (B.1). The paper names a thin-plate-spline warp; the authors' code (implementation notes)
  uses an elastic grid warp, random offsets at 9 x 9 control points with a standard
  deviation of a tenth of the spacing between them, smoothly interpolated, plus occasional
  greyscale. We follow the code.

Images are float ``(B, 3, H, W)`` in [0, 1] in and out; landmarks are ``(B, K, 2 or 3)`` in
the images' pixels (x, y first), the image spanning ``[0, W] x [0, H]`` as the tracker
writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from neuralhead.errors import InputError
from neuralhead.geometry import offset_to_grid, warp_image_2d

#: Rec. 601 luma weights, the grey level that saturation and greyscale work with.
_LUMA = (0.299, 0.587, 0.114)


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"{name} must have shape (B, 3, H, W), got {tuple(images.shape)}")


def _uniform(
    batch: int, low: float, high: float, generator: torch.Generator | None
) -> torch.Tensor:
    return low + (high - low) * torch.rand(batch, generator=generator)


def _grey(images: torch.Tensor) -> torch.Tensor:
    weights = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class ColorJitter:
    """Random brightness, contrast, saturation and hue, one draw per image.

    Factors are drawn uniformly from ``[1 - x, 1 + x]`` for brightness, contrast and
    saturation and the hue is rotated by up to ``hue`` turns, in that order, as
    torchvision's ``ColorJitter`` defines them (brightness scales the values, contrast and
    saturation blend with the image's mean grey and with each pixel's grey, hue turns the
    chroma in YIQ space). ``grayscale_probability`` then turns an image grey.
    """

    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    grayscale_probability: float = 0.0

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"{name} jitter must lie in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise InputError(f"hue jitter must lie in [0, 0.5] turns, got {self.hue}")
        if not 0 <= self.grayscale_probability <= 1:
            raise InputError(
                f"grayscale_probability must lie in [0, 1], got {self.grayscale_probability}"
            )

    def draw(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Parameters ``(B, 5)``: brightness, contrast, saturation factors, hue turns, grey flag."""
        return torch.stack(
            [
                _uniform(batch, 1 - self.brightness, 1 + self.brightness, generator),
                _uniform(batch, 1 - self.contrast, 1 + self.contrast, generator),
                _uniform(batch, 1 - self.saturation, 1 + self.saturation, generator),
                _uniform(batch, -self.hue, self.hue, generator),
                (torch.rand(batch, generator=generator) < self.grayscale_probability).float(),
            ],
            dim=1,
        )

    @staticmethod
    def apply(images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """Jitter ``images`` with parameters from :meth:`draw` (the same ones may serve a pair)."""
        _check_images(images)
        p = parameters.to(images).view(-1, 5, 1, 1)
        if p.shape[0] != images.shape[0]:
            raise InputError(f"{p.shape[0]} jitter draws for a batch of {images.shape[0]}")
        brightness, contrast, saturation, hue, grey = p.unbind(dim=1)
        x = (images * brightness[:, None]).clamp(0, 1)
        mean = _grey(x).mean(dim=(2, 3), keepdim=True)
        x = ((x - mean) * contrast[:, None] + mean).clamp(0, 1)
        luma = _grey(x)
        x = ((x - luma) * saturation[:, None] + luma).clamp(0, 1)
        x = _rotate_hue(x, hue * 2 * math.pi).clamp(0, 1)
        return torch.where(grey[:, None] > 0.5, _grey(x).expand_as(x), x)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.apply(images, self.draw(images.shape[0], generator))


def _rotate_hue(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Turn the chroma (I, Q) of YIQ by ``angle`` ``(B, 1, 1)`` radians, keeping the luma."""
    to_yiq = images.new_tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]]
    )
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, images)
    cos, sin = angle.cos(), angle.sin()
    i = yiq[:, 1] * cos - yiq[:, 2] * sin
    q = yiq[:, 1] * sin + yiq[:, 2] * cos
    rotated = torch.stack([yiq[:, 0], i, q], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), rotated)


def flip_landmarks(landmarks: torch.Tensor, width: int) -> torch.Tensor:
    """Landmarks of the horizontally mirrored image: ``x -> width - x``.

    Indices keep their points, so the mesh's "left eye" then lies on the image's other side;
    the losses that read eye positions take them from the same landmarks for prediction and
    target, so both stay consistent.
    """
    flipped = landmarks.clone()
    flipped[..., 0] = width - landmarks[..., 0]
    return flipped


@dataclass(frozen=True)
class PairAugmentation:
    """B.1's source / target augmentation: colour jitter and a random horizontal flip.

    :meth:`draw` makes one set of parameters per pair; :meth:`apply` applies it to any image
    of the pair (source or target), to masks (flip only) and to landmarks (flip only).
    Strengths are our choice (the paper gives none).
    """

    jitter: ColorJitter = ColorJitter()
    flip_probability: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.flip_probability <= 1:
            raise InputError(f"flip_probability must lie in [0, 1], got {self.flip_probability}")

    def draw(self, batch: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        flip = torch.rand(batch, generator=generator) < self.flip_probability
        return {"flip": flip, "jitter": self.jitter.draw(batch, generator)}

    @staticmethod
    def apply(
        parameters: dict[str, torch.Tensor],
        images: torch.Tensor,
        masks: torch.Tensor | None = None,
        landmarks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(images, masks, landmarks)`` augmented by ``parameters`` (``None`` stays ``None``)."""
        _check_images(images)
        flip = parameters["flip"].to(images.device)
        images = ColorJitter.apply(images, parameters["jitter"])
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        if masks is not None:
            masks = torch.where(flip.view(-1, 1, 1, 1), masks.flip(-1), masks)
        if landmarks is not None:
            flipped = flip_landmarks(landmarks, images.shape[-1])
            landmarks = torch.where(flip.to(landmarks.device).view(-1, 1, 1), flipped, landmarks)
        return images, masks, landmarks


def elastic_warp(
    images: torch.Tensor,
    *,
    grid_size: int = 9,
    sigma: float = 0.1,
    generator: torch.Generator | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Warp each image by random offsets of a ``grid_size`` x ``grid_size`` lattice.

    The control points span the image corner to corner; their offsets are normal with
    standard deviation ``sigma`` times the spacing between them, and are interpolated
    bicubically to every pixel. ``offsets`` ``(B, 2, g, g)`` in that spacing's units replace
    the random draw. Parts moved in from outside repeat the border.
    """
    _check_images(images)
    if grid_size < 2:
        raise InputError(f"an elastic warp needs a lattice of at least 2 x 2, got {grid_size}")
    batch, _, height, width = images.shape
    if offsets is None:
        offsets = sigma * torch.randn(batch, 2, grid_size, grid_size, generator=generator)
    spacing = 2.0 / (grid_size - 1)
    dense = F.interpolate(
        offsets.to(images) * spacing, size=(height, width), mode="bicubic", align_corners=True
    )
    grid = offset_to_grid(dense.permute(0, 2, 3, 1))
    return warp_image_2d(images, grid, padding_mode="border")


@dataclass(frozen=True)
class DriverAugmentation:
    """B.1's driver pre-processing before the expression encoder: elastic warp, severe jitter.

    It is applied to the face crop the expression encoder sees (the pose-aligned crop of
    :meth:`~neuralhead.megaportraits.motion_encoder.ExpressionEncoder.crop`, B.1's "center
    crop around the face"). ``warp_grid`` and ``warp_sigma`` are the authors' 9 x 9 lattice
    and a tenth of a cell; ``jitter`` is "severe" (our strengths) with occasional greyscale.
    """

    warp_grid: int = 9
    warp_sigma: float = 0.1
    jitter: ColorJitter = ColorJitter(
        brightness=0.5, contrast=0.5, saturation=0.6, hue=0.15, grayscale_probability=0.1
    )

    def __call__(
        self, crops: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Augmented face crops, same shape as ``crops`` ``(B, 3, S, S)``, in [0, 1]."""
        _check_images(crops, "crops")
        warped = elastic_warp(
            crops, grid_size=self.warp_grid, sigma=self.warp_sigma, generator=generator
        )
        return self.jitter(warped, generator).clamp(0, 1)
