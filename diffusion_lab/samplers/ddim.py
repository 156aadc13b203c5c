"""DDIM (Song, Meng & Ermon 2020, eq. 12 and 16) for any process with Gaussian marginals."""

from __future__ import annotations

import torch

from diffusion_lab.config_types import PositiveInt
from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.sde import SDE
from diffusion_lab.samplers.base import (
    CountingModel,
    Model,
    SampleResult,
    StepCallback,
    final_denoise,
    gaussian_like,
    initial_state,
    report,
    sampler,
    step_pairs,
)
from diffusion_lab.samplers.grids import sampling_times
from diffusion_lab.utils import append_dims, batch_time


@sampler(time_grid="choice")
@torch.no_grad()
def ddim(
    model: Model,
    process: SDE,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: PositiveInt | None = 50,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    spacing: str = "trailing",
    grid: str = "levels",
    rho: float = 7.0,
    t_min: float | None = None,
    denoise: bool = True,
    return_trajectory: bool = False,
    progress: bool = True,
) -> SampleResult:
    """x_prev = alpha_prev x0_hat + sqrt(sigma_prev^2 - s_eta^2) eps_hat + s_eta z (DDIM eq. 12).

    In the VP case alpha = sqrt(abar), sigma = sqrt(1 - abar), and
    s_eta = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev) (eq. 16), which is eta
    times the posterior std (``process.posterior_std``). eta = 0 is deterministic; eta = 1 is
    DDPM with the posterior variance. x0_hat and eps_hat are the model's ``predictions`` (for a
    plain score, by Tweedie: eps_hat = -sigma s, x0_hat = (x - sigma eps_hat) / alpha); nothing
    divides by alpha(t), so a flow (alpha(1) = 0) is sampled from t = 1 (where DDIM with eta = 0
    is Euler's step in t on the linear path).

    The times are ``grids.sampling_times`` (``grid``: the process's levels by default, or
    uniform, log-SNR, Karras), then t = 0; where t = 0 still carries noise (VE) the step there
    keeps its noise (eta > 0) and the final step is Tweedie's (``denoise``).
    """
    if eta < 0:
        raise ConfigError(f"DDIM eta must be >= 0, got {eta}")
    score = CountingModel(model, process)
    x = initial_state(process, x_or_shape, generator)
    times = sampling_times(process, steps, grid, spacing, rho, t_min)
    if times[-1] > 0:
        times = torch.cat([times, torch.zeros(1)])
    noisy = (process.std(times) > 0).tolist()
    trajectory = [] if return_trajectory else None
    for k, t, t_next in step_pairs(times, progress, "ddim"):
        t_b = batch_time(t, x)
        t_prev = batch_time(t_next, x)
        x0_hat, eps_hat = score.predictions(x, t_b)
        alpha_prev, sigma_prev = process.marginal_coefficients(t_prev)
        s_eta = eta * process.posterior_std(t_b, t_prev)
        direction = (sigma_prev**2 - s_eta**2).clamp(min=0).sqrt()
        x = append_dims(alpha_prev, x.ndim) * x0_hat + append_dims(direction, x.ndim) * eps_hat
        if eta > 0 and noisy[k + 1]:  # also into VE's noisy t = 0, where Tweedie follows
            x = x + append_dims(s_eta, x.ndim) * gaussian_like(x, generator)
        report(callback, trajectory, x=x, t=t_next, step=k, denoised=x0_hat)
    x = final_denoise(score, process, x, times[-1].item(), denoise)
    return SampleResult(x, score.nfe, trajectory or [])
