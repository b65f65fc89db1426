"""HeadGAN's image discriminator D and mouth discriminator D_m (Sec. 3.3, App. B, App. C.2).

Both are the multi-scale PatchGAN of pix2pixHD / SPADE
(:class:`neuralhead.nn.discriminators.MultiScalePatchDiscriminator`): two scales, 4 layers,
base width 64, spectral norm and instance norm (authors' code).

- D judges a frame together with the 3D face render of the same frame: real ``(x_t, y_t)``
  against fake ``(x_t, ỹ_t)`` (Eq. 4), 3 + 3 input channels.
- D_m judges the 64x64 crop around the mouth (at 256x256; scaled in proportion at other
  sizes), with the audio feature vector tiled over the crop as 300 extra channels (Eq. 5).
  Without audio it judges the crop alone.

Outputs are those of :class:`~neuralhead.nn.discriminators.MultiScalePatchDiscriminator`: a
list over scales of lists of feature maps ending with the patch logits, which
:mod:`neuralhead.losses` and :class:`neuralhead.headgan.losses.HeadGANLoss` consume.
"""

from __future__ import annotations

import torch
from torch import nn

from neuralhead.errors import InputError
from neuralhead.geometry import warp_image_2d
from neuralhead.headgan.config import HeadGANConfig, mouth_crop_size, preset
from neuralhead.nn.discriminators import MultiScalePatchDiscriminator
from neuralhead.nn.pretrained import PretrainedModel

DiscriminatorFeatures = list[list[torch.Tensor]]


