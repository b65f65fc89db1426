"""HeadGAN's rendering network R (Sec. 3.3 "Rendering network", App. C.1, Table 5).

R translates the driving 3D face renders x_{t-2:t} into a photo-realistic frame of the source.
Its encoder reads the driving stack; its decoder alternates SPADE blocks, which inject the
warped reference features of matching scale and finally the warped reference image, with
AdaIN blocks, which inject the same audio feature vector at every scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.headgan.config import initialize_weights
from neuralhead.headgan.flow_network import FeatureEncoder
from neuralhead.nn.blocks import AdaINBlock, PixelShuffleUpsample, SPADEBlock, make_conv


class RenderingNetwork(nn.Module):
    """R of HeadGAN (Table 5): driving renders, warped features and audio -> image in [0, 1].

    Encoder: :class:`~neuralhead.headgan.flow_network.FeatureEncoder` on the driving stack
    down to ``16 * base_channels`` channels at a quarter of the size (512 at 64x64). Decoder,
    per level from the coarsest: a SPADE block conditioned on the warped reference features of
    that scale (h̄(3), then h̄(2), then h̄(1)), an AdaIN block with the audio features, and a
    PixelShuffle (channels / 4, size x 2; none after the finest level); then a last SPADE block
    conditioned on the warped reference image, LeakyReLU(0.2), a 7x7 conv to RGB and tanh,
    mapped to [0, 1].

    ``audio_dim=None`` builds the variant without AdaIN blocks (the paper's editing and
    frontalisation model, Sec. 4.2-4.3); it rejects audio. The RGB conv is not spectral-normalised
    (see :class:`~neuralhead.headgan.config.HeadGANConfig`).
    """

    def __init__(
        self,
        *,
        base_channels: int = 32,
        driving_channels: int = 9,
        image_channels: int = 3,
        audio_dim: int | None = 300,
        hidden_channels: int = 256,
        negative_slope: float = 0.2,
        spectral_norm: bool = True,
        init_gain: float = 0.02,
    ) -> None:
        super().__init__()
        self.audio_dim = audio_dim
        self.negative_slope = negative_slope
        widths = (16 * base_channels, 4 * base_channels, base_channels)
        self.encoder = FeatureEncoder(driving_channels, base_channels)
        spade = dict(hidden_channels=hidden_channels, spectral_norm=False)
        # Coarsest level first; each level's SPADE reads the warped features of its own width.
        self.spade_blocks = nn.ModuleList(SPADEBlock(c, c, **spade) for c in widths)
        self.adain_blocks = (
            nn.ModuleList(AdaINBlock(c, audio_dim, spectral_norm=False) for c in widths)
            if audio_dim is not None
            else None
        )
        self.upsamples = nn.ModuleList(
            PixelShuffleUpsample(c_in, c_out, use_conv=False)
            for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        self.image_block = SPADEBlock(base_channels, image_channels, **spade)
        self.to_rgb = make_conv(2, base_channels, image_channels, 7)
        initialize_weights(
            self, gain=init_gain, spectral_norm=spectral_norm, exclude=(self.to_rgb,)
        )

    def forward(
        self,
        driving: torch.Tensor,
        warped_features: Sequence[torch.Tensor],
        warped_image: torch.Tensor,
        audio: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Driving stack ``(B, 9, H, W)``; warped h̄(1), h̄(2), h̄(3) (finest first, as
        :class:`~neuralhead.headgan.flow_network.DenseFlowNetwork` returns them); warped
        reference ``(B, 3, H, W)``; audio ``(B, audio_dim)`` or None for the no-audio variant.
        Returns the image ``(B, 3, H, W)`` in [0, 1]."""
        if len(warped_features) != 3:
            raise InputError(
                f"RenderingNetwork needs the three warped feature maps, got {len(warped_features)}"
            )
        if self.adain_blocks is None and audio is not None:
            raise InputError("this rendering network was built without audio; pass audio=None")
        if self.adain_blocks is not None and audio is None:
            raise InputError(f"this rendering network needs audio features (B, {self.audio_dim})")
        x = self.encoder(driving)[-1]
        for level, condition in enumerate(reversed(warped_features)):
            x = self.spade_blocks[level](x, condition)
            if self.adain_blocks is not None:
                x = self.adain_blocks[level](x, audio)
            if level < len(self.upsamples):
                x = self.upsamples[level](x)
        x = self.image_block(x, warped_image)
        rgb = torch.tanh(self.to_rgb(F.leaky_relu(x, self.negative_slope)))
        return (rgb + 1) / 2
