"""The fixed point of one time step (Na, Gao, Wan 2024, Alg. 1, eq. 14-15): policy iteration
m^{(k)} = A(m~ = m^{(k-1)})^{-1} rhs from m^{(0)} = m^{n-1}, until the 2-norm over all C*H*W
values of ||m^{(k)} - m^{(k-1)}|| is < tol; a step that does not converge in ``max_iterations``
raises :class:`FixedPointError` naming the step. Also the nonlinear residual
||A(m^n) m^n - rhs||_inf of the unlinearised discrete eq. 13/15.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .assembly import assemble_matrix, linearised_velocity, right_hand_side
from .linear_solvers import LinearSolver
from .timer import SolveTimer


class FixedPointError(RuntimeError):
    """The fixed-point iteration of a step did not reach its tolerance."""


@dataclass
class StepContext:
    """What every step of one solve shares."""

    shape: tuple[int, int, int]
    dt: float
    h: float
    stencil: str
    solver: LinearSolver
    timer: SolveTimer


def linear_step(
    ctx: StepContext,
    m_prev: np.ndarray,
    f: np.ndarray,
    g: float,
    forcing: np.ndarray,
    m_tilde: np.ndarray,
) -> np.ndarray:
    """One linear solve of eq. 15: A(m~) m = m^{n-1} + dt forcing, with m~ = ``m_tilde``."""
    with ctx.timer("assembly"):
        a = assemble_matrix(
            linearised_velocity(f, g, m_tilde, ctx.h), g, ctx.dt, ctx.h, ctx.stencil
        )
        rhs = right_hand_side(m_prev, forcing, ctx.dt, ctx.stencil)
    return ctx.solver.solve(a, rhs.ravel(), m_tilde.ravel()).reshape(ctx.shape)


def nonlinear_residual(
    ctx: StepContext,
    m: np.ndarray,
    m_prev: np.ndarray,
    f: np.ndarray,
    g: float,
    forcing: np.ndarray,
) -> float:
    """||A(m) m - rhs||_inf: how well m solves the (unlinearised) discrete eq. 13/15."""
    with ctx.timer("assembly"):
        a = assemble_matrix(linearised_velocity(f, g, m, ctx.h), g, ctx.dt, ctx.h, ctx.stencil)
        rhs = right_hand_side(m_prev, forcing, ctx.dt, ctx.stencil)
        return float(np.abs(a @ m.ravel() - rhs.ravel()).max())


def fixed_point_step(
    ctx: StepContext,
    m_prev: np.ndarray,
    f: np.ndarray,
    g: float,
    forcing: np.ndarray,
    tol: float,
    max_iterations: int,
    step: int,
) -> tuple[np.ndarray, int, float]:
    """Policy iteration of Alg. 1 within one step: m^{(k)} = A(m^{(k-1)})^{-1} rhs from
    m^{(0)} = m^{n-1}, until ||m^{(k)} - m^{(k-1)}||_2 < tol. Returns (m^n, iterations, change)."""
    ctx.solver.start_step(ctx.shape, g, ctx.dt, ctx.h)
    current = m_prev
    change = math.inf
    for k in range(1, max_iterations + 1):
        new = linear_step(ctx, m_prev, f, g, forcing, current)
        change = float(np.linalg.norm(new - current))
        current = new
        if not np.isfinite(change):
            break
        if change < tol:
            return current, k, change
    raise FixedPointError(
        f"the fixed point of step {step} did not converge in {max_iterations} iterations "
        f"(last change {change:.3e}, tol {tol:.1e})"
    )
