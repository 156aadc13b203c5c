"""DDPM beta schedules: the N per-step variances beta_1..beta_N of a discrete VP chain.

Khungurn sec. 7.1.2. Each entry of :data:`BETA_SCHEDULES` takes ``(num_steps, beta_min,
beta_max)`` in Score SDE's parametrisation beta_i ~ beta(t_i) / N;
:func:`diffusion_lab.schedules.beta_schedule` picks one by name. The names carry a ``beta_``
prefix so that none is also a sigma schedule's (``linear`` and ``cosine`` are both).
"""

from __future__ import annotations

import math

import torch


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


def scaled_linear_betas(num_steps: int, beta_min: float, beta_max: float) -> torch.Tensor:
    """beta_min / N .. beta_max / N: for beta_min = 0.1, beta_max = 20, N = 1000 exactly DDPM's
    1e-4 .. 0.02."""
    return linear_betas(beta_min / num_steps, beta_max / num_steps, num_steps)


def nichol_cosine_betas(num_steps: int, beta_min: float, beta_max: float) -> torch.Tensor:
    """:func:`cosine_betas` with the shared signature (beta_min and beta_max unused)."""
    return cosine_betas(num_steps)


BETA_SCHEDULES = {
    "beta_linear": scaled_linear_betas,
    "beta_cosine": nichol_cosine_betas,
}
