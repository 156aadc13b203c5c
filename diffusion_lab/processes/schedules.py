"""Noise-level sequences: DDPM beta schedules and NCSN sigma schedules.

Beta schedules return the N per-step variances beta_1..beta_N of a discrete VP chain
(Khungurn sec. 7.1.2). Sigma schedules return L noise levels in the papers' order,
sigma_1 = sigma_max > ... > sigma_L = sigma_min (Spagnoletti et al. sec. 3).
"""

from __future__ import annotations

import math

import torch

from diffusion_lab.errors import ConfigError


def linear_betas(beta_start: float, beta_end: float, num_steps: int) -> torch.Tensor:
    """Arithmetic progression beta_1 = beta_start .. beta_N = beta_end (Ho et al. 2020: 1e-4 to 0.02)."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) eq. 17: alpha_bar(t) = cos^2((t/N + s)/(1 + s) * pi/2) / f(0).

    beta_i = 1 - alpha_bar(i)/alpha_bar(i-1), clipped at ``max_beta`` as in that paper.
    """
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def beta_schedule(name: str, num_steps: int, beta_min: float, beta_max: float) -> torch.Tensor:
    """Discrete betas by name, in Score SDE's parametrisation beta_i ~ beta(t_i) / N.

    "linear": beta_min / N .. beta_max / N, which for beta_min = 0.1, beta_max = 20, N = 1000 is
    exactly DDPM's 1e-4 .. 0.02. "cosine": Nichol & Dhariwal (beta_min/max unused).
    """
    if name == "linear":
        return linear_betas(beta_min / num_steps, beta_max / num_steps, num_steps)
    if name == "cosine":
        return cosine_betas(num_steps)
    raise ConfigError(f"unknown beta schedule {name!r}: use 'linear' or 'cosine'")


def geometric_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """sigma_i = sigma_max * (sigma_min / sigma_max)^((i-1)/(L-1)), i = 1..L (NCSN, Khungurn sec. 5.1)."""
    return torch.exp(
        torch.linspace(math.log(sigma_max), math.log(sigma_min), num_levels, dtype=torch.float64)
    )


def linear_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """sigma_i evenly spaced from sigma_max to sigma_min (Spagnoletti et al. sec. 4)."""
    return torch.linspace(sigma_max, sigma_min, num_levels, dtype=torch.float64)


SIGMA_SCHEDULES = {"geometric": geometric_sigmas, "linear": linear_sigmas}


def sigma_schedule(name: str, sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """The L noise levels of schedule ``name``, from sigma_max down to sigma_min exactly."""
    if not 0 < sigma_min < sigma_max:
        raise ConfigError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    if num_levels < 2:
        raise ConfigError(f"need at least 2 noise levels, got {num_levels}")
    if name not in SIGMA_SCHEDULES:
        raise ConfigError(
            f"unknown sigma schedule {name!r}: use one of {', '.join(sorted(SIGMA_SCHEDULES))}"
        )
    return SIGMA_SCHEDULES[name](sigma_max, sigma_min, num_levels)
