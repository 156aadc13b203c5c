"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: fast solver for guided sampling of diffusion
probabilistic models"): the multistep second-order solver with data prediction (2M, Alg. 2) and
its stochastic variant (SDE-DPM-Solver++ 2M), for every process with Gaussian marginals.

With lambda_t = log(alpha_t / sigma_t) (half the log-SNR), h_i = lambda_{t_i} - lambda_{t_{i-1}}
and x0_i the data prediction (the model's ``denoised``) at t_i, one step of order 1 is

    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) x0_{i-1}      (their eq. 8)

which is DDIM with eta = 0 (a test), and order 2 replaces x0_{i-1} by
D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2}, r_i = h_{i-1} / h_i (Alg. 2; the first
step has no history and is of order 1). The stochastic variant (their sec. 5 / App. B) is

    x_i = (sigma_i / sigma_{i-1}) e^{-h_i} x_{i-1} + alpha_i (1 - e^{-2 h_i}) D_i
          + sigma_i sqrt(1 - e^{-2 h_i}) z,

with D_i the same combination (order 2: x0_{i-1} + (x0_{i-1} - x0_{i-2}) / (2 r_i)); order 1 is
DDPM's posterior step. The grid ends with the step to the clean image (sigma = 0, h = infinity),
where both reduce to x = x0_{N-1}: that step is of order 1 (``lower_order_final`` in the
reference code, here always, as the second-order weight 1 / (2 r) vanishes there). N grid times
cost N evaluations. Soft Diffusion's process has no scalar alpha: these need ``gaussian_sde``.
"""

from __future__ import annotations

import functools
import math

import torch

from diffusion_lab.config_types import PositiveInt
from diffusion_lab.errors import ConfigError
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
from diffusion_lab.samplers.grids import sampling_times
from diffusion_lab.utils import batch_time

ORDERS = (1, 2)


@sampler(time_grid="choice")
@torch.no_grad()
def dpm_solver_pp(
    model: Model,
    process: SDE,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: PositiveInt = 20,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    order: int = 2,
    stochastic: bool = False,
    grid: str = "levels",
    spacing: str = "trailing",
    rho: float = 7.0,
    t_min: float | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
) -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022 Alg. 2; ``order=1``: DDIM), or with ``stochastic``
    SDE-DPM-Solver++(2M) (their sec. 5). NFE = steps."""
    if order not in ORDERS:
        raise ConfigError(f"DPM-Solver++ order must be one of {ORDERS}, got {order}")
    score = CountingModel(model, process)
    times = sampling_times(process, steps, grid, spacing, rho, t_min)
    alphas, sigmas = (c.double().tolist() for c in process.marginal_coefficients(times))
    lambdas = [math.log(a / s) for a, s in zip(alphas, sigmas)]
    x = initial_state(process, x_or_shape, generator)
    trajectory = [] if return_trajectory else None
    previous: tuple[torch.Tensor, float] | None = None  # (x0_{i-1}, h_{i-1})
    times_next = torch.cat([times, torch.zeros(1)])
    for i, t, _ in step_pairs(times_next, progress, "dpm_solver++"):
        x0 = score.denoised(x, batch_time(t, x))
        if i == len(times) - 1:  # the last step, to sigma = 0: x = x0 (h = infinity)
            x = x0
            report(callback, trajectory, x=x, t=0.0, step=i, denoised=x0)
            break
        h = lambdas[i + 1] - lambdas[i]
        data = x0
        if order == 2 and previous is not None:
            r = previous[1] / h
            data = x0 + (x0 - previous[0]) / (2 * r)
        ratio = sigmas[i + 1] / sigmas[i]
        if stochastic:
            x = (ratio * math.exp(-h)) * x + alphas[i + 1] * -math.expm1(-2 * h) * data
            x = x + sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h)) * gaussian_like(x, generator)
        else:
            x = ratio * x - alphas[i + 1] * math.expm1(-h) * data
        previous = (x0, h)
        report(callback, trajectory, x=x, t=float(times[i + 1]), step=i, denoised=x0)
    return SampleResult(x, score.nfe, trajectory or [])


#: SDE-DPM-Solver++(2M).
sde_dpm_solver_pp = functools.partial(dpm_solver_pp, stochastic=True)