def crop_mouths(
    images: torch.Tensor, mouth_centers: torch.Tensor, size: int | None = None
) -> torch.Tensor:
    """Square crops ``(B, C, size, size)`` around the mouth of each image, differentiable.

    ``images`` ``(B, C, H, W)``; ``mouth_centers`` ``(B, 2)`` holding ``(x, y)`` in pixels,
    continuous coordinates in which pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)`` (so an
    image's centre is ``(W / 2, H / 2)``; landmarks that are normalised coordinates times the
    image size are in this convention). ``size`` defaults to 64 at 256x256, scaled in
    proportion to ``W``.

    Each centre is clamped so that the crop lies inside the image, as in the authors' code.
    The crop is sampled bilinearly (:func:`~neuralhead.geometry.warp_image_2d`), so the
    gradient reaches the images; for an even ``size`` and a whole-number centre it equals slicing
    ``images[..., y - size/2 : y + size/2, x - size/2 : x + size/2]`` exactly.
    """
    if images.dim() != 4:
        raise InputError(f"crop_mouths expects images (B, C, H, W), got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    if tuple(mouth_centers.shape) != (batch, 2):
        raise InputError(
            f"crop_mouths expects mouth_centers of shape ({batch}, 2) holding (x, y) pixels, "
            f"got {tuple(mouth_centers.shape)}"
        )
    size = mouth_crop_size(width) if size is None else size
    if not 1 <= size <= min(height, width):
        raise InputError(f"mouth crop size {size} does not fit images of {height}x{width}")
    centers = mouth_centers.to(images.dtype).detach()
    half = size / 2
    low = torch.tensor([half, half], dtype=images.dtype, device=images.device)
    high = torch.tensor([width - half, height - half], dtype=images.dtype, device=images.device)
    centers = torch.maximum(torch.minimum(centers, high), low)
    offsets = torch.arange(size, dtype=images.dtype, device=images.device) + 0.5 - half
    xs = centers[:, 0, None] + offsets  # (B, size), pixel-centre positions
    ys = centers[:, 1, None] + offsets
    grid = torch.stack(
        [
            (2 * xs / width - 1)[:, None, :].expand(batch, size, size),
            (2 * ys / height - 1)[:, :, None].expand(batch, size, size),
        ],
        dim=-1,
    )
    return warp_image_2d(images, grid, padding_mode="border")


class ImageDiscriminator(nn.Module):
    """D (Eq. 4): a multi-scale PatchGAN on the frame concatenated with its 3D face render."""

    def __init__(
        self,
        *,
        render_channels: int = 3,
        num_scales: int = 2,
        num_layers: int = 4,
        base_channels: int = 64,
        max_channels: int = 512,
    ) -> None:
        super().__init__()
        self.network = MultiScalePatchDiscriminator(
            3,
            condition_channels=render_channels,
            num_scales=num_scales,
            num_layers=num_layers,
            base_channels=base_channels,
            max_channels=max_channels,
            norm="spectral+instance",
        )

    def forward(self, image: torch.Tensor, render: torch.Tensor) -> DiscriminatorFeatures:
        """``image`` ``(B, 3, H, W)`` in [0, 1] and the render of the same frame ``(B, 3, H, W)``."""
        return self.network(image, render)


class MouthDiscriminator(nn.Module):
    """D_m (Eq. 5): a multi-scale PatchGAN on mouth crops, with the audio features tiled.

    ``audio_dim=None`` builds the plain variant for models without audio; it rejects audio.
    """

    def __init__(
        self,
        *,
        audio_dim: int | None = 300,
        num_scales: int = 2,
        num_layers: int = 4,
        base_channels: int = 64,
        max_channels: int = 512,
    ) -> None:
        super().__init__()
        self.audio_dim = audio_dim
        self.network = MultiScalePatchDiscriminator(
            3,
            condition_channels=audio_dim or 0,
            num_scales=num_scales,
            num_layers=num_layers,
            base_channels=base_channels,
            max_channels=max_channels,
            norm="spectral+instance",
        )

    def forward(
        self, mouths: torch.Tensor, audio: torch.Tensor | None = None
    ) -> DiscriminatorFeatures:
        """``mouths`` ``(B, 3, s, s)`` from :func:`crop_mouths`; ``audio`` ``(B, audio_dim)``."""
        if self.audio_dim is None and audio is not None:
            raise InputError("this mouth discriminator was built without audio; pass audio=None")
        if self.audio_dim is not None and audio is None:
            raise InputError(
                f"this mouth discriminator needs audio features ({mouths.shape[0]}, "
                f"{self.audio_dim})"
            )
        return self.network(mouths, audio)


class HeadGANDiscriminators(PretrainedModel):
    """D and (when ``config.mouth_discriminator``) D_m, saved and loaded together.

    ``forward`` runs both on one batch of frames, real or generated, and returns
    ``(image_features, mouth_features)``; ``mouth_features`` is None without D_m. Detach
    generated frames before the discriminator update (Eqs. 4-5); keep them attached for the
    generator's terms (Eq. 3 and feature matching).
    """

    config_class = HeadGANConfig

    def __init__(self, config: HeadGANConfig) -> None:
        super().__init__(config)
        c = config
        sizes = dict(
            num_scales=c.discriminator_scales,
            num_layers=c.discriminator_layers,
            base_channels=c.discriminator_channels,
            max_channels=c.discriminator_max_channels,
        )
        self.image = ImageDiscriminator(render_channels=c.render_channels, **sizes)
        self.mouth = (
            MouthDiscriminator(audio_dim=c.audio_dim if c.use_audio else None, **sizes)
            if c.mouth_discriminator
            else None
        )

    def forward(
        self,
        image: torch.Tensor,
        render: torch.Tensor,
        mouth_centers: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
    ) -> tuple[DiscriminatorFeatures, DiscriminatorFeatures | None]:
        """Judge frames ``(B, 3, H, W)`` with their current-frame renders ``(B, 3, H, W)``.

        ``mouth_centers`` ``(B, 2)`` (pixels, see :func:`crop_mouths`) are needed when D_m
        exists, and ``audio`` ``(B, audio_dim)`` when it uses audio.
        """
        image_features = self.image(image, render)
        if self.mouth is None:
            return image_features, None
        if mouth_centers is None:
            raise InputError("the mouth discriminator needs mouth_centers (B, 2) in pixels")
        mouths = crop_mouths(image, mouth_centers, self.config.mouth_crop_size)
        return image_features, self.mouth(mouths, audio)


def create_discriminators(name: str = "headgan-256", **overrides) -> HeadGANDiscriminators:
    """Freshly initialised discriminators of a named preset, with config fields overridden."""
    return HeadGANDiscriminators(preset(name, **overrides))
