"""The EDM samplers (Karras et al. 2022): Euler and Heun on the probability-flow ODE (Alg. 1) and
the stochastic sampler (Alg. 2), for every process with Gaussian marginals.

In the coordinates x~ = x / alpha(t) with noise level r = sigma(t) / alpha(t) (``grids.noise_
ratio``), the probability flow of any such process is Karras et al. eq. 3 with s = 1,
dx~/dr = (x~ - D(x~; r)) / r, D the clean-image estimate (the model's ``denoised`` at the time
of r), so VE, VP and sub-VP share one loop: the process enters only through alpha(t),
sigma(t) and the grid. Euler's step is DDIM's with eta = 0 (the same update in other
coordinates; a test). The last step goes to r = 0, where x~ is D itself (Alg. 1, line 7 skips
the correction there), so N grid times cost N evaluations for Euler and 2N - 1 for Heun.

Alg. 2 raises the noise before each step: gamma_i = min(S_churn / N, sqrt 2 - 1) for r_i in
[S_tmin, S_tmax], r^ = r_i (1 + gamma_i), x^ = x~ + sqrt(r^2 - r_i^2) S_noise eps, then one
Heun step from r^ to r_{i+1}. Here r^ is capped at r(1) (the process is not defined past
t = 1). Soft Diffusion's process has no scalar alpha (its mean is an operator on x_0), so
these samplers need ``gaussian_sde``; its own Momentum samplers serve it (``samplers.soft``).
"""

from __future__ import annotations

import functools
import math

import torch

from diffusion_lab.config_types import PositiveInt
from diffusion_lab.processes.sde import SDE
from diffusion_lab.samplers.base import (
    CountingModel,
    Model,
    SampleResult,
    StepCallback,
    gaussian_like,
    initial_state,
    report,
    sampler,
    step_pairs,
)
from diffusion_lab.samplers.grids import noise_ratio, sampling_times, time_of_ratio
from diffusion_lab.utils import batch_time


def _alpha(process: SDE, t: float) -> float:
    """alpha(t), computed on the host (float64): reading it back from the device made the host
    wait for the device at every evaluation."""
    return float(process.marginal_coefficients(torch.tensor([t], dtype=torch.float64))[0])


def _derivative(
    score: CountingModel, process: SDE, x: torch.Tensor, t: float, ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx~/dr = (x~ - D) / r at x~ (Karras et al. eq. 3) and D, from one evaluation at time t."""
    denoised = score.denoised(_alpha(process, t) * x, batch_time(t, x))
    return (x - denoised) / ratio, denoised


@sampler(time_grid="choice")
@torch.no_grad()
def edm_sampler(
    model: Model,
    process: SDE,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: PositiveInt = 18,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    second_order: bool = True,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    grid: str = "levels",
    spacing: str = "trailing",
    rho: float = 7.0,
    t_min: float | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
) -> SampleResult:
    """Karras et al. Alg. 2; with S_churn = 0 Alg. 1 (Heun), and without the correction
    (``second_order=False``) Euler. NFE = steps for Euler, 2 steps - 1 for Heun."""
    score = CountingModel(model, process)
    times = sampling_times(process, steps, grid, spacing, rho, t_min)
    ratios = torch.cat([noise_ratio(process, times), torch.zeros(1)]).tolist()
    x = initial_state(process, x_or_shape, generator)
    x = x / _alpha(process, float(times[0]))
    times_next = torch.cat([times, torch.zeros(1)])
    trajectory = [] if return_trajectory else None
    gamma_max = min(s_churn / len(times), math.sqrt(2) - 1)
    for i, _, _ in step_pairs(times_next, progress, "edm"):
        t, r, r_next = float(times[i]), ratios[i], ratios[i + 1]
        gamma = gamma_max if s_tmin <= r <= s_tmax else 0.0
        r_hat = min(r * (1 + gamma), ratios[0])
        if r_hat > r:
            t = float(time_of_ratio(process, torch.tensor([r_hat], dtype=torch.float64)))
            x = x + math.sqrt(r_hat**2 - r**2) * s_noise * gaussian_like(x, generator)
        d, denoised = _derivative(score, process, x, t, r_hat)
        x_next = x + (r_next - r_hat) * d
        if second_order and r_next > 0:
            d_next, _ = _derivative(score, process, x_next, float(times[i + 1]), r_next)
            x_next = x + (r_next - r_hat) * (d + d_next) / 2
        x = x_next
        t_next = float(times_next[i + 1])
        report(callback, trajectory, x=_alpha(process, t_next) * x, t=t_next, step=i,
               denoised=denoised)  # fmt: skip
    return SampleResult(x, score.nfe, trajectory or [])


#: Alg. 1 (Heun), its first-order form (Euler), and Alg. 2 with Karras et al.'s CIFAR-10 values
#: (Table 5: S_churn 30, S_tmin 0.01, S_tmax 1, S_noise 1.007).
heun = functools.partial(edm_sampler, second_order=True)
euler = functools.partial(edm_sampler, second_order=False)
edm_stochastic = functools.partial(edm_sampler, s_churn=30.0, s_tmin=0.01, s_tmax=1.0,
                                   s_noise=1.007)  # fmt: skip
