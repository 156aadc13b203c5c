"""``soft_mse_matched``: App. F.1.2's baseline of Daras et al., blur levels whose mean squared
error matches the VE SDE's (eq. 45)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq

from diffusion_lab.errors import ConfigError
from diffusion_lab.schedules.soft.blur import BlurFn


def blur_mse(x0: torch.Tensor, blur: BlurFn, std: float, sigma: float) -> float:
    """E ||x_0 - x_t||^2 per image at blur ``std`` with noise ``sigma``, exactly:
    E_n ||(I - C) x_n||^2 + D sigma^2 (the cross term has mean zero)."""
    x0 = torch.as_tensor(x0, dtype=torch.float64)
    with torch.no_grad():
        residual = x0 - blur(x0, float(std)).to(torch.float64)
    return float(residual.pow(2).flatten(1).sum(1).mean()) + x0[0].numel() * sigma**2


def ve_mse_ratio(u: np.ndarray, ve_sigma_min: float, ve_sigma_max: float) -> np.ndarray:
    """The right side of eq. 45 for the VE SDE: E||x_0 - x'_t||^2 / E||x_0 - x'_1||^2 =
    sigma(t)^2 / sigma_max^2 with geometric sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
    return (ve_sigma_min / ve_sigma_max) ** (2.0 * (1.0 - np.asarray(u, dtype=np.float64)))


def mse_matched_levels(
    x0: torch.Tensor,
    blur: BlurFn,
    sigma: float = 0.1,
    num_levels: int = 32,
    blur_min: float = 0.01,
    blur_max: float = 23.0,
    ve_sigma_min: float = 0.01,
    ve_sigma_max: float = 50.0,
    xtol: float = 1e-10,
) -> tuple[list[float], dict[str, Any]]:
    """``soft_mse_matched``: App. F.1.2's baseline (eq. 45).

    Level k sits at u_k = k / (K - 1) of the blur stage, which plays the VE SDE's t in [0, 1].
    Eq. 45 asks m(b_k) / m(blur_max) = sigma_VE(u_k)^2 / sigma_VE(1)^2, with
    m(b) = E||x_0 - x_t||^2 = E||(I - C_b) x_0||^2 + D sigma^2 (:func:`blur_mse`) and the VE SDE's
    geometric sigma from ``ve_sigma_min`` to ``ve_sigma_max`` (Song et al. 2021b; 50 is the
    project's and Score SDE's CIFAR-10 value). m(b_K) = m(blur_max) holds by construction.

    Where it cannot be met: m(b) >= m(blur_min) = D sigma^2 (the noise alone; C_{0.01} = I), while
    the VE target falls to (ve_sigma_min / ve_sigma_max)^2 m(blur_max), far below it early in the
    blur stage. There the level is clamped to ``blur_min`` until the target exceeds m(blur_min)
    (``info["clamped"]`` counts them); beyond that each level solves m(b) = target by Brent's
    method on [blur_min, blur_max] (to ``xtol``), and the levels are made non-decreasing (m is
    increasing in b for a Gaussian blur; with zero padding round-off could break a tie).
    """
    if num_levels < 2:
        raise ConfigError(f"need at least 2 blur levels, got {num_levels}")
    if not 0 < ve_sigma_min < ve_sigma_max:
        raise ConfigError(
            f"need 0 < ve_sigma_min < ve_sigma_max, got {ve_sigma_min}, {ve_sigma_max}"
        )
    u = np.linspace(0.0, 1.0, num_levels)
    m_min = blur_mse(x0, blur, blur_min, sigma)
    m_max = blur_mse(x0, blur, blur_max, sigma)
    targets = m_max * ve_mse_ratio(u, ve_sigma_min, ve_sigma_max)
    levels = []
    clamped = 0
    for target in targets[:-1]:
        if target <= m_min:
            levels.append(float(blur_min))
            clamped += 1
            continue
        b = brentq(
            lambda s, t=target: blur_mse(x0, blur, s, sigma) - t, blur_min, blur_max, xtol=xtol
        )
        levels.append(float(b))
    levels.append(float(blur_max))
    levels = np.maximum.accumulate(np.asarray(levels)).tolist()
    info = {
        "clamped": clamped,
        "mse_blur_min": m_min,
        "mse_blur_max": m_max,
        "targets": targets.tolist(),
        "ve_sigma_min": ve_sigma_min,
        "ve_sigma_max": ve_sigma_max,
    }
    return levels, info
