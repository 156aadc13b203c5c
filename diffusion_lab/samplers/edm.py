"""The EDM samplers (Karras et al. 2022): Euler and Heun on the probability-flow ODE (Alg. 1) and
the stochastic sampler (Alg. 2), for every process with Gaussian marginals.

In the coordinates x~ = x / alpha(t) with noise level r = sigma(t) / alpha(t) (``grids.noise_
ratio``), the probability flow of any such process is Karras et al. eq. 3 with s = 1,
dx~/dr = (x~ - D(x~; r)) / r = eps, D the clean-image estimate and eps the noise estimate (the
model's ``predictions`` at the time of r), so VE, VP, sub-VP and the flows share one loop: the
process enters only through alpha(t), sigma(t) and the grid. The state is kept in x itself,
where the steps need no division by alpha: Euler's step from r to r' is
x' = alpha' D + sigma' eps, DDIM's with eta = 0 (a test), and Heun's correction adds
alpha' (r' - r) (eps' - eps) / 2 = (sigma' - alpha' r) (eps' - eps) / 2, eps' at Euler's x'.
On a flow the first step starts at r = infinity (alpha(1) = 0), where the correction's
(r' - r) is infinite: that step is Euler's, exact in its first order since D at t = 1 is the
data mean whatever x. The last step goes to r = 0, where x is D itself (Alg. 1, line 7 skips
the correction there), so N grid times cost N evaluations for Euler and 2N - 1 for Heun
(2N - 2 on a flow).

Alg. 2 raises the noise before each step: gamma_i = min(S_churn / N, sqrt 2 - 1) for r_i in
[S_tmin, S_tmax], r^ = r_i (1 + gamma_i), x^ = x~ + sqrt(r^2 - r_i^2) S_noise eps, then one
Heun step from r^ to r_{i+1}; in x, x^ = (alpha^ / alpha) x + alpha^ sqrt(r^2 - r_i^2) S_noise
eps. Here r^ is capped at r(1) (the process is not defined past t = 1). Soft Diffusion's process has no scalar alpha (its mean is an operator on x_0), so
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
from diffusion_lab.samplers.grids import sampling_times, time_of_ratio
from diffusion_lab.utils import batch_time


def _coefficients(process: SDE, times: list[float]) -> list[tuple[float, float]]:
    """(alpha, sigma) at each time, computed on the host (float64): reading them back from the
    device made the host wait for the device at every evaluation."""
    alphas, sigmas = process.marginal_coefficients(torch.tensor(times, dtype=torch.float64))
    return list(zip(alphas.tolist(), sigmas.tolist()))


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
    (``second_order=False``) Euler. NFE = steps for Euler, 2 steps - 1 for Heun (2 steps - 2
    on a flow, whose first step, from r = infinity, is Euler's)."""
    score = CountingModel(model, process)
    times = sampling_times(process, steps, grid, spacing, rho, t_min).tolist()
    marginals = _coefficients(process, times)
    ratio_max = marginals[0][1] / marginals[0][0] if marginals[0][0] > 0 else math.inf
    x = initial_state(process, x_or_shape, generator)
    trajectory = [] if return_trajectory else None
    gamma_max = min(s_churn / len(times), math.sqrt(2) - 1)
    for i, _, _ in step_pairs(torch.tensor([*times, 0.0]), progress, "edm"):
        t, (alpha, sigma) = times[i], marginals[i]
        r = sigma / alpha if alpha > 0 else math.inf
        gamma = gamma_max if s_tmin <= r <= s_tmax else 0.0
        r_hat = min(r * (1 + gamma), ratio_max)
        if r_hat > r:  # Alg. 2 lines 5-6 in x = alpha x~: x~ + sqrt(r^2 - r_i^2) S_noise eps
            t = float(time_of_ratio(process, torch.tensor([r_hat], dtype=torch.float64)))
            alpha_hat, sigma_hat = _coefficients(process, [t])[0]
            noise = alpha_hat * math.sqrt(r_hat**2 - r**2) * s_noise
            x = (alpha_hat / alpha) * x + noise * gaussian_like(x, generator)
            alpha, sigma, r = alpha_hat, sigma_hat, r_hat
        denoised, eps = score.predictions(x, batch_time(t, x))
        if i == len(times) - 1:  # to r = 0: x~ = D (Alg. 1 line 7 skips the correction)
            x = denoised
        else:
            alpha_next, sigma_next = marginals[i + 1]
            x_next = alpha_next * denoised + sigma_next * eps
            if second_order and alpha > 0:  # the mean of eps at both ends (Alg. 1 line 8)
                _, eps_next = score.predictions(x_next, batch_time(times[i + 1], x))
                x_next = x_next + (sigma_next - alpha_next * r) / 2 * (eps_next - eps)
            x = x_next
        t_next = times[i + 1] if i + 1 < len(times) else 0.0
        report(callback, trajectory, x=x, t=t_next, step=i, denoised=denoised)
    return SampleResult(x, score.nfe, trajectory or [])


#: Alg. 1 (Heun), its first-order form (Euler), and Alg. 2 with Karras et al.'s CIFAR-10 values
#: (Table 5: S_churn 30, S_tmin 0.01, S_tmax 1, S_noise 1.007).
heun = functools.partial(edm_sampler, second_order=True)
euler = functools.partial(edm_sampler, second_order=False)
edm_stochastic = functools.partial(edm_sampler, s_churn=30.0, s_tmin=0.01, s_tmax=1.0,
                                   s_noise=1.007)  # fmt: skip
