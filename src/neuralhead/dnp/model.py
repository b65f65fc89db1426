"""Dynamic Neural Portraits: the generator of Sec. 3.2 (and 3.3 for audio).

``Ĩ_i = D(F(γ(x), γ(p_i), γ(g_i), e_i, v_i))`` evaluated on the ``H_f x W_f`` grid, with the
extra colour head ``C_i`` supervised at ``H_f x W_f`` (Eq. 4). In the audio-driven variant
``e_i`` is replaced by ``α_i`` from :mod:`neuralhead.dnp.audio_network`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.dnp.audio_network import AudioAttention, AudioNetwork
from neuralhead.dnp.config import DNPConfig
from neuralhead.dnp.coordinate_mlp import CoordinateMLP
from neuralhead.dnp.decoder import Decoder
from neuralhead.nn.positional_encoding import PositionalEncoding
from neuralhead.nn.pretrained import PretrainedModel


@dataclass
class DNPOutput:
    image: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    rgb: torch.Tensor | None  # (B, 3, H_f, W_f): C_i of Eq. 4
    features: torch.Tensor  # (B, n_f, H_f, W_f): F_i


class DynamicNeuralPortrait(PretrainedModel):
    """A person-specific video portrait: pose, gaze and expression (or audio) → frame.

    The per-frame latent codes ``v_i`` exist for training frames only. For any other frame
    (held-out, driven by another video or by audio) the mean of the learned codes is used
    unless a code is passed explicitly: the mean stands for "an average frame" of the video.
    """

    config_class = DNPConfig

    def __init__(self, config: DNPConfig) -> None:
        super().__init__(config)
        c = config
        self.pose_encoding = PositionalEncoding(6, c.pose_frequencies)
        self.gaze_encoding = PositionalEncoding(2, c.gaze_frequencies)
        drive_dim = c.num_expression if c.driver == "expression" else c.audio_code_dim
        cond = self.pose_encoding.out_features + self.gaze_encoding.out_features + drive_dim
        cond += c.latent_dim
        self.latents = nn.Embedding(c.num_latents, c.latent_dim)
        nn.init.normal_(self.latents.weight, std=0.01)
        self.mlp = CoordinateMLP(
            grid_size=c.feature_size,
            cond_features=cond,
            coord_frequencies=c.coord_frequencies,
            width=c.mlp_width,
            depth=c.mlp_depth,
            skips=c.mlp_skips,
            feature_channels=c.feature_channels,
            rgb_head=c.rgb_head,
        )
        self.decoder = Decoder(c.feature_channels, c.decoder_channels)
        if c.mean_frame_bias:
            self.image_bias = nn.Parameter(torch.zeros(1, 3, c.image_size, c.image_size))
            self.rgb_bias = nn.Parameter(torch.zeros(1, 3, c.feature_size, c.feature_size))
        if c.driver == "audio":
            self.audio_net = AudioNetwork(c.audio_dim, c.audio_window, c.audio_code_dim)
            self.audio_att = AudioAttention(c.audio_code_dim, c.audio_attention_frames)
            self.register_buffer("audio_mean", torch.zeros(c.audio_dim))
            self.register_buffer("audio_std", torch.ones(c.audio_dim))
            # Saved with the weights, so a model trained past the switch-on step keeps using it.
            self.register_buffer("audio_attention_active", torch.tensor(False))
        # Training-set statistics that standardise the inputs (set by set_input_statistics).
        self.register_buffer("pose_mean", torch.zeros(6))
        self.register_buffer("pose_std", torch.ones(6))
        self.register_buffer("gaze_mean", torch.zeros(2))
        self.register_buffer("gaze_std", torch.ones(2))
        self.register_buffer("expression_mean", torch.zeros(c.num_expression))
        self.register_buffer("expression_std", torch.ones(c.num_expression))

    @torch.no_grad()
    def set_input_statistics(
        self,
        pose: torch.Tensor,
        gaze: torch.Tensor,
        expression: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
    ) -> None:
        """Standardisation statistics from the training frames (called once before training).

        Inputs are centred per dimension but scaled per *group* (rotation angles, translation,
        gaze, expression) by the group's largest standard deviation, so that a dimension that
        barely varies in the video (mostly tracking noise, such as depth in a seated talk or
        the weakest expression modes) stays small rather than being blown up to unit scale.
        Audio features are standardised per dimension.
        """

        def centre_and_spread(x: torch.Tensor, groups: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
            x = x.reshape(-1, x.shape[-1]).double()
            std = x.std(0)
            for group in groups:
                std[group] = std[group].max()
            return x.mean(0).float(), std.clamp_min(1e-4).float()

        for name, values, groups in (
            ("pose", pose, [slice(0, 3), slice(3, 6)]),
            ("gaze", gaze, [slice(0, 2)]),
            ("expression", expression, [slice(None)]),
        ):
            if values is not None:
                mean, std = centre_and_spread(values, groups)
                getattr(self, f"{name}_mean").copy_(mean)
                getattr(self, f"{name}_std").copy_(std)
        if audio is not None and self.config.driver == "audio":
            flat = audio.reshape(-1, audio.shape[-1]).double()
            self.audio_mean.copy_(flat.mean(0).float())
            self.audio_std.copy_(flat.std(0).clamp_min(1e-4).float())

    @torch.no_grad()
    def set_mean_frame(self, frame: torch.Tensor) -> None:
        """Initialise the per-pixel output biases with the mean training frame ``(3, H, W)``."""
        if not self.config.mean_frame_bias:
            return
        frame = frame.to(self.image_bias)[None]
        self.image_bias.copy_(F.interpolate(frame, size=self.image_bias.shape[-2:], mode="area"))
        self.rgb_bias.copy_(F.interpolate(frame, size=self.rgb_bias.shape[-2:], mode="area"))

    def mean_latent(self) -> torch.Tensor:
        return self.latents.weight.mean(0)

    def drive_code(self, expression: torch.Tensor | None, audio: torch.Tensor | None) -> torch.Tensor:
        """e_i (standardised) or α_i, the part of the conditioning that drives the face."""
        if self.config.driver == "expression":
            if expression is None:
                raise ValueError("this portrait is expression-driven: pass expression")
            return (expression - self.expression_mean) / self.expression_std
        if audio is None:
            raise ValueError("this portrait is audio-driven: pass audio windows (B, 2u, w, D)")
        b, frames = audio.shape[:2]
        windows = (audio - self.audio_mean) / self.audio_std
        codes = self.audio_net(windows.flatten(0, 1)).view(b, frames, -1)
        if bool(self.audio_attention_active):
            return self.audio_att(codes)
        # Before the filter is switched on, α_i is the frame's own code (position u - 1).
        return codes[:, self.config.audio_attention_frames // 2 - 1]

    def conditioning(
        self,
        pose: torch.Tensor,
        gaze: torch.Tensor,
        expression: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        frame_index: torch.Tensor | None = None,
        latent: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The per-frame MLP input ``[γ(p), γ(g), e or α, v]``, shape ``(B, C)``."""
        s = self.config.input_scale
        p = self.pose_encoding((pose - self.pose_mean) / (s * self.pose_std))
        g = self.gaze_encoding((gaze - self.gaze_mean) / (s * self.gaze_std))
        drive = self.drive_code(expression, audio)
        if frame_index is not None:
            v = self.latents(frame_index)
        elif latent is not None:
            v = latent
        else:
            v = self.mean_latent().expand(pose.shape[0], -1)
        return torch.cat([p, g, drive, v.to(p.dtype)], dim=1)

    def forward(
        self,
        pose: torch.Tensor,
        gaze: torch.Tensor,
        expression: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        frame_index: torch.Tensor | None = None,
        latent: torch.Tensor | None = None,
    ) -> DNPOutput:
        cond = self.conditioning(pose, gaze, expression, audio, frame_index, latent)
        features, rgb = self.mlp(cond)
        image = self.decoder(features)
        if self.config.mean_frame_bias:
            image = image + self.image_bias.to(image.dtype)
            if rgb is not None:
                rgb = rgb + self.rgb_bias.to(rgb.dtype)
        return DNPOutput(image=image, rgb=rgb, features=features)
