"""Configuration and named presets of Dynamic Neural Portraits.

The paper leaves the network sizes open ("more details ... in the supplementary material",
which is not public); every size below is our choice, made so that the 256 / 512 / 1024
models have the paper's structure (MLP on an ``H_f x W_f`` grid, CNN decoder up-sampling by
powers of two) at a cost in line with its speed table (Table 4). All are config fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass
class DNPConfig:
    """Sizes and options of :class:`~neuralhead.dnp.model.DynamicNeuralPortrait`.

    Attributes:
        image_size: output resolution ``H = W``.
        feature_size: resolution ``H_f = W_f`` of the feature map the MLP fills (Sec. 3.2).
        feature_channels: ``n_f``, length of the MLP's feature vector f.
        mlp_width, mlp_depth: hidden width and number of hidden layers of F.
        mlp_skips: hidden layers (0-based) that receive the MLP's input again (NeRF-style).
        coord_frequencies, pose_frequencies, gaze_frequencies: N of Eq. 3 for x, p and g.
        num_expression: ``n_exp``, length of e (set from the dataset).
        latent_dim: length of the per-frame learnable code v_i.
        num_latents: number of training frames, i.e. rows of the latent table (set from data).
        decoder_channels: channels after each x2 up-sampling stage of the decoder D; there
            must be ``log2(image_size / feature_size)`` of them.
        rgb_head: predict the low-resolution colour C_i next to f (the L'_rec term of Eq. 4).
        mean_frame_bias: give the decoder's output (and the colour head) a per-pixel bias,
            initialised to the mean training frame. The camera of a video portrait is static
            (Sec. 3.1), so most of every frame is this mean; starting from it rather than from
            grey saves the networks learning the background from scratch and shortens
            training several-fold. Our choice (the paper does not detail D).
        driver: ``"expression"`` (e_i) or ``"audio"`` (α_i from audio windows, Sec. 3.3).
        audio_dim, audio_window: size of a speech feature vector and the window w = 16.
        audio_code_dim: ``n_a``, length of the audio code a_i and of α_i.
        audio_attention_frames: ``2u = 8`` consecutive codes mixed by the attention filter.
        audio_attention_start: training step at which the attention filter is switched on
            (before it, α_i = a_i), as in AD-NeRF.
        input_scale: pose and gaze are standardised with training statistics and divided by
            this before encoding, so the training range sits roughly in [-1, 1].
    """

    image_size: int = 256
    feature_size: int = 64
    feature_channels: int = 64
    mlp_width: int = 256
    mlp_depth: int = 8
    mlp_skips: tuple[int, ...] = (4,)
    coord_frequencies: int = 8
    pose_frequencies: int = 3
    gaze_frequencies: int = 3
    num_expression: int = 32
    latent_dim: int = 32
    num_latents: int = 1
    decoder_channels: tuple[int, ...] = (128, 64)
    rgb_head: bool = True
    mean_frame_bias: bool = True
    driver: str = "expression"
    audio_dim: int = 29
    audio_window: int = 16
    audio_code_dim: int = 64
    audio_attention_frames: int = 8
    audio_attention_start: int = 2000
    input_scale: float = 2.5

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.feature_size <= 0:
            raise ValueError(f"image_size and feature_size must be positive, got {self.image_size}, {self.feature_size}")
        ratio = self.image_size / self.feature_size
        stages = math.log2(ratio) if ratio >= 1 else -1
        if stages < 0 or stages != int(stages):
            raise ValueError(
                f"image_size / feature_size must be a power of two, got {self.image_size}/{self.feature_size}"
            )
        if len(self.decoder_channels) != int(stages):
            raise ValueError(
                f"decoder_channels needs {int(stages)} entries for {self.feature_size} -> "
                f"{self.image_size}, got {len(self.decoder_channels)}"
            )
        if self.driver not in ("expression", "audio"):
            raise ValueError(f"driver must be 'expression' or 'audio', got {self.driver!r}")
        if any(not 0 <= s < self.mlp_depth for s in self.mlp_skips):
            raise ValueError(f"mlp_skips must index hidden layers 0..{self.mlp_depth - 1}")


PRESETS: dict[str, DNPConfig] = {
    # For unit tests: a few thousand parameters, 32x32 output.
    "dnp-test": DNPConfig(
        image_size=32, feature_size=8, feature_channels=8, mlp_width=32, mlp_depth=2,
        mlp_skips=(), coord_frequencies=3, pose_frequencies=2, gaze_frequencies=2,
        latent_dim=4, decoder_channels=(16, 8), audio_code_dim=16, audio_attention_start=4,
    ),
    # For CPU training (the demo, quick experiments): 128x128 output.
    # The MLP fills half the output resolution, so one decoder stage suffices: on CPU this
    # trained faster per second than a 32x32 grid with two stages (measured on the demo clip).
    "dnp-tiny": DNPConfig(
        image_size=128, feature_size=64, feature_channels=32, mlp_width=128, mlp_depth=4,
        mlp_skips=(2,), coord_frequencies=7, latent_dim=16, decoder_channels=(32,),
        audio_code_dim=32, audio_attention_start=1000,
    ),
    "dnp-256": DNPConfig(),
    "dnp-512": DNPConfig(
        image_size=512, feature_size=128, feature_channels=64, decoder_channels=(128, 64),
        coord_frequencies=9,
    ),
    "dnp-1024": DNPConfig(
        image_size=1024, feature_size=128, feature_channels=64, decoder_channels=(128, 64, 32),
        coord_frequencies=9,
    ),
}  # fmt: skip


def preset(name: str, **overrides) -> DNPConfig:
    """A preset by name (``dnp-256``, ``dnp-256-audio``, ...), with fields overridden.

    A ``-audio`` suffix selects the audio-driven variant of Sec. 3.3.
    """
    base = name.removesuffix("-audio")
    if base not in PRESETS:
        names = ", ".join(sorted(PRESETS) + [f"{n}-audio" for n in sorted(PRESETS)])
        raise KeyError(f"unknown DNP preset {name!r}; available: {names}")
    config = PRESETS[base]
    if name.endswith("-audio"):
        overrides = {"driver": "audio", **overrides}
    return replace(config, **overrides)
