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
DDPM's posterior step. ``solver_type="heun"`` (k-diffusion's ``sample_dpmpp_2m_sde`` option, for
both solvers) weights the second-order difference by c = 1 / (1 - e^{-h'}) - 1 / h' instead of
the midpoint's 1/2 (h' = h for the ODE, 2 h for the SDE: the exponent of its data term), the
exact integral of a linear data prediction against the exponential weight; c -> 1/2 as h -> 0. Order 3 (DPM-Solver++(3M), the reference code's
``multistep_dpm_solver_third_update``) uses the last three data predictions m0, m1, m2 with
steps h, h_0, h_1 (r_0 = h_0 / h, r_1 = h_1 / h):

    D1_0 = (m0 - m1) / r_0,  D1_1 = (m1 - m2) / r_1,
    D1 = D1_0 + r_0 / (r_0 + r_1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1) / (r_0 + r_1),
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i phi_1 m0 + alpha_i phi_2 D1 - alpha_i phi_3 D2,

phi_1 = e^{-h} - 1, phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2; its first two steps are of
order 1 and 2 (no longer history), which bound its global order at 2 as the reference code's
warm-up does (measured on a Gaussian: closer to the exact flow than 2M on VE and sub-VP at 35
steps, not on VP); the ODE solver only. The grid ends with the step to the clean image (sigma = 0, h = infinity),
where both reduce to x = x0_{N-1}: that step is of order 1 (``lower_order_final`` in the
reference code, here always, as the second-order weight 1 / (2 r) vanishes there). A flow
starts where alpha = 0 (``processes.flow``): lambda = -infinity is a value, the first step has
h = infinity and e^{-h} = 0 (x_1 = sigma_1 x_0 + alpha_1 x0_0, DDIM's step), and the step after
it is of order 1 as well (r = infinity: its history is infinitely far in lambda). N grid times
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
from diffusion_lab.samplers.grids import coefficients_and_lambdas, sampling_times
from diffusion_lab.utils import batch_time

ORDERS = (1, 2, 3)
SOLVER_TYPES = ("midpoint", "heun")


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
    solver_type: str = "midpoint",
    grid: str = "levels",
    spacing: str = "trailing",
    rho: float = 7.0,
    t_min: float | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
) -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022 Alg. 2; ``order=1``: DDIM; ``order=3``: 3M), or with
    ``stochastic`` SDE-DPM-Solver++(2M) (their sec. 5); ``solver_type`` midpoint or heun for the
    second-order term. NFE = steps."""
    if order not in ORDERS:
        raise ConfigError(f"DPM-Solver++ order must be one of {ORDERS}, got {order}")
    if solver_type not in SOLVER_TYPES:
        raise ConfigError(
            f"DPM-Solver++ solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}"
        )
    if order == 3 and stochastic:
        raise ConfigError("DPM-Solver++ order 3 is the ODE solver's: use order 2 with stochastic")
    score = CountingModel(model, process)
    times = sampling_times(process, steps, grid, spacing, rho, t_min)
    alphas, sigmas, lambdas = coefficients_and_lambdas(process, times)
    x = initial_state(process, x_or_shape, generator)
    trajectory = [] if return_trajectory else None
    history: list[tuple[torch.Tensor, float]] = []  # (x0_j, h_j) of the last steps, newest last
    times_next = torch.cat([times, torch.zeros(1)])
    for i, t, _ in step_pairs(times_next, progress, "dpm_solver++"):
        x0 = score.denoised(x, batch_time(t, x))
        if i == len(times) - 1:  # the last step, to sigma = 0: x = x0 (h = infinity)
            x = x0
            report(callback, trajectory, x=x, t=0.0, step=i, denoised=x0)
            break
        h = lambdas[i + 1] - lambdas[i]
        ratio = sigmas[i + 1] / sigmas[i]
        if order == 3 and len(history) >= 2:
            x = ratio * x + alphas[i + 1] * _third_order_increment(x0, history, h)
        else:
            data = x0
            if order >= 2 and history:
                r = history[-1][1] / h
                weight = _difference_weight(2 * h if stochastic else h, solver_type)
                data = x0 + weight * (x0 - history[-1][0]) / r
            if stochastic:
                x = (ratio * math.exp(-h)) * x + alphas[i + 1] * -math.expm1(-2 * h) * data
                noise = sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h))
                x = x + noise * gaussian_like(x, generator)
            else:
                x = ratio * x - alphas[i + 1] * math.expm1(-h) * data
        history = [*history[-1:], (x0, h)]
        report(callback, trajectory, x=x, t=float(times[i + 1]), step=i, denoised=x0)
    return SampleResult(x, score.nfe, trajectory or [])


def _difference_weight(h: float, solver_type: str) -> float:
    """The weight of (x0_{i-1} - x0_{i-2}) / r in the second-order data term: 1/2 (midpoint) or
    1 / (1 - e^{-h}) - 1 / h (heun)."""
    if solver_type == "midpoint":
        return 0.5
    return -1 / math.expm1(-h) - 1 / h


def _third_order_increment(
    m0: torch.Tensor, history: list[tuple[torch.Tensor, float]], h: float
) -> torch.Tensor:
    """-phi_1 m0 + phi_2 D1 - phi_3 D2 of DPM-Solver++(3M) (the module docstring), from the
    two previous data predictions and the steps that followed them."""
    (m2, h_1), (m1, h_0) = history
    r0, r1 = h_0 / h, h_1 / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_1 = math.expm1(-h)
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    return -phi_1 * m0 + phi_2 * d1 - phi_3 * d2


#: SDE-DPM-Solver++(2M).
sde_dpm_solver_pp = functools.partial(dpm_solver_pp, stochastic=True)
#: DPM-Solver++(3M).
dpm_solver_pp_3m = functools.partial(dpm_solver_pp, order=3)
