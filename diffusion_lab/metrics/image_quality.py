"""SSIM, PSNR and MSE of two image batches in [0, 1] (torchmetrics functional, ``data_range=1.0``)."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
from torchmetrics.functional.regression import mean_squared_error

DATA_RANGE = 1.0
MAX_SSIM_KERNEL = 11
SSIM_SIGMA = 1.5


def _check(preds: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both batches as float tensors of one shape (B, C, H, W) with values in [0, 1]."""
    if preds.shape != target.shape or preds.ndim != 4:
        raise ValueError(
            f"expected two image batches of one shape (B, C, H, W), got {tuple(preds.shape)} "
            f"and {tuple(target.shape)}"
        )
    for name, x in (("preds", preds), ("target", target)):
        if x.numel() and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(f"{name} has values outside [0, 1]: clamp images before measuring")
    return preds.float(), target.float()


def ssim_kernel_size(height: int, width: int) -> int:
    """The SSIM Gaussian window: 11 (the usual one), shrunk to the largest odd size <= min(H, W).

    8x8 digits get a 7x7 window.
    """
    side = min(height, width, MAX_SSIM_KERNEL)
    return side if side % 2 == 1 else side - 1


def ssim_sigma(kernel_size: int) -> float:
    """The Gaussian sigma for a window: 1.5 for 11, scaled in proportion (1.5 * k / 11) below.

    torchmetrics sizes a Gaussian window from sigma alone (``2 * int(3.5 sigma + 0.5) + 1``) and
    ignores ``kernel_size`` for it, so shrinking the window means shrinking sigma.
    """
    sigma = SSIM_SIGMA * kernel_size / MAX_SSIM_KERNEL
    assert 2 * int(3.5 * sigma + 0.5) + 1 == kernel_size
    return sigma


def ssim(preds: torch.Tensor, target: torch.Tensor, kernel_size: int | None = None) -> float:
    """Mean SSIM over the batch (Gaussian window, ``data_range=1.0``).

    ``kernel_size`` (odd, <= 11) defaults to ``ssim_kernel_size(H, W)``: 11 with sigma 1.5 as in
    Wang et al. (2004), or a smaller window with a proportionally smaller sigma for tiny images.
    """
    preds, target = _check(preds, target)
    if kernel_size is None:
        kernel_size = ssim_kernel_size(*preds.shape[-2:])
    if kernel_size % 2 == 0 or not 1 <= kernel_size <= min(MAX_SSIM_KERNEL, *preds.shape[-2:]):
        raise ValueError(f"kernel_size must be odd, <= 11 and <= the image side, got {kernel_size}")
    value = structural_similarity_index_measure(
        preds,
        target,
        data_range=DATA_RANGE,
        kernel_size=kernel_size,
        sigma=ssim_sigma(kernel_size),
    )
    return float(value)


def psnr(preds: torch.Tensor, target: torch.Tensor, per_image: bool = False) -> float:
    """PSNR in dB with ``data_range=1.0``: ``-10 log10(MSE)``; ``inf`` for identical batches.

    Default: of the MSE pooled over the whole batch; ``per_image=True``: the mean of per-image PSNRs.
    """
    preds, target = _check(preds, target)
    if per_image:
        value = peak_signal_noise_ratio(
            preds, target, data_range=DATA_RANGE, reduction="elementwise_mean", dim=(1, 2, 3)
        )
    else:
        value = peak_signal_noise_ratio(preds, target, data_range=DATA_RANGE)
    return float(value)


def mse(preds: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error over all pixels of the batch."""
    preds, target = _check(preds, target)
    return float(mean_squared_error(preds.flatten(), target.flatten()))


def global_ssim(preds: torch.Tensor, target: torch.Tensor) -> float:
    """The FP paper's SSIM (Na et al. eq. 26-29): one window, the whole image, per channel.

    l c s with alpha = beta = gamma = 1 from the pixel means, variances and covariance of each
    image and channel, c1 = (0.01 L)^2, c2 = (0.03 L)^2, c3 = c2 / 2 (the paper prints 0.01 L and
    0.03 L: misprints of Wang et al.'s squares), L = 1; the mean over images and channels. With
    c3 = c2 / 2 the product is Wang et al.'s eq. 13 on one window. Sample statistics use 1 / n.
    """
    preds, target = _check(preds, target)
    x, y = preds.double().flatten(2), target.double().flatten(2)
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    mu_x, mu_y = x.mean(-1), y.mean(-1)
    var_x, var_y = x.var(-1, unbiased=False), y.var(-1, unbiased=False)
    cov = ((x - mu_x[..., None]) * (y - mu_y[..., None])).mean(-1)
    value = (
        (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    )
    return float(value.mean())
