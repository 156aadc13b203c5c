"""Langevin dynamics: the corrector of Score SDE and NCSN's annealed sampler share one step."""

from __future__ import annotations

import torch

from diffusion_lab.processes.sde import SDE
from diffusion_lab.samplers.base import CountingModel, gaussian_like
from diffusion_lab.utils import append_dims, batch_time


def langevin_step(
    x: torch.Tensor,
    score: torch.Tensor,
    step_size: torch.Tensor | float,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x + eps s(x) + sqrt(2 eps) z (Khungurn sec. 4); returns the new x and its mean x + eps s."""
    step_size = append_dims(torch.as_tensor(step_size, dtype=x.dtype, device=x.device), x.ndim)
    mean = x + step_size * score
    return mean + (2 * step_size).sqrt() * noise, mean


def langevin_corrector(
    score: CountingModel,
    process: SDE,
    x: torch.Tensor,
    t: float,
    generator: torch.Generator | None,
    snr: float = 0.16,
    n_steps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score SDE's Langevin corrector (Song et al. 2021, Alg. 4 and 5).

    eps = 2 a (snr ||z|| / ||s||)^2 with norms averaged over the batch and a = 1 - beta_i for VP,
    1 for VE: generically the squared one-level transition coefficient a^2 of the process. The
    target signal-to-noise ratio needs tuning (typically 0.05-0.2; Score SDE's CIFAR-10 configs use 0.16).
    """
    t_b = batch_time(t, x)
    a, _ = process.transition_coefficients((t_b - 1.0 / process.num_steps).clamp(min=0), t_b)
    mean = x
    for _ in range(n_steps):
        s = score(x, t_b)
        noise = gaussian_like(x, generator)
        noise_norm = noise.flatten(1).norm(dim=1).mean()
        grad_norm = s.flatten(1).norm(dim=1).mean()
        step_size = 2 * a**2 * (snr * noise_norm / grad_norm) ** 2
        x, mean = langevin_step(x, s, step_size, noise)
    return x, mean
