"""HeadGAN's generator G = (F, R) (Sec. 3.3, Eq. 2, Fig. 3).

``ỹ_t = G(x_{t-2:t}, y_ref, x_ref, h_t(a))``: the dense flow network F warps the reference
image and its features towards the driving 3D face, and the rendering network R turns the
driving renders, the warped features and image and the audio features into the frame.
"""

from __future__ import annotations

import torch

from neuralhead.errors import InputError
from neuralhead.headgan.config import HeadGANConfig, preset
from neuralhead.headgan.flow_network import DenseFlowNetwork
from neuralhead.headgan.rendering_network import RenderingNetwork
from neuralhead.nn.pretrained import PretrainedModel


class HeadGANGenerator(PretrainedModel):
    """The generator of Eq. 2; saved and loaded as ``config.json`` + ``model.safetensors``.

    Build it from a preset with :func:`create_generator` (``"headgan-256"``, ...). Spectral
    norm refines its estimate of each weight's norm at every training-mode forward pass, so
    use ``eval()`` for inference and for comparing outputs.
    """

    config_class = HeadGANConfig

    def __init__(self, config: HeadGANConfig) -> None:
        super().__init__(config)
        c = config
        common = dict(
            base_channels=c.base_channels,
            driving_channels=c.driving_channels,
            hidden_channels=c.spade_hidden_channels,
            spectral_norm=c.spectral_norm,
            init_gain=c.init_gain,
        )
        self.flow_network = DenseFlowNetwork(
            render_channels=c.render_channels, num_blocks=c.flow_blocks, **common
        )
        self.rendering_network = RenderingNetwork(
            audio_dim=c.audio_dim if c.use_audio else None, **common
        )

    def forward(
        self,
        driving: torch.Tensor,
        reference_image: torch.Tensor,
        reference_render: torch.Tensor,
        audio: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Generate the frame described by ``driving`` in the appearance of the reference.

        Args:
            driving: renders of frames t-2, t-1, t stacked on channels, ``(B, 9, H, W)`` in
                [0, 1] (H = W = ``config.image_size``).
            reference_image: ``(B, 3, H, W)`` in [0, 1].
            reference_render: the reference's own 3D face render ``(B, 3, H, W)``.
            audio: ``(B, audio_dim)`` audio features of frame t when ``config.use_audio``;
                must be None otherwise.

        Returns:
            ``"image"``: the generated frame ``(B, 3, H, W)`` in [0, 1];
            ``"warped_image"``: the reference warped by the flow ``(B, 3, H, W)``;
            ``"flow"``: ``(B, 2, H, W)``, ``(dx, dy)`` in pixels, backward (see
            :mod:`neuralhead.headgan.flow_network`), already multiplied by the mask;
            ``"flow_mask"``: ``(B, 1, H, W)`` in [0, 1].
        """
        self._check_inputs(driving, reference_image, reference_render, audio)
        flow = self.flow_network(reference_image, reference_render, driving)
        image = self.rendering_network(driving, flow.warped_features, flow.warped_image, audio)
        return {
            "image": image,
            "warped_image": flow.warped_image,
            "flow": flow.flow,
            "flow_mask": flow.mask,
        }

    def _check_inputs(
        self,
        driving: torch.Tensor,
        reference_image: torch.Tensor,
        reference_render: torch.Tensor,
        audio: torch.Tensor | None,
    ) -> None:
        c = self.config
        size = c.image_size
        batch = driving.shape[0] if driving.dim() == 4 else None
        expected = {
            "driving": (driving, c.driving_channels),
            "reference_image": (reference_image, 3),
            "reference_render": (reference_render, c.render_channels),
        }
        for name, (tensor, channels) in expected.items():
            if tuple(tensor.shape) != (batch, channels, size, size):
                raise InputError(
                    f"HeadGANGenerator: {name} must have shape (B, {channels}, {size}, {size})"
                    f"{f' with B = {batch}' if batch is not None else ''}, "
                    f"got {tuple(tensor.shape)}"
                )
        if not c.use_audio:
            if audio is not None:
                raise InputError(
                    "HeadGANGenerator: this model was built without audio (use_audio=False); "
                    "pass audio=None"
                )
        elif audio is None:
            raise InputError(
                f"HeadGANGenerator: this model uses audio; pass audio features of shape "
                f"(B, {c.audio_dim}), or use a -noaudio preset"
            )
        elif tuple(audio.shape) != (batch, c.audio_dim):
            raise InputError(
                f"HeadGANGenerator: audio must have shape ({batch}, {c.audio_dim}), "
                f"got {tuple(audio.shape)}"
            )


def create_generator(name: str = "headgan-256", **overrides) -> HeadGANGenerator:
    """A freshly initialised generator of a named preset, with config fields overridden."""
    return HeadGANGenerator(preset(name, **overrides))
