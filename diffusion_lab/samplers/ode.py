"""The probability-flow ODE dx/dt = f - g^2 s / 2 (Khungurn sec. 7.3.3) by scipy's solve_ivp;
for Gaussian marginals written alpha' x0_hat + sigma' eps_hat, which a flow shares."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp

from diffusion_lab.config_types import PositiveInt
from diffusion_lab.processes.sde import PROBABILITY_FLOW, SDE
from diffusion_lab.samplers.base import (
    CountingModel,
    Model,
    SampleResult,
    StepCallback,
    final_denoise,
    initial_state,
    report,
    sampler,
)
from diffusion_lab.utils import batch_time


def integrate(
    rhs: Callable[[float, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    t_start: float,
    t_end: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
) -> torch.Tensor:
    """Solve dy/dt = rhs(t, y) from ``t_start`` to ``t_end`` with scipy's ``solve_ivp``.

    The state keeps the shape, dtype and device of ``y0``; scipy sees it flattened in float64.
    Shared by the probability-flow sampler, :func:`encode` / :func:`decode` and the likelihood
    (which augments the state with the log-density change).
    """
    shape, dtype, device = y0.shape, y0.dtype, y0.device

    def flat_rhs(t: float, y: np.ndarray) -> np.ndarray:
        state = torch.as_tensor(y, dtype=dtype, device=device).reshape(shape)
        return rhs(t, state).reshape(-1).double().cpu().numpy()

    solution = solve_ivp(
        flat_rhs,
        (t_start, t_end),
        y0.reshape(-1).double().cpu().numpy(),
        rtol=rtol,
        atol=atol,
        method=method,
    )
    if not solution.success:
        raise RuntimeError(f"probability-flow ODE solver failed: {solution.message}")
    return torch.as_tensor(solution.y[:, -1], dtype=dtype, device=device).reshape(shape)


def solve_probability_flow(
    score: CountingModel,
    process: SDE,
    x: torch.Tensor,
    t_start: float,
    t_end: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
) -> torch.Tensor:
    """Integrate the probability flow from ``t_start`` to ``t_end`` (either direction), its
    velocity ``process.probability_flow_velocity`` (alpha' x0_hat + sigma' eps_hat where the
    marginals are Gaussian, finite at a flow's t = 1)."""

    def velocity(t: float, state: torch.Tensor) -> torch.Tensor:
        return process.probability_flow_velocity(score, state, batch_time(t, state))

    return integrate(velocity, x, t_start, t_end, rtol, atol, method)


@sampler(requires=(PROBABILITY_FLOW,), time_grid="adaptive")
@torch.no_grad()
def probability_flow(
    model: Model,
    process: SDE,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: PositiveInt | None = None,
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

    ``steps`` stays None: the solver picks its own (NFE is reported); rtol and atol set the
    trade-off. Note: the VE SDE with this sampler is much worse than with the SDE one.
    """
    score = CountingModel(model, process)
    x = initial_state(process, x_or_shape, generator)
    x = solve_probability_flow(score, process, x, 1.0, eps, rtol, atol, method)
    trajectory = [] if return_trajectory else None
    report(callback, trajectory, x=x, t=eps, step=0)
    return SampleResult(final_denoise(score, process, x, eps, denoise), score.nfe, trajectory or [])


@torch.no_grad()
def encode(
    model: Model,
    process: SDE,
    x0: torch.Tensor,
    eps: float = 1e-5,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
) -> torch.Tensor:
    """The latent code z = x(1) of data x0 = x(eps): the probability flow run forward in time.

    Khungurn sec. 7.3.3 ("by solving the initial value problem with the input data point x(0), we
    get an encoding x(T)"); Song et al. 2021, sec. 4.3 and App. D.3 (eps = 1e-5 there). The map is
    deterministic and invertible up to solver error: :func:`decode` inverts it.
    """
    return solve_probability_flow(
        CountingModel(model, process), process, x0, eps, 1.0, rtol, atol, method
    )


@torch.no_grad()
def decode(
    model: Model,
    process: SDE,
    z: torch.Tensor,
    eps: float = 1e-5,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
) -> torch.Tensor:
    """x(eps) from a latent z = x(1): the probability flow backward in time, no final denoising
    step (so that ``decode(encode(x))`` returns x up to solver error)."""
    return solve_probability_flow(
        CountingModel(model, process), process, z, 1.0, eps, rtol, atol, method
    )
