"""Discriminators shared by HeadGAN, MegaPortraits and EMOPortraits.

- :class:`MultiScalePatchDiscriminator`: pix2pixHD's multi-scale PatchGAN (Wang et al. 2018).
  MegaPortraits (Sec. 3.3, B.1) and EMOPortraits (supp. Sec. 2) train one with a hinge loss
  and feature matching; HeadGAN's image and mouth discriminators (Sec. 3.3, App. C.2) follow
  SPADE's, the same design with spectral norm on every normalised layer.
- :class:`TemporalPatchDiscriminator1d`: the "Local Content Discriminator" of EMOPortraits'
  audio-to-rotation GAN (supp. Sec. 3.3), a 1D PatchGAN classifying windows of N = 8 frames.
- :class:`SequenceDiscriminator`: its "Global Content Discriminator" (supp. Sec. 3.3), 1D
  residual blocks and global pooling over the whole sequence, judged together with the audio.

Return structure, shared so that one feature-matching loss serves all of them: a patch
discriminator returns a list of feature maps, one per hidden layer (after its activation) and
last the patch logits (one channel, no activation). The multi-scale discriminator returns one
such list per scale, finest scale first.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.nn.blocks import Norm, ResBlock1d, apply_spectral_norm, check_input, make_conv

DiscriminatorNorm = Literal["spectral", "instance", "spectral+instance", "none"]


def _parse_norm(norm: str) -> tuple[bool, bool]:
    """``(spectral, instance)`` flags for a :data:`DiscriminatorNorm`."""
    if norm not in ("spectral", "instance", "spectral+instance", "none"):
        raise InputError(
            f"unknown discriminator norm {norm!r}; expected 'spectral', 'instance', "
            "'spectral+instance' or 'none'"
        )
    return "spectral" in norm, "instance" in norm


def _widths(base_channels: int, max_channels: int, count: int) -> list[int]:
    return [min(base_channels * 2**i, max_channels) for i in range(count)]


class PatchDiscriminator(nn.Module):
    """One PatchGAN (Isola et al. 2017) at one scale, in pix2pixHD / SPADE's layout.

    ``num_layers`` hidden 4x4 convs with LeakyReLU(0.2), widths ``base_channels * 2^i`` capped
    at ``max_channels``; all but the last have stride 2, and all but the first are normalised
    (instance norm without affine parameters when ``norm`` includes it). A last stride-1 4x4
    conv gives one logit per patch. ``forward`` returns ``num_layers + 1`` tensors: the hidden
    features, then the logits ``(B, 1, h, w)``.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        num_layers: int = 4,
        base_channels: int = 64,
        max_channels: int = 512,
        norm: DiscriminatorNorm = "spectral+instance",
        kernel_size: int = 4,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise InputError(f"a patch discriminator needs at least one layer, got {num_layers}")
        self.in_channels = in_channels
        spectral, instance = _parse_norm(norm)
        pad = kernel_size // 2
        widths = [in_channels, *_widths(base_channels, max_channels, num_layers)]
        layers = []
        for i in range(num_layers):
            stride = 2 if i < num_layers - 1 else 1
            conv = make_conv(
                2,
                widths[i],
                widths[i + 1],
                kernel_size,
                stride=stride,
                padding=pad,
                spectral_norm=spectral,
            )
            norm_layer = nn.InstanceNorm2d(widths[i + 1]) if instance and i > 0 else nn.Identity()
            layers.append(nn.Sequential(conv, norm_layer, nn.LeakyReLU(0.2)))
        layers.append(make_conv(2, widths[-1], 1, kernel_size, padding=pad, spectral_norm=spectral))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(x, name="PatchDiscriminator", channels=self.in_channels, spatial_dims=2)
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class MultiScalePatchDiscriminator(nn.Module):
    """Several :class:`PatchDiscriminator` on an image pyramid (pix2pixHD, Wang et al. 2018).

    The input ``(B, in_channels, H, W)``, concatenated channel-wise with an optional condition,
    is judged at ``num_scales`` scales, each one average-pooled (3x3, stride 2) from the last.
    The condition is ``(B, condition_channels, H, W)`` (HeadGAN's image discriminator: the 3D
    face render) or a vector ``(B, condition_channels)`` tiled over the image (HeadGAN's mouth
    discriminator: the 300 audio features, Sec. 3.3).

    ``forward`` returns a list over scales, finest first; each entry is the list of that scale's
    hidden feature maps (for feature matching) ending with its patch logits ``(B, 1, h, w)``.

    Defaults follow HeadGAN's code (two scales, 4 layers, base 64, spectral + instance norm):
    about 2.8M parameters per scale for RGB input. MegaPortraits' has about 3M in all (notes
    from the authors' code) in a layout the papers leave open: one scale at the defaults has
    2.8M, two scales with ``base_channels=32`` 1.4M.
    """

    def __init__(
        self,
        in_channels: int = 3,
        *,
        condition_channels: int = 0,
        num_scales: int = 2,
        num_layers: int = 4,
        base_channels: int = 64,
        max_channels: int = 512,
        norm: DiscriminatorNorm = "spectral+instance",
    ) -> None:
        super().__init__()
        if num_scales < 1:
            raise InputError(f"num_scales must be at least 1, got {num_scales}")
        self.in_channels = in_channels
        self.condition_channels = condition_channels
        self.discriminators = nn.ModuleList(
            PatchDiscriminator(
                in_channels + condition_channels,
                num_layers=num_layers,
                base_channels=base_channels,
                max_channels=max_channels,
                norm=norm,
            )
            for _ in range(num_scales)
        )

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None = None
    ) -> list[list[torch.Tensor]]:
        check_input(
            x, name="MultiScalePatchDiscriminator", channels=self.in_channels, spatial_dims=2
        )
        if self.condition_channels:
            x = torch.cat([x, self._condition_map(condition, x)], dim=1)
        elif condition is not None:
            raise InputError("this discriminator was built without condition_channels")
        outputs = []
        for i, discriminator in enumerate(self.discriminators):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            outputs.append(discriminator(x))
        return outputs

    def _condition_map(self, condition: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        c = self.condition_channels
        if condition is not None and condition.shape == (batch, c):
            return condition[:, :, None, None].expand(batch, c, height, width)
        if condition is None or condition.shape != (batch, c, height, width):
            got = None if condition is None else tuple(condition.shape)
            raise InputError(
                f"MultiScalePatchDiscriminator expects a condition of shape ({batch}, {c}) or "
                f"({batch}, {c}, {height}, {width}), got {got}"
            )
        return condition


class TemporalPatchDiscriminator1d(nn.Module):
    """EMOPortraits' Local Content Discriminator (supp. Sec. 3.3): a 1D temporal PatchGAN.

    Input ``(B, in_channels, T)``: a head-transformation sequence, channels first (the
    supplementary's ``X ∈ R^{T x 9}``, 6D rotation + translation, transposed). Every logit
    sees exactly ``patch_frames`` consecutive frames (the paper's N = 8): ``num_layers``
    unpadded stride-1 convs of ``kernel_size`` with LeakyReLU(0.2) and widths doubling from
    ``base_channels``, then a logits conv whose kernel completes the receptive field. The
    convolution spans the whole sequence, so the output ``(B, 1, T - patch_frames + 1)`` judges
    every window; averaging it gives the sequence's verdict (done by the loss).

    ``forward`` returns the hidden features then the logits, as :class:`PatchDiscriminator`.
    The paper trains it with WGAN-GP, whose penalty is per sample: hence no batch norm, and
    ``norm="none"`` by default (instance norm is per sample and allowed).
    """

    def __init__(
        self,
        in_channels: int = 9,
        *,
        patch_frames: int = 8,
        num_layers: int = 3,
        kernel_size: int = 3,
        base_channels: int = 64,
        max_channels: int = 256,
        norm: DiscriminatorNorm = "none",
    ) -> None:
        super().__init__()
        last_kernel = patch_frames - num_layers * (kernel_size - 1)
        if num_layers < 1 or last_kernel < 1:
            raise InputError(
                f"{num_layers} layers of kernel {kernel_size} see more than patch_frames = "
                f"{patch_frames} frames; use fewer layers or a smaller kernel"
            )
        self.in_channels = in_channels
        self.patch_frames = patch_frames
        spectral, instance = _parse_norm(norm)
        widths = [in_channels, *_widths(base_channels, max_channels, num_layers)]
        layers = []
        for i in range(num_layers):
            conv = make_conv(
                1, widths[i], widths[i + 1], kernel_size, padding=0, spectral_norm=spectral
            )
            norm_layer = nn.InstanceNorm1d(widths[i + 1]) if instance and i > 0 else nn.Identity()
            layers.append(nn.Sequential(conv, norm_layer, nn.LeakyReLU(0.2)))
        layers.append(make_conv(1, widths[-1], 1, last_kernel, padding=0, spectral_norm=spectral))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(
            x, name="TemporalPatchDiscriminator1d", channels=self.in_channels, spatial_dims=1
        )
        if x.shape[-1] < self.patch_frames:
            raise InputError(
                f"TemporalPatchDiscriminator1d needs at least {self.patch_frames} frames, "
                f"got {x.shape[-1]}"
            )
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class SequenceDiscriminator(nn.Module):
    """EMOPortraits' Global Content Discriminator (supp. Sec. 3.3), conditioned on audio.

    The sequence ``(B, in_channels, T)`` goes through a 3-wide conv and ``num_blocks``
    pre-activation :class:`ResBlock1d` (each halving T by average pooling, widths doubling from
    ``base_channels``), ReLU and global average pooling over time to ``h`` ``(B, F)``. The
    condition is a vector ``(B, condition_dim)`` (e.g. a Whisper embedding of the clip) or
    per-frame features ``(B, condition_dim, T_a)``, averaged over time here (our assumption:
    the paper concatenates "the audio embeddings" with the pooled sequence code without saying
    how their time axis is reduced).

    ``conditioning`` chooses how ``h`` meets the condition ``a``:

    - ``"concat"`` (the paper): ``score = MLP([h, a])``, one hidden layer of ``hidden_dim``
      (the MLP's size is not given; ours).
    - ``"projection"`` (Miyato & Koyama 2018): ``score = w·h + b + <E a, h>`` with a learned
      linear embedding ``E``.

    ``forward`` returns ``(score, features)``: ``score`` ``(B,)`` is unbounded (a WGAN critic
    in the paper) and ``features`` lists the stem's and every block's output ``(B, C_i, T_i)``.
    Trained with WGAN-GP (per-sample penalty), so ``norm`` defaults to "none" and batch norm
    should not be used.
    """

    def __init__(
        self,
        in_channels: int = 9,
        condition_dim: int = 512,
        *,
        num_blocks: int = 3,
        base_channels: int = 64,
        max_channels: int = 256,
        hidden_dim: int = 256,
        norm: Norm = "none",
        spectral_norm: bool = False,
        conditioning: Literal["concat", "projection"] = "concat",
    ) -> None:
        super().__init__()
        if conditioning not in ("concat", "projection"):
            raise InputError(f"conditioning must be 'concat' or 'projection', got {conditioning!r}")
        self.in_channels = in_channels
        self.condition_dim = condition_dim
        self.num_blocks = num_blocks
        self.conditioning = conditioning
        widths = _widths(base_channels, max_channels, num_blocks + 1)
        self.stem = make_conv(1, in_channels, widths[0], 3, spectral_norm=spectral_norm)
        self.blocks = nn.ModuleList(
            ResBlock1d(a, b, norm=norm, spectral_norm=spectral_norm, downsample=2)
            for a, b in zip(widths[:-1], widths[1:])
        )
        features = widths[-1]
        if conditioning == "concat":
            self.head = nn.Sequential(
                apply_spectral_norm(nn.Linear(features + condition_dim, hidden_dim), spectral_norm),
                nn.LeakyReLU(0.2),
                apply_spectral_norm(nn.Linear(hidden_dim, 1), spectral_norm),
            )
        else:
            self.head = apply_spectral_norm(nn.Linear(features, 1), spectral_norm)
            self.embed = apply_spectral_norm(
                nn.Linear(condition_dim, features, bias=False), spectral_norm
            )

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        check_input(x, name="SequenceDiscriminator", channels=self.in_channels, spatial_dims=1)
        if x.shape[-1] < 2**self.num_blocks:
            raise InputError(
                f"SequenceDiscriminator with {self.num_blocks} blocks needs at least "
                f"{2**self.num_blocks} frames, got {x.shape[-1]}"
            )
        if condition.dim() == 3:
            condition = condition.mean(dim=-1)
        if condition.shape != (x.shape[0], self.condition_dim):
            raise InputError(
                f"SequenceDiscriminator expects a condition of shape ({x.shape[0]}, "
                f"{self.condition_dim}) or ({x.shape[0]}, {self.condition_dim}, T_a), "
                f"got {tuple(condition.shape)}"
            )
        h = self.stem(x)
        features = [h]
        for block in self.blocks:
            h = block(h)
            features.append(h)
        pooled = F.relu(h).mean(dim=-1)
        if self.conditioning == "concat":
            score = self.head(torch.cat([pooled, condition], dim=1))
        else:
            score = self.head(pooled) + (self.embed(condition) * pooled).sum(dim=1, keepdim=True)
        return score.squeeze(1), features
