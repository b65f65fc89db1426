"""The appearance encoder E_app of MegaPortraits (Sec. 3.1, Fig. 2; A.1, Fig. 9 (a)).

E_app maps the source image ``x_s`` to two appearance representations:

* the volumetric features ``v_s``: a 7x7 convolution, residual blocks that each halve the
  resolution with average pooling, GroupNorm + ReLU, a 1x1 convolution whose channels are
  reshaped into ``volume_channels x volume_depth`` and 3D residual blocks (A.1). At the
  paper's sizes (authors' code, implementation notes): 3 -> 128 -> 256 -> 512 -> 512
  channels, 1536 = 96 x 16, three 3D blocks; a 512x512 source gives ``v_s`` of shape
  ``(B, 96, 16, 64, 64)``; about 11.6M parameters.
* the global descriptor ``e_s``: "a ResNet-50 architecture with custom residual blocks"
  (A.1) on the source resized to 256x256, whose last feature map is average-pooled to 4x4
  and projected by a 1x1 convolution 2048 -> 512 (authors' code): ``(B, 512, 4, 4)``; about
  24.6M parameters. We use the standard bottleneck ResNet-50 with the base model's norms
  (GroupNorm, weight standardisation; A.1), whose parameter count matches the authors'.

Norms follow A.1: GroupNorm everywhere, weight standardisation on every convolution but the
first and the last of each path, and spectral norm on every convolution when the config
asks for it (B.1 applies it to G_base). Inputs are mapped from ``[0, 1]`` to ``[-1, 1]`` for
the volume path and ImageNet-normalised for the ResNet (our choices; the networks are trained
from scratch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.megaportraits.config import MegaPortraitsConfig
from neuralhead.nn.blocks import ResBlock2d, ResBlock3d, check_input, make_conv, make_norm
from neuralhead.nn.resnet import ResNet, imagenet_normalize


class GlobalDescriptorEncoder(nn.Module):
    """The ``e_s`` network of E_app (A.1): a ResNet-50 trunk, average pool, 1x1 conv.

    ``(B, 3, H, W)`` in ``[0, 1]`` → ``(B, descriptor_channels, descriptor_size,
    descriptor_size)``. The image is resized (bilinear, antialiased) to
    ``descriptor_image_size`` first. Pooling before the 1x1 projection gives the same result
    as projecting first (both are linear) at a fraction of the cost.
    """

    def __init__(self, config: MegaPortraitsConfig) -> None:
        super().__init__()
        self.image_size = config.descriptor_image_size
        self.size = config.descriptor_size
        self.backbone = ResNet(
            "bottleneck",
            config.descriptor_layers,
            num_classes=None,
            width=config.descriptor_width,
            norm="group",
            groups=config.norm_groups,
            weight_standardization=config.weight_standardization,
            spectral_norm=config.spectral_norm,
        )
        # The last convolution: no weight standardisation (A.1).
        self.head = make_conv(
            2,
            self.backbone.feature_channels,
            config.descriptor_channels,
            1,
            spectral_norm=config.spectral_norm,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-2:] != (self.image_size, self.image_size):
            image = F.interpolate(
                image,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        features = self.backbone.features(imagenet_normalize(image))
        return self.head(F.adaptive_avg_pool2d(features, self.size))


class AppearanceEncoder(nn.Module):
    """E_app (MegaPortraits Sec. 3.1, A.1, Fig. 9 (a)): source image → ``(v_s, e_s)``.

    ``forward(source, mask=None)`` takes ``source`` ``(B, 3, H, W)`` in ``[0, 1]``, with ``H``
    and ``W`` divisible by ``2 ** (len(config.appearance_channels) - 1)`` (8 in the presets),
    and returns ``v_s`` ``(B, volume_channels, volume_depth, H/8, W/8)`` and ``e_s``
    ``(B, descriptor_channels, descriptor_size, descriptor_size)``. The implementation notes
    compute ``e_s`` from the foreground-masked source: pass the foreground ``mask``
    ``(B, 1, H, W)`` in ``[0, 1]`` to multiply it into the descriptor's input (the volume path
    sees the source as given).
    """

    def __init__(self, config: MegaPortraitsConfig) -> None:
        super().__init__()
        widths = tuple(config.appearance_channels)
        if len(widths) < 2:
            raise InputError(
                f"appearance_channels needs the stem width and at least one block width, got {widths}"
            )
        self.volume_channels = config.volume_channels
        self.volume_depth = config.volume_depth
        self.stride = 2 ** (len(widths) - 1)
        norm = dict(norm="group", groups=config.norm_groups)
        conv = dict(
            weight_standardization=config.weight_standardization,
            spectral_norm=config.spectral_norm,
        )
        # A.1: the first convolution is not standardised.
        self.stem = make_conv(2, 3, widths[0], 7, spectral_norm=config.spectral_norm)
        self.down = nn.Sequential(
            *(ResBlock2d(a, b, downsample=2, **norm, **conv) for a, b in zip(widths, widths[1:]))
        )
        self.norm = make_norm("group", widths[-1], dims=2, groups=config.norm_groups)
        self.to_volume = make_conv(2, widths[-1], config.projection_channels, 1, **conv)
        self.volume_blocks = nn.Sequential(
            *(
                ResBlock3d(config.volume_channels, config.volume_channels, **norm, **conv)
                for _ in range(config.appearance_volume_blocks)
            )
        )
        self.descriptor = GlobalDescriptorEncoder(config)

    def encode_volume(self, source: torch.Tensor) -> torch.Tensor:
        """The volumetric features ``v_s`` of ``source`` ``(B, 3, H, W)`` in ``[0, 1]``."""
        check_input(source, name="AppearanceEncoder", channels=3, spatial_dims=2)
        height, width = source.shape[-2:]
        if height % self.stride or width % self.stride:
            raise InputError(
                f"AppearanceEncoder needs image sides divisible by {self.stride}, "
                f"got {height}x{width}"
            )
        h = self.down(self.stem(source * 2 - 1))
        h = self.to_volume(F.relu(self.norm(h)))
        volume = h.view(h.shape[0], self.volume_channels, self.volume_depth, *h.shape[-2:])
        return self.volume_blocks(volume)

    def encode_descriptor(
        self, source: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The global descriptor ``e_s`` of ``source``, masked by ``mask`` when given."""
        check_input(source, name="AppearanceEncoder", channels=3, spatial_dims=2)
        if mask is not None:
            if mask.shape != (source.shape[0], 1, *source.shape[-2:]):
                raise InputError(
                    f"AppearanceEncoder expects a mask of shape ({source.shape[0]}, 1, "
                    f"{source.shape[-2]}, {source.shape[-1]}), got {tuple(mask.shape)}"
                )
            source = source * mask
        return self.descriptor(source)

    def forward(
        self, source: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_volume(source), self.encode_descriptor(source, mask)
