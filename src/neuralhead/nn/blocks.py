"""Layers shared by HeadGAN, MegaPortraits and EMOPortraits.

- Weight-standardised convolutions (MegaPortraits A.1: "all convolutional layers, except the
  first and the last ones, are used with weight standardization") and optional spectral norm
  (MegaPortraits B.1, HeadGAN Sec. 4.1 / authors' code: spectral norm on every conv).
- Pre-activation residual blocks in 1D, 2D and 3D with GroupNorm(32) by default (MegaPortraits
  A.1 replaces every BatchNorm with GroupNorm), average-pool down-sampling and
  nearest/trilinear up-sampling (MegaPortraits Fig. 9).
- SPADE and AdaIN normalisation layers and the SPADE / AdaIN blocks of HeadGAN App. C, Fig. 9.
- Adaptive GroupNorm and the 3D residual block built on it ("ResBlock3D*") of the MegaPortraits
  warping generators (A.1).
- The PixelShuffle up-sampling of HeadGAN's decoders (App. C, Tables 4 and 5).

Every block checks the channel count of its input and raises :class:`InputError` on a
mismatch, so that a wiring mistake names the block instead of failing deep inside a conv.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from neuralhead.errors import InputError

Norm = Literal["group", "instance", "batch", "none"]
Size = int | tuple[int, ...]
M = TypeVar("M", bound=nn.Module)

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_AXES = {1: ("T",), 2: ("H", "W"), 3: ("D", "H", "W")}


def check_input(x: torch.Tensor, *, name: str, channels: int, spatial_dims: int) -> None:
    """Raise :class:`InputError` unless ``x`` is ``(B, channels, *spatial)`` with that many axes."""
    if x.dim() != 2 + spatial_dims or x.shape[1] != channels:
        axes = ", ".join(["B", str(channels), *_AXES[spatial_dims]])
        raise InputError(f"{name} expects a tensor of shape ({axes}), got {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# Weight standardisation and spectral norm


class WeightStandardization(nn.Module):
    """Parametrization ``w ↦ (w - mean) / sqrt(var + eps)`` per output channel (Qiao et al. 2019).

    Mean and (biased) variance are taken over all axes but the first, so each filter has zero
    mean and unit standard deviation. Registered as a parametrization rather than applied in
    ``forward`` so that spectral norm, registered after it, normalises the *standardised*
    weight: standardisation is invariant to the weight's scale and would undo spectral norm
    applied before it.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        axes = tuple(range(1, weight.dim()))
        var, mean = torch.var_mean(weight, dim=axes, keepdim=True, correction=0)
        return (weight - mean) * torch.rsqrt(var + self.eps)


def weight_standardize(module: M, eps: float = 1e-5) -> M:
    """Register :class:`WeightStandardization` on ``module.weight`` and return the module."""
    parametrize.register_parametrization(module, "weight", WeightStandardization(eps))
    return module


def apply_spectral_norm(module: M, enabled: bool = True) -> M:
    """Spectral norm (Miyato et al. 2018) on ``module.weight`` when ``enabled``; the module back.

    Uses ``torch.nn.utils.parametrizations.spectral_norm``: the weight is stored as
    ``parametrizations.weight.original`` and divided by its largest singular value, estimated
    with one power iteration per training-mode forward pass.
    """
    return _spectral_norm(module) if enabled else module


class WSConv1d(nn.Conv1d):
    """``nn.Conv1d`` whose weight is standardised per output channel (keyword ``eps``)."""

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        weight_standardize(self, eps)


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is standardised per output channel (keyword ``eps``)."""

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        weight_standardize(self, eps)


class WSConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose weight is standardised per output channel (keyword ``eps``)."""

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        weight_standardize(self, eps)


_WS_CONV = {1: WSConv1d, 2: WSConv2d, 3: WSConv3d}


def make_conv(
    dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    bias: bool = True,
    weight_standardization: bool = False,
    spectral_norm: bool = False,
) -> nn.Module:
    """A ``dims``-D convolution, "same" padding by default, optionally WS and/or spectral-normed."""
    cls = _WS_CONV[dims] if weight_standardization else _CONV[dims]
    pad = kernel_size // 2 if padding is None else padding
    conv = cls(in_channels, out_channels, kernel_size, stride=stride, padding=pad, bias=bias)
    return apply_spectral_norm(conv, spectral_norm)


