"""Background plate and compositing for MegaPortraits inference (Sec. 3.1, last paragraph).

MegaPortraits generates the foreground only: its losses see foreground regions alone, and
the paper imposes "the background post-training via pre-trained inpainting and matting
models": a background plate from an inpainting system (LaMa, ref. [29]) and a matte from
matting networks (refs. [11, 16]), combined "via alpha-compositing using a calculated
matte". None of those networks can be had offline, so this module substitutes:

* **Matte** (:func:`foreground_mask` + :func:`soften_mask`): mediapipe's selfie
  segmentation (:class:`~neuralhead.tracking.mediapipe_backend.ForegroundSegmenter`, the same
  soft person mask ``neuralhead prepare`` writes for training) of each generated frame,
  shrunk a little and feathered so that the flat colour the model puts around the person
  leaves no halo. A segmentation is not a true matte: hair strands and other
  semi-transparent detail get a smooth edge, not per-strand opacity.
* **Plate** (:func:`background_plate`): the source with the person removed. The person mask,
  thresholded and dilated by a margin (so the soft edge and the halo the segmenter misses
  go too), is filled by OpenCV's diffusion inpainting (Telea's fast marching method, or
  Navier-Stokes) at a reduced working resolution, up-sampled into the hole only; pixels
  outside the hole stay the source's own. Diffusion propagates the colours around the hole
  inwards: plain backgrounds (walls, backdrops, sky) fill convincingly, textured or
  structured ones (shelves, a window frame behind the person) come out as a smooth smear,
  which shows wherever the generated person does not cover the source's (head turns, the
  driver's scale and translation). A learned inpainter such as LaMa does far better there;
  any plate can be given to :class:`BackgroundCompositor` instead.
* **Composite** (:func:`composite`): ``alpha * foreground + (1 - alpha) * plate``.

Images are ``(B, 3, H, W)`` float in [0, 1] and masks ``(B, 1, H, W)`` in [0, 1] at every
function here; the OpenCV and mediapipe steps work on 8-bit copies, so plates and masks are
quantised to 1/255.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from neuralhead.errors import InputError
from neuralhead.tracking.mediapipe_backend import ForegroundSegmenter

INPAINT_METHODS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}

#: Defaults of :func:`background_plate` and :func:`soften_mask`, as fractions of the image's
#: longer side (our choices: the dilation covers the segmenter's soft edge and a few pixels
#: of halo; the matte loses about a pixel at 256 and is feathered over about as much).
PLATE_DILATION = 0.04
MATTE_SHRINK = 0.006
MATTE_FEATHER = 0.004

#: Plates are inpainted at most this many pixels on the longer side (our choice): diffusion
#: gives smooth fields whatever the resolution, and its cost grows with the hole's area.
PLATE_WORK_SIZE = 128

#: The grey of a plate when the person covers the whole image (nothing to inpaint from).
FLAT_GREY = 0.5


def _check(name: str, x: torch.Tensor, channels: int) -> None:
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise InputError(f"{name} must be a tensor of shape (B, {channels}, H, W), got {shape}")


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` in [0, 1] -> ``(H, W, C)`` uint8 (C = 1 is squeezed)."""
    array = (x.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0)
    array = array.cpu().numpy()
    return np.ascontiguousarray(array[:, :, 0] if array.shape[2] == 1 else array)


def _from_uint8(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``(H, W[, C])`` uint8 -> ``(C, H, W)`` float in [0, 1] on ``like``'s device and dtype."""
    tensor = torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)
    return tensor.to(like.device, like.dtype) / 255.0


def foreground_mask(
    images: torch.Tensor, *, segmenter: ForegroundSegmenter | None = None
) -> torch.Tensor:
    """The soft person mask ``(B, 1, H, W)`` of ``images`` ``(B, 3, H, W)``.

    mediapipe's selfie segmentation, as ``neuralhead prepare`` computes training masks.
    Pass an open ``segmenter`` to reuse it across calls; otherwise one is opened and closed.
    """
    _check("images", images, 3)
    own = segmenter is None
    segmenter = ForegroundSegmenter() if own else segmenter
    try:
        masks = [torch.from_numpy(segmenter.process(_to_uint8(image))) for image in images]
    finally:
        if own:
            segmenter.close()
    return torch.stack(masks)[:, None].to(images.device, images.dtype)


def soften_mask(
    mask: torch.Tensor, *, shrink: float = MATTE_SHRINK, feather: float = MATTE_FEATHER
) -> torch.Tensor:
    """A matte from a person mask: eroded by ``shrink`` and blurred over ``feather``.

    Both are fractions of the image's longer side (erosion radius and Gaussian sigma). The
    erosion keeps the generated frame's background colour out of the composite; the blur
    hides the segmentation's stair-steps.
    """
    _check("mask", mask, 1)
    side = max(mask.shape[-2:])
    radius = round(shrink * side)
    if radius > 0:
        mask = -F.max_pool2d(-mask, 2 * radius + 1, stride=1, padding=radius)
    sigma = feather * side
    if sigma > 0:
        half = max(1, math.ceil(3 * sigma))
        taps = torch.arange(-half, half + 1, dtype=mask.dtype, device=mask.device)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = kernel / kernel.sum()
        mask = F.pad(mask, (half, half, half, half), mode="replicate")
        mask = F.conv2d(mask, kernel.view(1, 1, 1, -1))
        mask = F.conv2d(mask, kernel.view(1, 1, -1, 1))
    return mask.clamp(0.0, 1.0)


