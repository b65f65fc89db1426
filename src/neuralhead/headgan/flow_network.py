"""HeadGAN's dense flow network F (Sec. 3.3 "Dense flow network", App. C.1, Table 4).

F encodes the reference image together with its 3D face render into visual feature maps at
three scales h(1), h(2), h(3), and decodes a dense flow w_t from them, guided by the driving
renders x_{t-2:t} through SPADE blocks. The flow warps the three feature maps and the
reference image towards the driving head pose and expression; the warped features condition
the rendering network R and the warped image is supervised directly (App. B, Eq. 8).

Flow units: ``flow`` is ``(B, 2, H, W)`` holding ``(dx, dy)`` in pixels of the full-resolution
image, backward: ``warped[y, x] = reference[y + dy, x + dx]`` (bilinear; positions outside the
frame repeat the border pixel, our choice, so that content pulled in from outside does not
turn black). For the feature map at half and quarter resolution the flow is average-pooled to
that size and its displacements halved and quartered (authors' code), so every level moves the
same content: :func:`neuralhead.geometry.resize_flow_2d` with ``mode="area"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from neuralhead.geometry import resize_flow_2d, warp_image_by_flow_2d
from neuralhead.headgan.config import initialize_weights
from neuralhead.nn.blocks import PixelShuffleUpsample, SPADEBlock, check_input, make_conv

#: How warps sample outside the frame (see the module docstring).
WARP_PADDING = "border"


class FeatureEncoder(nn.Module):
    """The three-level encoder of Tables 4 and 5: ``(B, C, H, W)`` -> h(1), h(2), h(3).

    A 7x7 conv to ``base_channels``, then two 3x3 stride-2 convs multiplying the channels by
    4 each (32 -> 128 -> 512 at 256x256 gives 256^2, 128^2 and 64^2 maps), each followed by
    instance norm (no affine parameters, as in SPADE's encoders; our reading) and ReLU.
    ``forward`` returns the three feature maps, finest first.
    """

    def __init__(self, in_channels: int, base_channels: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        widths = (base_channels, 4 * base_channels, 16 * base_channels)
        self.levels = nn.ModuleList(
            nn.Sequential(
                make_conv(2, c_in, c_out, kernel, stride=stride),
                nn.InstanceNorm2d(c_out, affine=False),
                nn.ReLU(),
            )
            for c_in, c_out, kernel, stride in (
                (in_channels, widths[0], 7, 1),
                (widths[0], widths[1], 3, 2),
                (widths[1], widths[2], 3, 2),
            )
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(x, name="FeatureEncoder", channels=self.in_channels, spatial_dims=2)
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


@dataclass
class FlowOutput:
    """What :class:`DenseFlowNetwork` returns; feature lists are finest first (h(1), h(2), h(3))."""

    flow: torch.Tensor  # (B, 2, H, W): (dx, dy) in pixels, already multiplied by the mask
    mask: torch.Tensor  # (B, 1, H, W) in [0, 1]
    features: list[torch.Tensor]  # h(1), h(2), h(3) of the reference
    warped_features: list[torch.Tensor]  # the same, warped by the flow
    warped_image: torch.Tensor  # (B, 3, H, W): the reference image warped by the flow


class DenseFlowNetwork(nn.Module):
    """F of HeadGAN (Table 4): reference image + render and driving renders -> flow and warps.

    Encoder: :class:`FeatureEncoder` on the channel concatenation (reference render, reference
    image), 6 channels. Decoder: ``num_blocks`` SPADE blocks at the bottleneck (3 in Table 4),
    a PixelShuffle (channels / 4, size x 2), one SPADE block, a PixelShuffle; every SPADE block
    is conditioned on the driving stack resized to its size (nearest, as in SPADE). Heads: a
    7x7 conv to the 2-channel flow and a 7x7 conv to a mask ``(tanh + 1) / 2`` that multiplies
    the flow (authors' code), both straight after the last PixelShuffle as in Table 4.

    The PixelShuffles have no convolution of their own: the tables' channel counts fall by
    exactly 4 at each one, and the SPADE block before each ends with a convolution already.
    """

    def __init__(
        self,
        *,
        base_channels: int = 32,
        driving_channels: int = 9,
        image_channels: int = 3,
        render_channels: int = 3,
        num_blocks: int = 3,
        hidden_channels: int = 256,
        spectral_norm: bool = True,
        init_gain: float = 0.02,
    ) -> None:
        super().__init__()
        c1, c2, c3 = base_channels, 4 * base_channels, 16 * base_channels
        self.encoder = FeatureEncoder(image_channels + render_channels, base_channels)

        def spade(channels: int) -> SPADEBlock:
            return SPADEBlock(
                channels, driving_channels, hidden_channels=hidden_channels, spectral_norm=False
            )

        self.bottleneck = nn.ModuleList(spade(c3) for _ in range(num_blocks))
        self.up1 = PixelShuffleUpsample(c3, c2, use_conv=False)
        self.block2 = spade(c2)
        self.up2 = PixelShuffleUpsample(c2, c1, use_conv=False)
        self.flow_head = make_conv(2, c1, 2, 7)
        self.mask_head = make_conv(2, c1, 1, 7)
        initialize_weights(
            self,
            gain=init_gain,
            spectral_norm=spectral_norm,
            exclude=(self.flow_head, self.mask_head),
        )

    def forward(
        self,
        reference_image: torch.Tensor,
        reference_render: torch.Tensor,
        driving: torch.Tensor,
    ) -> FlowOutput:
        """Reference image and render ``(B, 3, H, W)``, driving stack ``(B, 9, H, W)``.

        ``H`` and ``W`` must be multiples of 4. Shapes are checked by the caller
        (:class:`~neuralhead.headgan.generator.HeadGANGenerator`) and by the blocks.
        """
        features = self.encoder(torch.cat([reference_render, reference_image], dim=1))
        x = features[-1]
        for block in self.bottleneck:
            x = block(x, driving)
        x = self.up2(self.block2(self.up1(x), driving))
        mask = (torch.tanh(self.mask_head(x)) + 1) / 2
        flow = self.flow_head(x) * mask
        warped_features = [warp_features(f, flow) for f in features]
        warped_image = warp_image_by_flow_2d(reference_image, flow, padding_mode=WARP_PADDING)
        return FlowOutput(flow, mask, features, warped_features, warped_image)


def warp_features(features: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Warp a feature map by a full-resolution pixel flow, resized to the map (see module doc)."""
    if features.shape[-2:] != flow.shape[-2:]:
        flow = resize_flow_2d(flow, tuple(features.shape[-2:]), mode="area")
    return warp_image_by_flow_2d(features, flow, padding_mode=WARP_PADDING)