def group_count(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` not above ``groups`` (GroupNorm needs a divisor)."""
    return next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)


def make_norm(
    kind: Norm, channels: int, *, dims: int, groups: int = 32, affine: bool = True
) -> nn.Module:
    """A normalisation layer over ``(B, channels, *spatial)``; ``groups`` is clamped to a divisor."""
    if kind == "group":
        return nn.GroupNorm(group_count(channels, groups), channels, affine=affine)
    if kind == "instance":
        return _INSTANCE_NORM[dims](channels, affine=affine)
    if kind == "batch":
        return _BATCH_NORM[dims](channels, affine=affine)
    if kind == "none":
        return nn.Identity()
    raise InputError(f"unknown norm {kind!r}; expected 'group', 'instance', 'batch' or 'none'")


def _factors(value: Size, dims: int, what: str) -> tuple[int, ...]:
    factors = (value,) * dims if isinstance(value, int) else tuple(value)
    if len(factors) != dims or any(f < 1 for f in factors):
        raise InputError(f"{what} must be a positive int or {dims} positive ints, got {value!r}")
    return factors


class _Resample(nn.Module):
    """Average-pool down-sampling or interpolation up-sampling by per-axis integer factors."""

    def __init__(self, dims: int, *, down: Size, up: Size, mode: str) -> None:
        super().__init__()
        self.dims = dims
        self.down = _factors(down, dims, "downsample")
        self.up = _factors(up, dims, "upsample")
        if any(f > 1 for f in self.down) and any(f > 1 for f in self.up):
            raise InputError("a block can down-sample or up-sample, not both")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(f > 1 for f in self.down):
            return _AVG_POOL[self.dims](x, self.down)
        if any(f > 1 for f in self.up):
            smooth = self.mode != "nearest"
            return F.interpolate(
                x, scale_factor=self.up, mode=self.mode, align_corners=False if smooth else None
            )
        return x


# ---------------------------------------------------------------------------------------------
# Residual blocks


class _ResBlock(nn.Module):
    dims: int = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm: Norm = "group",
        groups: int = 32,
        weight_standardization: bool = False,
        spectral_norm: bool = False,
        downsample: Size = 1,
        upsample: Size = 1,
        upsample_mode: str | None = None,
    ) -> None:
        super().__init__()
        dims = self.dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        conv = dict(weight_standardization=weight_standardization, spectral_norm=spectral_norm)
        mode = upsample_mode or ("nearest" if dims < 3 else "trilinear")
        self.resample = _Resample(dims, down=downsample, up=upsample, mode=mode)
        self.upsampling = any(f > 1 for f in self.resample.up)
        self.norm1 = make_norm(norm, in_channels, dims=dims, groups=groups)
        self.conv1 = make_conv(dims, in_channels, out_channels, 3, **conv)
        self.norm2 = make_norm(norm, out_channels, dims=dims, groups=groups)
        self.conv2 = make_conv(dims, out_channels, out_channels, 3, **conv)
        self.skip = (
            make_conv(dims, in_channels, out_channels, 1, **conv)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, name=type(self).__name__, channels=self.in_channels, spatial_dims=self.dims)
        h = F.relu(self.norm1(x))
        # Pooling, nearest and linear interpolation all commute with a 1x1 conv, so the skip
        # projection runs at the lower of the two resolutions.
        if self.upsampling:
            h = self.conv2(F.relu(self.norm2(self.conv1(self.resample(h)))))
            return h + self.resample(self.skip(x))
        h = self.conv2(F.relu(self.norm2(self.conv1(h))))
        return self.resample(h) + self.skip(self.resample(x))


class ResBlock1d(_ResBlock):
    """Pre-activation residual block on ``(B, C, T)``; see :class:`ResBlock2d`."""

    dims = 1


class ResBlock2d(_ResBlock):
    """Pre-activation residual block (MegaPortraits A.1, Fig. 9; He et al. 2016 ordering).

    ``(B, in_channels, H, W)`` → ``(B, out_channels, H', W')``. Residual branch:
    norm → ReLU → [up-sample] → 3x3 conv → norm → ReLU → 3x3 conv → [average-pool]; skip: a
    1x1 conv when the channel count changes, resampled the same way. ``downsample`` /
    ``upsample`` are integer factors, one for all axes or one per axis (e.g. ``(1, 2, 2)`` in
    3D keeps depth, as in MegaPortraits' G3D "Sample(z, x, y)" units). ``upsample_mode`` is
    ``"nearest"`` in 1D/2D and ``"trilinear"`` in 3D unless given. ``groups`` (GroupNorm) is
    clamped to the largest divisor of the channel count. Weight standardisation and spectral
    norm, when on, apply to all three convolutions.
    """

    dims = 2


class ResBlock3d(_ResBlock):
    """Pre-activation residual block on ``(B, C, D, H, W)``; see :class:`ResBlock2d`."""

    dims = 3


# ---------------------------------------------------------------------------------------------
# SPADE and AdaIN (HeadGAN App. C)


class SPADE(nn.Module):
    """Spatially-adaptive normalisation (Park et al. 2019) as used by HeadGAN (Sec. 3.3, App. C).

    ``out = IN(x) * (1 + γ(c)) + β(c)`` with a parameter-free instance norm IN. The conditioning
    map ``c`` is resized to ``x``'s spatial size (``resize_mode``, nearest as in SPADE), passed
    through a shared 3x3 conv with ReLU (``hidden_channels``: 128 in SPADE, 256 in HeadGAN's
    code) and two 3x3 convs predicting per-pixel γ and β.
    """

    def __init__(
        self,
        num_features: int,
        condition_channels: int,
        *,
        hidden_channels: int = 128,
        kernel_size: int = 3,
        resize_mode: str = "nearest",
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.condition_channels = condition_channels
        self.resize_mode = resize_mode
        self.norm = nn.InstanceNorm2d(num_features, affine=False)
        conv = dict(spectral_norm=spectral_norm)
        self.shared = make_conv(2, condition_channels, hidden_channels, kernel_size, **conv)
        self.to_gamma = make_conv(2, hidden_channels, num_features, kernel_size, **conv)
        self.to_beta = make_conv(2, hidden_channels, num_features, kernel_size, **conv)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, num_features, H, W)``, ``condition`` ``(B, condition_channels, h, w)``."""
        check_input(x, name="SPADE", channels=self.num_features, spatial_dims=2)
        check_input(
            condition, name="SPADE condition", channels=self.condition_channels, spatial_dims=2
        )
        if condition.shape[-2:] != x.shape[-2:]:
            smooth = self.resize_mode != "nearest"
            condition = F.interpolate(
                condition,
                size=x.shape[-2:],
                mode=self.resize_mode,
                align_corners=False if smooth else None,
            )
        hidden = F.relu(self.shared(condition))
        return self.norm(x) * (1 + self.to_gamma(hidden)) + self.to_beta(hidden)


class AdaIN(nn.Module):
    """Adaptive instance normalisation (Huang & Belongie 2017) driven by a vector (HeadGAN App. C).

    ``out = IN(x) * (1 + γ(a)) + β(a)`` with a parameter-free instance norm and one linear layer
    mapping the conditioning vector ``a`` (HeadGAN: the 300 audio features) to per-channel γ
    and β. Writing the scale as ``1 + γ``, as SPADE does, is our choice: a zero output of the
    linear layer leaves the normalised features unchanged.
    """

    def __init__(
        self, num_features: int, condition_dim: int, *, spectral_norm: bool = False
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.condition_dim = condition_dim
        self.norm = nn.InstanceNorm2d(num_features, affine=False)
        self.affine = apply_spectral_norm(nn.Linear(condition_dim, 2 * num_features), spectral_norm)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, num_features, H, W)``, ``condition`` ``(B, condition_dim)``."""
        check_input(x, name="AdaIN", channels=self.num_features, spatial_dims=2)
        if condition.shape != (x.shape[0], self.condition_dim):
            raise InputError(
                f"AdaIN expects a condition of shape ({x.shape[0]}, {self.condition_dim}), "
                f"got {tuple(condition.shape)}"
            )
        gamma, beta = self.affine(condition)[..., None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + gamma) + beta


class _ModulatedBlock(nn.Module):
    """Two units of (adaptive norm → LeakyReLU → 3x3 conv), channels kept, no skip connection."""

    def __init__(
        self, norm1: nn.Module, norm2: nn.Module, channels: int, negative_slope: float, sn: bool
    ) -> None:
        super().__init__()
        self.channels = channels
        self.norm1 = norm1
        self.conv1 = make_conv(2, channels, channels, 3, spectral_norm=sn)
        self.norm2 = norm2
        self.conv2 = make_conv(2, channels, channels, 3, spectral_norm=sn)
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(self.norm1(x, condition), self.negative_slope))
        return self.conv2(F.leaky_relu(self.norm2(h, condition), self.negative_slope))


class SPADEBlock(_ModulatedBlock):
    """HeadGAN's SPADE block (App. C, Fig. 9): ``(B, C, H, W)`` → ``(B, C, H, W)``.

    The residual branch of SPADE's ResBlk, SPADE → LeakyReLU(0.2) → 3x3 conv, twice, without
    the residual connection, since HeadGAN keeps the channel count F. Spectral norm is on by
    default, on the block's convs and on its SPADE layers' convs (HeadGAN's code: every conv).
    """

    def __init__(
        self,
        channels: int,
        condition_channels: int,
        *,
        hidden_channels: int = 128,
        negative_slope: float = 0.2,
        resize_mode: str = "nearest",
        spectral_norm: bool = True,
    ) -> None:
        spade = dict(
            hidden_channels=hidden_channels, resize_mode=resize_mode, spectral_norm=spectral_norm
        )
        super().__init__(
            SPADE(channels, condition_channels, **spade),
            SPADE(channels, condition_channels, **spade),
            channels,
            negative_slope,
            spectral_norm,
        )


class AdaINBlock(_ModulatedBlock):
    """HeadGAN's AdaIN block (App. C, Fig. 9): ``(B, C, H, W)`` and ``(B, D)`` → ``(B, C, H, W)``.

    As :class:`SPADEBlock` with AdaIN layers conditioned on a vector (the audio features, the
    same vector at every scale, HeadGAN Sec. 3.3).
    """

    def __init__(
        self,
        channels: int,
        condition_dim: int,
        *,
        negative_slope: float = 0.2,
        spectral_norm: bool = True,
    ) -> None:
        super().__init__(
            AdaIN(channels, condition_dim, spectral_norm=spectral_norm),
            AdaIN(channels, condition_dim, spectral_norm=spectral_norm),
            channels,
            negative_slope,
            spectral_norm,
        )


# ---------------------------------------------------------------------------------------------
# Adaptive GroupNorm (MegaPortraits A.1, warping generators)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm whose per-channel scale and shift are predicted from an embedding (MegaPortraits A.1).

    ``out = GN(x) * (1 + γ(e)) + β(e)`` where GN has no affine parameters and ``(γ, β)`` is a
    linear function of the embedding ``e`` ("we multiply the foregoing sums and additionally
    learned matrices for each pair of parameters"). With ``rank`` set, the matrix is factored
    through ``rank`` dimensions (the authors' code uses a low-rank projection; the rank is our
    choice). With a zero projection the layer is exactly a plain GroupNorm. Works on any
    ``(B, C, *spatial)``; the embedding may be ``(B, embedding_dim)`` or any ``(B, ...)`` with
    that many elements per sample (e.g. MegaPortraits' ``512 x 16``), which is flattened.
    """

    def __init__(
        self,
        num_channels: int,
        embedding_dim: int,
        *,
        groups: int = 32,
        rank: int | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.embedding_dim = embedding_dim
        self.norm = nn.GroupNorm(
            group_count(num_channels, groups), num_channels, eps=eps, affine=False
        )
        out = 2 * num_channels
        self.projection = (
            nn.Linear(embedding_dim, out)
            if rank is None
            else nn.Sequential(nn.Linear(embedding_dim, rank, bias=False), nn.Linear(rank, out))
        )

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.num_channels:
            raise InputError(
                f"AdaptiveGroupNorm expects (B, {self.num_channels}, ...), got {tuple(x.shape)}"
            )
        e = embedding.flatten(1) if embedding.dim() > 1 else embedding
        if e.shape != (x.shape[0], self.embedding_dim):
            raise InputError(
                f"AdaptiveGroupNorm expects an embedding with {self.embedding_dim} values per "
                f"sample for a batch of {x.shape[0]}, got {tuple(embedding.shape)}"
            )
        params = self.projection(e).view(e.shape[0], -1, *([1] * (x.dim() - 2)))
        gamma, beta = params.chunk(2, dim=1)
        return self.norm(x) * (1 + gamma) + beta


class AdaptiveResBlock3d(nn.Module):
    """MegaPortraits' ResBlock3D* (A.1, Fig. 9b): :class:`ResBlock3d` with adaptive GroupNorms.

    ``(B, in_channels, D, H, W)`` and an embedding → ``(B, out_channels, D', H', W')``, with
    ``upsample`` (trilinear by default) as in the warping generators (512 → 256 → 128 → 64 → 32
    channels, from a 4^3 start to the 16x64x64 grid). Both adaptive norms read the same
    embedding through their own projections.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embedding_dim: int,
        *,
        groups: int = 32,
        rank: int | None = None,
        upsample: Size = 1,
        upsample_mode: str = "trilinear",
        weight_standardization: bool = False,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        conv = dict(weight_standardization=weight_standardization, spectral_norm=spectral_norm)
        self.resample = _Resample(3, down=1, up=upsample, mode=upsample_mode)
        self.norm1 = AdaptiveGroupNorm(in_channels, embedding_dim, groups=groups, rank=rank)
        self.conv1 = make_conv(3, in_channels, out_channels, 3, **conv)
        self.norm2 = AdaptiveGroupNorm(out_channels, embedding_dim, groups=groups, rank=rank)
        self.conv2 = make_conv(3, out_channels, out_channels, 3, **conv)
        self.skip = (
            make_conv(3, in_channels, out_channels, 1, **conv)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        check_input(x, name="AdaptiveResBlock3d", channels=self.in_channels, spatial_dims=3)
        h = self.conv1(self.resample(F.relu(self.norm1(x, embedding))))
        h = self.conv2(F.relu(self.norm2(h, embedding)))
        return h + self.resample(self.skip(x))


# ---------------------------------------------------------------------------------------------
# PixelShuffle up-sampling (HeadGAN App. C)


class PixelShuffleUpsample(nn.Module):
    """Sub-pixel up-sampling (Shi et al. 2016) as in HeadGAN's decoders (App. C, Tables 4-5).

    ``(B, in_channels, H, W)`` → ``(B, out_channels, rH, rW)``: a ``kernel_size`` conv to
    ``out_channels * r^2`` channels, then ``nn.PixelShuffle(r)``. HeadGAN's tables show the
    channel count falling by exactly r^2 (512 → 128 → 32), which a bare shuffle also gives:
    ``use_conv=False`` omits the conv and then requires ``in_channels == out_channels * r^2``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        scale_factor: int = 2,
        kernel_size: int = 3,
        use_conv: bool = True,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        shuffled = out_channels * scale_factor**2
        if use_conv:
            self.conv: nn.Module = make_conv(
                2, in_channels, shuffled, kernel_size, spectral_norm=spectral_norm
            )
        elif in_channels == shuffled:
            self.conv = nn.Identity()
        else:
            raise InputError(
                f"PixelShuffleUpsample without a conv needs in_channels = out_channels * "
                f"{scale_factor}^2 = {shuffled}, got {in_channels}"
            )
        self.shuffle = nn.PixelShuffle(scale_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, name="PixelShuffleUpsample", channels=self.in_channels, spatial_dims=2)
        return self.shuffle(self.conv(x))