def _fill(
    image: np.ndarray, hole: np.ndarray, method: int, radius: float, work_size: int
) -> np.ndarray:
    """``image`` (uint8 HxWx3) with the pixels where ``hole`` (bool HxW) is set inpainted."""
    height, width = hole.shape
    factor = min(1.0, work_size / max(height, width))
    small_size = (max(1, round(width * factor)), max(1, round(height * factor)))
    small = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA)
    # A small pixel that overlaps the hole at all is part of it: known pixels must be pure
    # background, not averages with the person.
    small_hole = cv2.resize(hole.astype(np.float32), small_size, interpolation=cv2.INTER_AREA) > 0
    if small_hole.all():
        return np.where(hole[..., None], np.uint8(round(255 * FLAT_GREY)), image)
    filled = cv2.inpaint(small, small_hole.astype(np.uint8), radius, method)
    filled = cv2.resize(filled, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.where(hole[..., None], filled, image)


def background_plate(
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    threshold: float = 0.5,
    dilation: float = PLATE_DILATION,
    method: str = "telea",
    radius: float = 3.0,
    work_size: int = PLATE_WORK_SIZE,
) -> torch.Tensor:
    """``image`` ``(B, 3, H, W)`` with the person of ``mask`` ``(B, 1, H, W)`` removed.

    The hole is ``mask > threshold`` dilated by ``dilation`` of the longer side; it is filled
    by OpenCV inpainting (``method`` ``"telea"`` or ``"ns"``, neighbourhood ``radius`` in
    working pixels) at most ``work_size`` pixels on the longer side (module docstring). When
    the hole covers the whole image the plate is flat grey (:data:`FLAT_GREY`).
    """
    _check("image", image, 3)
    _check("mask", mask, 1)
    if mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
        raise InputError(
            f"mask {tuple(mask.shape)} does not match image {tuple(image.shape)} "
            "(one (1, H, W) mask per image)"
        )
    if method not in INPAINT_METHODS:
        raise InputError(
            f"inpainting method must be one of {sorted(INPAINT_METHODS)}, got {method!r}"
        )
    if work_size < 8:
        raise InputError(f"work_size must be at least 8 pixels, got {work_size}")
    reach = round(dilation * max(image.shape[-2:]))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    plates = []
    for picture, person in zip(image, mask):
        hole = (person[0] > threshold).cpu().numpy().astype(np.uint8)
        if reach > 0:
            hole = cv2.dilate(hole, kernel)
        rgb = _to_uint8(picture)
        if hole.any():
            rgb = _fill(rgb, hole.astype(bool), INPAINT_METHODS[method], radius, work_size)
        plates.append(_from_uint8(rgb, picture))
    return torch.stack(plates)


def composite(
    foreground: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor
) -> torch.Tensor:
    """``alpha * foreground + (1 - alpha) * background`` (Sec. 3.1's alpha compositing).

    ``foreground`` ``(B, 3, H, W)``, ``alpha`` ``(B, 1, H, W)`` and ``background``
    ``(B, 3, H, W)``; a batch of 1 for ``alpha`` or ``background`` is shared by all images.
    """
    _check("foreground", foreground, 3)
    _check("alpha", alpha, 1)
    _check("background", background, 3)
    batch, size = foreground.shape[0], foreground.shape[-2:]
    for name, x in (("alpha", alpha), ("background", background)):
        if x.shape[-2:] != size or x.shape[0] not in (1, batch):
            raise InputError(
                f"{name} {tuple(x.shape)} does not match the foreground {tuple(foreground.shape)}"
            )
    return alpha * foreground + (1.0 - alpha) * background


class BackgroundCompositor:
    """Puts generated foregrounds onto a fixed background plate (Sec. 3.1).

    Each frame's matte is its own person mask (:func:`foreground_mask`), softened
    (:func:`soften_mask`); the plate ``(1, 3, H, W)`` is resized to the frames' size. Holds
    an open segmenter: use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        plate: torch.Tensor,
        *,
        shrink: float = MATTE_SHRINK,
        feather: float = MATTE_FEATHER,
    ) -> None:
        _check("plate", plate, 3)
        if plate.shape[0] != 1:
            raise InputError(f"the plate must be one image (1, 3, H, W), got {tuple(plate.shape)}")
        self.plate = plate
        self.shrink = shrink
        self.feather = feather
        self._segmenter: ForegroundSegmenter | None = None
        self._resized: dict[tuple[int, int], torch.Tensor] = {}

    def plate_at(self, height: int, width: int) -> torch.Tensor:
        """The plate ``(1, 3, height, width)`` (resized once per size)."""
        key = (height, width)
        if key not in self._resized:
            plate = self.plate
            if tuple(plate.shape[-2:]) != key:
                plate = F.interpolate(plate, size=key, mode="bilinear", antialias=True)
            self._resized[key] = plate.clamp(0.0, 1.0)
        return self._resized[key]

    def matte(self, foreground: torch.Tensor) -> torch.Tensor:
        """The softened person mask ``(B, 1, H, W)`` of generated frames ``(B, 3, H, W)``."""
        if self._segmenter is None:
            self._segmenter = ForegroundSegmenter()
        mask = foreground_mask(foreground, segmenter=self._segmenter)
        return soften_mask(mask, shrink=self.shrink, feather=self.feather)

    def __call__(self, foreground: torch.Tensor) -> torch.Tensor:
        """Generated frames ``(B, 3, H, W)`` composited over the plate, same shape."""
        _check("foreground", foreground, 3)
        plate = self.plate_at(*foreground.shape[-2:]).to(foreground.device, foreground.dtype)
        return composite(foreground, self.matte(foreground), plate)

    def close(self) -> None:
        if self._segmenter is not None:
            self._segmenter.close()
            self._segmenter = None

    def __enter__(self) -> BackgroundCompositor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
