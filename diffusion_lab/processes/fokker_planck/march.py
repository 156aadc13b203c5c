"""The time march of the log-density Fokker-Planck equation (Na, Gao, Wan 2024, eq. 9, Alg. 1)
and the embedding of one image (sec. 3.4).

Time grid t_n = t_0 + n dt, dt = (T - t_0)/N, n = 0..N; g^n = g(t_n). ``iteration="per_step"``
(default): at each step n the fixed point of eq. 14-15 from m^{(0)} = m^{n-1}
(:func:`fixed_point_step`). ``iteration="sweep"`` is Alg. 1 literally: sweeps k over the whole
horizon n = 1..N, each linear solve using D m^{(k-1),n} from the previous sweep, until the 2-norm
of the change over all n is < tol; the initial guess m^{(0),n} = m^0 for every n (the KDE held
constant in time). At convergence both give the same fixed point. Per step the solution records
the iterations (for "sweep": the sweep count at every step), the last change and the nonlinear
residual ||A(m^n) m^n - rhs||_inf; the score is s^n = D m^n (eq. 19).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .assembly import STENCILS
from .fixed_point import (
    FixedPointError,
    StepContext,
    fixed_point_step,
    linear_step,
    nonlinear_residual,
)
from .grid import grad_sum, time_grid
from .kde import initial_log_density
from .linear_solvers import DEFAULT_SOLVER, SolverFactory, make_solver
from .timer import SolveTimer
from .transport import VELOCITIES, DiffusionFn, DriftFn, Fields, TransportFields

ITERATIONS = ("per_step", "sweep")


@dataclass
class FPSolution:
    """Output of :func:`solve_embedding` (or of :func:`march` with other fields); arrays are
    (N+1, C, H, W).

    ``x`` holds the embedded images x^0 = image .. x^N (None where nothing is transported).
    ``iterations``, ``changes``, ``residuals`` are per step n = 1..N (length N): fixed-point
    iterations (sweep count for ``iteration="sweep"``), the last change ||m^(k) - m^(k-1)||_2
    (for sweeps: the last change over the whole horizon) and ||A(m^n) m^n - rhs||_inf.
    ``seconds``: kde, assembly, factorisation, solve, transport, total (:class:`SolveTimer`).
    """

    x: np.ndarray | None
    log_density: np.ndarray
    score: np.ndarray
    times: np.ndarray
    iterations: np.ndarray
    changes: np.ndarray
    residuals: np.ndarray
    seconds: dict[str, float]
    krylov_iterations: int = 0


def march(
    m0: np.ndarray,
    fields: Fields,
    g_fn: DiffusionFn,
    times: np.ndarray,
    timer: SolveTimer,
    tol: float = 1e-6,
    max_iterations: int = 100,
    stencil: str = "derived",
    iteration: str = "per_step",
    solver: str | SolverFactory = DEFAULT_SOLVER,
    h: float = 1.0,
) -> FPSolution:
    """Solve eq. 9 from m^0 (C, H, W) over ``times`` with the coefficients ``fields`` gives:
    per-step fixed points or whole-horizon sweeps (the solution's ``x`` is None)."""
    if stencil not in STENCILS:
        raise ValueError(f"stencil must be one of {STENCILS}, got {stencil!r}")
    if iteration not in ITERATIONS:
        raise ValueError(f"iteration must be one of {ITERATIONS}, got {iteration!r}")
    linear = make_solver(solver, timer)
    ctx = StepContext(tuple(m0.shape), float(times[1] - times[0]), h, stencil, linear, timer)
    g = [float(g_fn(float(t))) for t in times]
    m, iterations, changes, residuals = _horizon(
        ctx, m0, fields, g, tol, max_iterations, iteration
    )  # the steps' coefficients are released before the score is taken
    with timer("transport"):
        score = grad_sum(m, h)  # eq. 19
    seconds = timer.seconds()
    return FPSolution(
        None, m, score, times, iterations, changes, residuals, seconds, linear.krylov_iterations
    )


def _horizon(
    ctx: StepContext,
    m0: np.ndarray,
    fields: Fields,
    g: list[float],
    tol: float,
    max_iterations: int,
    iteration: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """m^0..m^N, and per step the iterations, the last change and the nonlinear residual."""
    n_steps = len(g) - 1
    m = np.empty((n_steps + 1, *m0.shape))
    m[0] = m0
    iterations = np.zeros(n_steps, dtype=int)
    changes = np.zeros(n_steps)
    known: list[tuple[np.ndarray, np.ndarray]] = [None] * (n_steps + 1)  # type: ignore[list-item]
    fields.begin()
    if iteration == "per_step":
        for n in range(1, n_steps + 1):
            known[n] = fields.before(n, m[n - 1])
            m[n], iterations[n - 1], changes[n - 1] = fixed_point_step(
                ctx, m[n - 1], known[n][0], g[n], known[n][1], tol, max_iterations, n
            )
            fields.after(n, m[n])
    else:
        previous = np.broadcast_to(m0, m.shape).copy()  # m^{(0),n} = m^0 for every n
        for sweep in range(1, max_iterations + 1):
            fields.begin()
            for n in range(1, n_steps + 1):
                known[n] = fields.before(n, m[n - 1])
                ctx.solver.start_step(ctx.shape, g[n], ctx.dt, ctx.h)
                m[n] = linear_step(ctx, m[n - 1], known[n][0], g[n], known[n][1], previous[n])
                fields.after(n, m[n])
            change = float(np.linalg.norm(m - previous))
            previous = m.copy()
            if change < tol:
                iterations[:], changes[:] = sweep, change
                break
        else:
            raise FixedPointError(
                f"the sweeps did not converge in {max_iterations} sweeps "
                f"(last change {change:.3e}, tol {tol:.1e})"
            )
    residuals = np.array(
        [
            nonlinear_residual(ctx, m[n], m[n - 1], known[n][0], g[n], known[n][1])
            for n in range(1, n_steps + 1)
        ]
    )
    return m, iterations, changes, residuals


def solve_embedding(
    image: np.ndarray,
    drift: DriftFn,
    diffusion: DiffusionFn,
    num_steps: int = 10,
    t0: float = 0.0,
    T: float = 1.0,
    tol: float = 1e-6,
    max_iterations: int = 100,
    stencil: str = "derived",
    iteration: str = "per_step",
    velocity: str = "previous",
    solver: str | SolverFactory = DEFAULT_SOLVER,
    h: float = 1.0,
    kde: str = "exact",
) -> FPSolution:
    """Alg. 1 and the embedding of sec. 3.4 for one (C, H, W) image in [0, 1]: m^0 by KDE, the
    log-density FP steps interleaved with the transport of eq. 21 (see the transport module)."""
    if velocity not in VELOCITIES:
        raise ValueError(f"velocity must be one of {VELOCITIES}, got {velocity!r}")
    timer = SolveTimer()
    image = np.asarray(image, dtype=np.float64)
    with timer("kde"):
        m0 = initial_log_density(image, kde)
    times = time_grid(num_steps, t0, T)
    fields = TransportFields(image, drift, diffusion, times, h, velocity, timer)
    solution = march(
        m0, fields, diffusion, times, timer, tol, max_iterations, stencil, iteration, solver, h
    )
    return dataclasses.replace(solution, x=fields.x)
