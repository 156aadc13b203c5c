"""The probability-flow ODE dx/dt = f - g^2 s / 2 (Khungurn sec. 7.3.3) by scipy's solve_ivp."""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp

from diffusion_lab.processes.sde import SDE, ScoreFn
from diffusion_lab.samplers.base import (
    CountingScore,
    SampleResult,
    StepCallback,
    final_denoise,
    initial_state,
    report,
)
from diffusion_lab.utils import batch_time


def solve_probability_flow(
    score: CountingScore,
    process: SDE,
    x: torch.Tensor,
    t_start: float,
    t_end: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
) -> torch.Tensor:
    """Integrate the probability flow from ``t_start`` to ``t_end`` (either direction)."""
    flow = process.reverse(score, probability_flow=True)
    shape, dtype, device = x.shape, x.dtype, x.device

    def velocity(t: float, y: np.ndarray) -> np.ndarray:
        state = torch.as_tensor(y, dtype=dtype, device=device).reshape(shape)
        drift, _ = flow.sde(state, batch_time(t, shape[0], device))
        return drift.reshape(-1).double().cpu().numpy()

    solution = solve_ivp(
        velocity,
        (t_start, t_end),
        x.reshape(-1).double().cpu().numpy(),
        rtol=rtol,
        atol=atol,
        method=method,
    )
    if not solution.success:
        raise RuntimeError(f"probability-flow ODE solver failed: {solution.message}")
    return torch.as_tensor(solution.y[:, -1], dtype=dtype, device=device).reshape(shape)


@torch.no_grad()
def probability_flow(
    score_fn: ScoreFn,
    process: SDE,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: int | None = None,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    eps: float = 1e-3,
    denoise: bool = True,
    return_trajectory: bool = False,
    progress: bool = True,
) -> SampleResult:
    """Sample by solving the probability-flow ODE from t = 1 to eps with an adaptive solver.

    ``steps`` is ignored (the solver picks its own; NFE is reported); rtol and atol set the
    trade-off. Note (PITFALLS): the VE SDE with this sampler is much worse than with the SDE one.
    """
    score = CountingScore(score_fn)
    x = initial_state(process, x_or_shape, generator)
    x = solve_probability_flow(score, process, x, 1.0, eps, rtol, atol, method)
    trajectory = [] if return_trajectory else None
    report(callback, trajectory, x=x, t=eps, step=0)
    return SampleResult(final_denoise(score, process, x, eps, denoise), score.nfe, trajectory or [])
