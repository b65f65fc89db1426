"""Pixel-level image metrics: L1 on the 0-255 scale, PSNR and SSIM.

Images are float RGB tensors with values in ``[0, data_range]`` (``[0, 1]`` by default),
shaped ``(B, 3, H, W)``, or ``(3, H, W)`` for a single image. Every metric returns one value
per image, shape ``(B,)`` (a 0-d tensor for an unbatched input), on the input's device, so
that callers choose how to average (per image, per video, over a dataset). Inputs are not
clamped: values outside the range are the caller's error to fix, not ours to hide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_batch(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Check a pair of images and return them as ``(B, 3, H, W)`` plus "was unbatched"."""
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    if pred.ndim not in (3, 4) or pred.shape[-3] != 3:
        raise ValueError(
            f"expected RGB images shaped (B, 3, H, W) or (3, H, W), got {tuple(pred.shape)}"
        )
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise ValueError(
            f"expected float images in [0, 1], got {pred.dtype} and {target.dtype}; "
            "convert with .float() / 255"
        )
    unbatched = pred.ndim == 3
    if unbatched:
        pred, target = pred[None], target[None]
    # Half precision loses the small variances SSIM and PSNR depend on.
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return pred.to(dtype), target.to(dtype), unbatched


def _check_range(data_range: float) -> None:
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")


def _out(values: torch.Tensor, unbatched: bool) -> torch.Tensor:
    return values[0] if unbatched else values


def l1_255(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per image, over channels and pixels, on the 0-255 scale.

    Inputs are ``[0, 1]`` images; the result is multiplied by 255 so that it reads as
    grey levels of an 8-bit image.
    """
    pred, target, unbatched = _as_batch(pred, target)
    return _out((pred - target).abs().mean(dim=(1, 2, 3)) * 255.0, unbatched)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: ``10 log10(data_range^2 / MSE)``.

    The MSE is taken over all channels and pixels of each image. Identical images give
    ``inf``, the exact value, rather than a capped number.
    """
    _check_range(data_range)
    pred, target, unbatched = _as_batch(pred, target)
    mse = (pred - target).pow(2).mean(dim=(1, 2, 3))
    return _out(10.0 * torch.log10(data_range**2 / mse), unbatched)


SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The normalised 1-d Gaussian of SSIM's window (11 taps, sigma 1.5)."""
    half = (SSIM_WINDOW - 1) / 2
    x = torch.arange(SSIM_WINDOW, dtype=dtype, device=device) - half
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image (Wang, Bovik, Sheikh, Simoncelli 2004, Eq. 13).

    Local statistics use the paper's 11x11 Gaussian window with sigma 1.5 and constants
    ``K1 = 0.01``, ``K2 = 0.03``; each channel is treated separately and the SSIM map is
    averaged over channels and positions.

    Borders follow torchmetrics' ``structural_similarity_index_measure`` (its defaults), so
    the two agree to float precision: each image is reflect-padded by 5 pixels, the window
    is applied as a valid convolution and the whole ``H x W`` map is averaged. (scikit-image
    instead averages only positions whose window lies inside the image, which gives slightly
    different values on the same images.) Images must be at least 11x11 pixels.
    """
    _check_range(data_range)
    pred, target, unbatched = _as_batch(pred, target)
    height, width = pred.shape[-2:]
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {height}x{width}"
        )
    batch, channels = pred.shape[:2]
    pad = SSIM_WINDOW // 2
    pred = F.pad(pred, (pad, pad, pad, pad), mode="reflect")
    target = F.pad(target, (pad, pad, pad, pad), mode="reflect")

    g = _gaussian_window(pred.dtype, pred.device)
    # The 2-d Gaussian is separable: two 1-d passes cost 22 instead of 121 multiplies per pixel.
    g_rows = g.view(1, 1, SSIM_WINDOW, 1).expand(channels, 1, SSIM_WINDOW, 1)
    g_cols = g.view(1, 1, 1, SSIM_WINDOW).expand(channels, 1, 1, SSIM_WINDOW)
    stacked = torch.cat([pred, target, pred * pred, target * target, pred * target])
    filtered = F.conv2d(F.conv2d(stacked, g_rows, groups=channels), g_cols, groups=channels)
    mu_x, mu_y, e_xx, e_yy, e_xy = filtered.split(batch)

    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    # E[x^2] - E[x]^2 can come out slightly negative in floating point; a variance cannot.
    var_x = (e_xx - mu_xx).clamp_min(0.0)
    var_y = (e_yy - mu_yy).clamp_min(0.0)
    cov_xy = e_xy - mu_xy
    ssim_map = ((2 * mu_xy + c1) * (2 * cov_xy + c2)) / (
        (mu_xx + mu_yy + c1) * (var_x + var_y + c2)
    )
    return _out(ssim_map.mean(dim=(1, 2, 3)), unbatched)
