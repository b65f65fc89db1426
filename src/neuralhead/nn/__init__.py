"""Building blocks shared by the models: layers, discriminators, positional encoding."""

from neuralhead.nn.blocks import (
    SPADE,
    AdaIN,
    AdaINBlock,
    AdaptiveGroupNorm,
    AdaptiveResBlock3d,
    PixelShuffleUpsample,
    ResBlock1d,
    ResBlock2d,
    ResBlock3d,
    SPADEBlock,
    WSConv2d,
    WSConv3d,
)
from neuralhead.nn.discriminators import (
    MultiScalePatchDiscriminator,
    PatchDiscriminator,
    SequenceDiscriminator,
    TemporalPatchDiscriminator1d,
)
from neuralhead.nn.positional_encoding import PositionalEncoding

__all__ = [
    "SPADE",
    "AdaIN",
    "AdaINBlock",
    "AdaptiveGroupNorm",
    "AdaptiveResBlock3d",
    "MultiScalePatchDiscriminator",
    "PatchDiscriminator",
    "PixelShuffleUpsample",
    "PositionalEncoding",
    "ResBlock1d",
    "ResBlock2d",
    "ResBlock3d",
    "SPADEBlock",
    "SequenceDiscriminator",
    "TemporalPatchDiscriminator1d",
    "WSConv2d",
    "WSConv3d",
]
