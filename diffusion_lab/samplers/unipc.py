"""UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework for fast sampling of
diffusion models"): the multistep predictor UniP-p and corrector UniC-p with data prediction
(their Alg. 2 and 3, sec. 3 and App. C), for every process with Gaussian marginals.

With lambda = log(alpha / sigma), h = lambda_t - lambda_s the step from s = t_{i-1} to t,
m_0 the data prediction at s and m_k at the earlier times s_k (r_k = (lambda_{s_k} - lambda_s)
/ h, D_k = (m_k - m_0) / r_k), both updates are

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) m_0 - alpha_t B(h) sum_k rho_k D_k,

with B(h) = -h (``variant="bh1"``) or e^{-h} - 1 (``"bh2"``, the reference code's default); UniP-2
with bh2 is DPM-Solver++(2M) (a test). The
predictor's rho solve R rho = b over the earlier points (order 2: rho = 1/2); the corrector adds
the point t itself (r = 1, D = m_t - m_0, the model's data prediction at the predicted x_t,
order 1: rho = 1/2) and replaces x_t: the evaluation the next predictor needs anyway, so the
corrector costs no NFE. R_{ik} = r_k^(i-1), b_i = phi_{i+1}(h) i! / B(h) with phi_1 = e^{-h} - 1
(in -h), phi_{k+1} = phi_k / (-h) - 1 / k! (the reference code's recursion). The first steps
are of lower order (their history is short), and so is the last (``lower_order_final``); it
goes to the clean image, x = m. On a flow (alpha(1) = 0) the first point has lambda =
-infinity, infinitely far for a finite difference: it serves m_0 of the first step only, and
later steps use the points after it. N grid times cost N evaluations.
"""

from __future__ import annotations

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
    initial_state,
    report,
    sampler,
    step_pairs,
)
from diffusion_lab.samplers.grids import coefficients_and_lambdas, sampling_times
from diffusion_lab.utils import batch_time

VARIANTS = ("bh1", "bh2")


def _b(h: float, variant: str) -> float:
    """B(h): -h (bh1) or e^{-h} - 1 (bh2); bh2's on an infinite step, where -h is not a
    number to scale a difference by (the rho of such a step are fixed at 1/2)."""
    return -h if variant == "bh1" and math.isfinite(h) else math.expm1(-h)


def _weights(h: float, rks: list[float], variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """R (len(rks) x len(rks)) and b of the module docstring, in float64."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = _b(h, variant)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, b = [], []
    for i in range(1, len(rks) + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)


def _update(
    x: torch.Tensor,
    coefficients: tuple[float, float, float, float],
    history: list[tuple[torch.Tensor, float]],
    order: int,
    variant: str,
    model_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """UniP-``order`` (``model_t`` None) or UniC-``order`` from x at s to t; ``coefficients``
    are (alpha_t, sigma_t, sigma_s, lambda_t); ``history`` the (m, lambda) of the last points,
    newest (s) last."""
    alpha_t, sigma_t, sigma_s, lambda_t = coefficients
    m0, lambda_s = history[-1]
    h = lambda_t - lambda_s
    rks, differences = [], []
    for m_k, lambda_k in reversed(history[-order:-1]):
        rks.append((lambda_k - lambda_s) / h)
        differences.append((m_k - m0) / rks[-1])
    if model_t is None:
        if order == 1:
            rhos: list[float] = []
        elif order == 2:
            rhos = [0.5]
        else:
            rows, b = _weights(h, [*rks, 1.0], variant)
            rhos = torch.linalg.solve(rows[:-1, :-1], b[:-1]).tolist()
    else:
        differences.append(model_t - m0)
        if order == 1:
            rhos = [0.5]
        else:
            rows, b = _weights(h, [*rks, 1.0], variant)
            rhos = torch.linalg.solve(rows, b).tolist()
    b_h = _b(h, variant)
    x_t = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * m0
    for rho, difference in zip(rhos, differences, strict=True):
        x_t = x_t - (alpha_t * b_h * rho) * difference
    return x_t


@sampler(time_grid="choice")
@torch.no_grad()
def unipc(
    model: Model,
    process: SDE,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: PositiveInt = 20,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    order: int = 2,
    variant: str = "bh2",
    corrector: bool = True,
    grid: str = "levels",
    spacing: str = "trailing",
    rho: float = 7.0,
    t_min: float | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
) -> SampleResult:
    """UniPC-``order`` (UniP-p with UniC-p after each evaluation; ``corrector=False``: UniP
    alone). NFE = steps."""
    if order not in (1, 2, 3):
        raise ConfigError(f"UniPC order must be 1, 2 or 3, got {order}")
    if variant not in VARIANTS:
        raise ConfigError(f"UniPC variant must be one of {VARIANTS}, got {variant!r}")
    score = CountingModel(model, process)
    times = sampling_times(process, steps, grid, spacing, rho, t_min)
    alphas, sigmas, lambdas = coefficients_and_lambdas(process, times)
    x = initial_state(process, x_or_shape, generator)
    trajectory = [] if return_trajectory else None
    history: list[tuple[torch.Tensor, float]] = []  # (m, lambda) of the usable points
    last_x, last_order = x, 0
    for i, t, _ in step_pairs(torch.cat([times, torch.zeros(1)]), progress, "unipc"):
        x0 = score.denoised(x, batch_time(t, x))
        if corrector and history:  # UniC at t_i with the point it just evaluated
            coefficients = (alphas[i], sigmas[i], sigmas[i - 1], lambdas[i])
            x = _update(last_x, coefficients, history, last_order, variant, model_t=x0)
        if math.isinf(lambdas[i - 1] if i else 0.0):
            history = []  # a point at lambda = -infinity gives no finite difference
        history = [*history[-(order - 1) :], (x0, lambdas[i])] if order > 1 else [(x0, lambdas[i])]
        if i == len(times) - 1:  # the last step, to sigma = 0: x = m (h = infinity)
            x = x0
            report(callback, trajectory, x=x, t=0.0, step=i, denoised=x0)
            break
        last_order = min(order, len(history), len(times) - i)  # lower_order_final
        last_x = x
        coefficients = (alphas[i + 1], sigmas[i + 1], sigmas[i], lambdas[i + 1])
        x = _update(x, coefficients, history, last_order, variant)
        report(callback, trajectory, x=x, t=float(times[i + 1]), step=i, denoised=x0)
    return SampleResult(x, score.nfe, trajectory or [])
