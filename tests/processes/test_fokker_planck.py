"""The log-density Fokker-Planck solver of FP score embedding (diffusion_lab.processes.fokker_planck).

Numbers against closed forms, in float64: a manufactured solution (order 2 in h, 1 in dt), the
sparse matrix against a per-node dense assembly, exact row sums, the exact decay of sine modes,
the zero padding, the KDE's closed form, the transport step, and the fixed point for VE / VP.
Every linear solver, the benchmark's variants (experiments/fp_solver_variants.py) included, is
checked against a dense solve.
"""

from __future__ import annotations

import importlib.util
import math
import time

import numpy as np
import pytest
import torch
from helpers import EXPERIMENTS

from diffusion_lab.processes import fokker_planck as fp
from diffusion_lab.processes.fokker_planck.grid import time_grid
from diffusion_lab.processes.fokker_planck.march import march
from diffusion_lab.processes.fokker_planck.timer import PHASES, SolveTimer
from diffusion_lab.processes.sde import VESDE, VPSDE


def _load_variants() -> dict[str, fp.linear_solvers.SolverFactory]:
    """The benchmark's solver table: the package's solvers and the experiments' variants."""
    path = EXPERIMENTS / "fp_solver_variants.py"
    spec = importlib.util.spec_from_file_location("fp_solver_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SOLVERS


ALL_SOLVERS = _load_variants()


def _laplacian(u: np.ndarray, h: float = 1.0) -> np.ndarray:
    """L u of eq. 11: (sum of the 4 neighbours - 4 u_ij) / h^2, zero padded (last two axes)."""
    out = -4.0 * np.asarray(u, dtype=np.float64)
    out[..., :-1, :] += u[..., 1:, :]
    out[..., 1:, :] += u[..., :-1, :]
    out[..., :, :-1] += u[..., :, 1:]
    out[..., :, 1:] += u[..., :, :-1]
    return out / h**2


def _dense(v: np.ndarray, g: float, dt: float, h: float, stencil: str) -> np.ndarray:
    """Per-node assembly with plain loops (zero padding: missing neighbours are dropped)."""
    c_, nh, nw = v.shape
    n = v.size
    a = np.zeros((n, n))
    for c in range(c_):
        for i in range(nh):
            for j in range(nw):
                row = (c * nh + i) * nw + j
                vv = v[c, i, j]
                if stencil == "derived":
                    diag = 1 + 2 * g**2 * dt / h**2
                    plus = -0.5 * g**2 * dt / h**2 + vv * dt / (2 * h)
                    minus = -0.5 * g**2 * dt / h**2 - vv * dt / (2 * h)
                else:
                    diag = 2 * g**2 * dt / h**2
                    plus = vv * dt / h + 0.5 * g**2 * dt / h**2
                    minus = vv * dt / h - 0.5 * g**2 * dt / h**2
                a[row, row] = diag
                for di, dj, coef in ((1, 0, plus), (0, 1, plus), (-1, 0, minus), (0, -1, minus)):
                    ii, jj = i + di, j + dj
                    if 0 <= ii < nh and 0 <= jj < nw:
                        a[row, (c * nh + ii) * nw + jj] = coef
    return a


@pytest.mark.parametrize("stencil", fp.STENCILS)
@pytest.mark.parametrize("h", [1.0, 0.3])
def test_sparse_matrix_equals_dense_assembly(stencil: str, h: float) -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(2, 4, 5))
    g, dt = float(rng.uniform(0.5, 3)), float(rng.uniform(0.01, 0.5))
    sparse = fp.assemble_matrix(v, g, dt, h, stencil).toarray()
    dense = _dense(v, g, dt, h, stencil)
    np.testing.assert_allclose(sparse, dense, rtol=0, atol=1e-12)
    b = rng.normal(size=v.size)
    reference = np.linalg.solve(dense, b)
    x = fp.SOLVERS["lu"]().solve(fp.assemble_matrix(v, g, dt, h, stencil), b, np.zeros_like(b))
    np.testing.assert_allclose(x, reference, rtol=0, atol=1e-10 * np.abs(reference).max())


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_every_solver_matches_dense_solve(solver: str) -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(size=(3, 6, 7))
    g, dt, h = 2.0, 0.3, 1.0
    a = fp.assemble_matrix(v, g, dt, h)
    b = rng.normal(size=v.size)
    reference = np.linalg.solve(a.toarray(), b)
    linear = ALL_SOLVERS[solver](SolveTimer())
    linear.start_step(v.shape, g, dt, h)
    for _ in range(2):  # the second call reuses per-step work where the solver does
        x = linear.solve(a, b, np.zeros_like(b))
        np.testing.assert_allclose(x, reference, rtol=0, atol=1e-10 * np.abs(reference).max())


def test_row_sums() -> None:
    rng = np.random.default_rng(2)
    v = rng.normal(size=(1, 6, 6))
    interior = np.zeros((6, 6), bool)
    interior[1:-1, 1:-1] = True
    derived = np.asarray(fp.assemble_matrix(v, 1.7, 0.2, 0.5).sum(1)).reshape(6, 6)
    np.testing.assert_allclose(derived[interior], 1.0, rtol=0, atol=1e-14)
    assert np.all(np.abs(derived[~interior] - 1) > 1e-3)  # missing neighbours at the border
    printed = np.asarray(fp.assemble_matrix(v, 1.7, 0.2, 1.0, "printed").sum(1)).reshape(6, 6)
    assert np.all(np.abs(printed[interior] - 1) > 1e-3)


def test_sine_modes_decay_exactly() -> None:
    nh, nw, g, dt = 7, 9, 1.3, 0.4
    i = np.arange(nh)[:, None]
    j = np.arange(nw)[None, :]
    a = fp.assemble_matrix(np.zeros((1, nh, nw)), g, dt)  # v = 0: no linearisation
    for p, q in [(1, 1), (2, 5), (7, 9)]:
        mode = np.sin(p * np.pi * (i + 1) / (nh + 1)) * np.sin(q * np.pi * (j + 1) / (nw + 1))
        mu = 4 * math.sin(p * math.pi / (2 * (nh + 1))) ** 2
        mu += 4 * math.sin(q * math.pi / (2 * (nw + 1))) ** 2
        factor = 1 / (1 + 0.5 * g**2 * dt * mu)
        for solver in ("lu", fp.DEFAULT_SOLVER):
            linear = fp.SOLVERS[solver]()
            linear.start_step((1, nh, nw), g, dt, 1.0)
            out = linear.solve(a, mode.ravel(), np.zeros(mode.size)).reshape(nh, nw)
            np.testing.assert_allclose(out, factor * mode, rtol=0, atol=1e-12 * factor)


def test_zero_padding_of_constant_field() -> None:
    c, h = 2.5, 0.5
    u = np.full((1, 4, 5), c)
    d = fp.grad_sum(u, h)[0]
    lap = _laplacian(u, h)[0]
    np.testing.assert_array_equal(d[1:-1, 1:-1], 0.0)
    np.testing.assert_array_equal(lap[1:-1, 1:-1], 0.0)
    # corners: (0,0) misses both minus neighbours, (H-1,W-1) both plus ones, (0,W-1) one each
    assert d[0, 0] == pytest.approx(2 * c / (2 * h), abs=1e-15)
    assert d[-1, -1] == pytest.approx(-2 * c / (2 * h), abs=1e-15)
    assert d[0, -1] == 0.0 and d[-1, 0] == 0.0
    np.testing.assert_allclose(d[0, 1:-1], c / (2 * h), rtol=0, atol=1e-15)  # top edge
    np.testing.assert_allclose(d[1:-1, -1], -c / (2 * h), rtol=0, atol=1e-15)  # right edge
    for corner in (lap[0, 0], lap[0, -1], lap[-1, 0], lap[-1, -1]):
        assert corner == pytest.approx(-2 * c / h**2, abs=1e-13)
    np.testing.assert_allclose(lap[0, 1:-1], -c / h**2, rtol=0, atol=1e-13)
    np.testing.assert_allclose(lap[1:-1, 0], -c / h**2, rtol=0, atol=1e-13)


@pytest.mark.parametrize("method", fp.KDES)
def test_kde_closed_form(method: str) -> None:
    rng = np.random.default_rng(3)
    image = np.round(rng.beta(2, 5, size=(2, 12, 15)) * 255) / 255  # ties, as in 8-bit images
    m0 = fp.initial_log_density(image, method)
    for c in range(2):
        u = image[c].ravel()
        n = u.size
        b = n ** (-1 / 5)
        kernel = np.clip(1 - np.abs(u[:, None] - u[None, :]) / b, 0, None)
        expected = np.log(kernel.sum(1) / (n * b))
        np.testing.assert_allclose(m0[c].ravel(), expected, rtol=0, atol=1e-10)


def test_transport_step_and_zero_score() -> None:
    rng = np.random.default_rng(4)
    x, f, s = rng.normal(size=(3, 2, 4, 4))
    out = fp.transport_step(x, f, 1.5, s, 0.1)
    np.testing.assert_allclose(out, x + 0.1 * (f - 0.5 * 1.5**2 * s), rtol=0, atol=1e-15)
    still = fp.transport_step(x, np.zeros_like(x), 3.0, np.zeros_like(x), 0.1)
    np.testing.assert_array_equal(still, x)


def _image(size: int = 8, channels: int = 3, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 1, size)[None, :, None] * np.linspace(0.2, 1, size)[None, None, :]
    return np.clip(base + 0.1 * rng.normal(size=(channels, size, size)), 0, 1)


def test_ve_fixed_point_converges_and_sweep_agrees() -> None:
    image = _image()
    drift, diffusion = fp.sde_coefficients(VESDE(sigma_min=0.01, sigma_max=50.0))
    tol = 1e-8
    per_step = fp.solve_embedding(image, drift, diffusion, num_steps=6, tol=tol)
    assert np.all(per_step.changes < tol) and np.all(per_step.iterations >= 2)
    assert per_step.residuals.max() < 1e-5
    np.testing.assert_array_equal(per_step.x[0], image)
    np.testing.assert_allclose(per_step.score, fp.grad_sum(per_step.log_density), atol=1e-15)
    sweep = fp.solve_embedding(image, drift, diffusion, num_steps=6, tol=tol, iteration="sweep")
    assert np.all(sweep.changes < tol)
    np.testing.assert_allclose(sweep.log_density, per_step.log_density, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sweep.x, per_step.x, rtol=0, atol=1e-6)
    exact = fp.solve_embedding(image, drift, diffusion, num_steps=6, tol=tol, solver="lu")
    np.testing.assert_allclose(exact.log_density, per_step.log_density, rtol=0, atol=1e-8)
    # VE: f = 0, so x^n = x^{n-1} - dt/2 g(t_{n-1})^2 D m^{n-1} (eq. 21 with eq. 3's velocity)
    dt = 1 / 6
    for n in range(1, 7):
        g = diffusion(per_step.times[n - 1])
        expected = per_step.x[n - 1] - dt * 0.5 * g**2 * per_step.score[n - 1]
        np.testing.assert_allclose(per_step.x[n], expected, rtol=0, atol=1e-12)


def test_timer_totals_each_phase() -> None:
    timer = SolveTimer()
    with timer("solve"):
        time.sleep(0.02)
    with timer("solve"):
        time.sleep(0.01)
    seconds = timer.seconds()
    assert list(seconds) == [*PHASES, "total"]
    assert 0.03 <= seconds["solve"] <= seconds["total"]
    assert all(seconds[phase] == 0.0 for phase in PHASES if phase != "solve")
    drift, diffusion = fp.sde_coefficients(VESDE(sigma_min=0.01, sigma_max=50.0))
    solution = fp.solve_embedding(_image(), drift, diffusion, num_steps=3).seconds
    assert all(solution[phase] > 0 for phase in PHASES)
    assert sum(solution[phase] for phase in PHASES) <= solution["total"]


def test_fixed_point_failure_names_the_step() -> None:
    drift, diffusion = fp.sde_coefficients(VESDE(sigma_min=0.01, sigma_max=50.0))
    with pytest.raises(fp.FixedPointError, match="step 1"):
        fp.solve_embedding(_image(), drift, diffusion, num_steps=3, tol=1e-30, max_iterations=2)


def test_vp_drift_through_sde_coefficients() -> None:
    sde = VPSDE()
    drift, diffusion = fp.sde_coefficients(sde)
    image = _image(channels=2)
    x = torch.from_numpy(image)[None]
    f_ref, g_ref = sde.sde(x, torch.tensor([0.3], dtype=torch.float64))
    np.testing.assert_allclose(drift(image, 0.3), f_ref[0].numpy(), rtol=1e-12)
    assert diffusion(0.3) == pytest.approx(float(g_ref[0]), rel=1e-12)
    assert np.abs(drift(image, 0.3)).max() > 0.1
    sol = fp.solve_embedding(image, drift, diffusion, num_steps=5, tol=1e-10, solver="lu")
    dt = 0.2
    for n in range(1, 6):  # interleaved: f^{n-1} = f(x^{n-1}, t_{n-1})
        t_prev = sol.times[n - 1]
        velocity = drift(sol.x[n - 1], t_prev) - 0.5 * diffusion(t_prev) ** 2 * sol.score[n - 1]
        np.testing.assert_allclose(sol.x[n], sol.x[n - 1] + dt * velocity, rtol=0, atol=1e-12)
        # m^n solves the step with f^n = f(x^n, t_n) and forcing -(D f^n)
        f_n = drift(sol.x[n], sol.times[n])
        a = fp.assemble_matrix(
            fp.linearised_velocity(f_n, diffusion(sol.times[n]), sol.log_density[n]),
            diffusion(sol.times[n]),
            dt,
        )
        rhs = sol.log_density[n - 1] - dt * fp.grad_sum(f_n)
        assert np.abs(a @ sol.log_density[n].ravel() - rhs.ravel()).max() < 1e-8


def test_heun_velocity() -> None:
    drift, diffusion = fp.sde_coefficients(VESDE(sigma_min=0.01, sigma_max=50.0))
    sol = fp.solve_embedding(_image(), drift, diffusion, num_steps=4, velocity="average")
    dt = 0.25
    for n in range(1, 5):
        g0, g1 = diffusion(sol.times[n - 1]), diffusion(sol.times[n])
        step = -0.5 * (g0**2 * sol.score[n - 1] + g1**2 * sol.score[n]) / 2
        np.testing.assert_allclose(sol.x[n], sol.x[n - 1] + dt * step, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- manufactured

C_DRIFT, G_CONST = 0.5, 0.8


class GivenFields:
    """f(t) given as a field of t only (no transport), forcing -(D f)(t) or ``forcing_fn(t)``."""

    def __init__(self, f_fn, forcing_fn, times: np.ndarray, h: float) -> None:
        self.f_fn, self.forcing_fn, self.times, self.h = f_fn, forcing_fn, times, h

    def begin(self) -> None:
        """Nothing to reset between passes."""

    def before(self, n: int, m_prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = float(self.times[n])
        f = np.asarray(self.f_fn(t), dtype=np.float64)
        forcing = -fp.grad_sum(f, self.h) if self.forcing_fn is None else self.forcing_fn(t)
        return f, np.asarray(forcing, dtype=np.float64)

    def after(self, n: int, m: np.ndarray) -> None:
        """Nothing is transported."""


def solve_log_density(
    m0, f_fn, g_fn, num_steps=10, T=1.0, h=1.0, forcing_fn=None, **options
) -> fp.FPSolution:
    """Eq. 9 from m^0 on [0, T] for a drift field f_fn(t) of t only; ``forcing_fn(t)`` replaces
    the known part -(D f)(t) of the right-hand side (``options``: the march's)."""
    timer = SolveTimer()
    times = time_grid(num_steps, 0.0, T)
    fields = GivenFields(f_fn, forcing_fn, times, h)
    return march(np.asarray(m0, dtype=np.float64), fields, g_fn, times, timer, h=h, **options)


def _manufactured(n: int, num_steps: int, T: float) -> tuple[np.ndarray, np.ndarray]:
    """Solve with the analytic source on the unit square; return (numerical, exact) at T.

    m* = exp(-t) S, S = sin(pi x) sin(pi y), f = c S (both vanish on the ghost border);
    forcing = m*_t - 1/2 g^2 lap m* + f (d_x + d_y) m* - 1/2 g^2 ((d_x + d_y) m*)^2, which
    holds the analytic -(d_x + d_y) f plus the source S of the manufactured solution.
    """
    h = 1 / (n + 1)
    x = h * np.arange(1, n + 1)
    xx, yy = np.meshgrid(x, x, indexing="ij")
    s = np.sin(np.pi * xx) * np.sin(np.pi * yy)
    p = np.pi * (np.cos(np.pi * xx) * np.sin(np.pi * yy) + np.sin(np.pi * xx) * np.cos(np.pi * yy))
    g2 = G_CONST**2

    def forcing(t: float) -> np.ndarray:
        e = math.exp(-t)
        value = (
            -e * s + 0.5 * g2 * 2 * np.pi**2 * e * s + C_DRIFT * s * e * p - 0.5 * g2 * (e * p) ** 2
        )
        return value[None]

    sol = solve_log_density(
        s[None],
        lambda t: C_DRIFT * s[None],
        lambda t: G_CONST,
        num_steps=num_steps,
        T=T,
        tol=1e-13,
        solver="lu",
        h=h,
        forcing_fn=forcing,
    )
    return sol.log_density[-1, 0], math.exp(-T) * s


def test_manufactured_order_two_in_space() -> None:
    T = 0.25
    errors = []
    for n in (7, 15, 31):
        h = 1 / (n + 1)
        steps = int(round(T / (4 * h**2)))  # dt = 4 h^2
        numerical, exact = _manufactured(n, steps, T)
        errors.append(np.abs(numerical - exact).max())
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((orders > 1.8) & (orders < 2.2)), (errors, orders)


def test_manufactured_order_one_in_time() -> None:
    T = 0.5
    finals = [_manufactured(15, steps, T)[0] for steps in (4, 8, 16, 32)]
    diffs = [np.abs(a - b).max() for a, b in zip(finals[:-1], finals[1:])]
    orders = np.log2(np.array(diffs[:-1]) / np.array(diffs[1:]))
    assert np.all((orders > 0.85) & (orders < 1.15)), (diffs, orders)
    _, exact = _manufactured(15, 32, T)
    assert np.abs(finals[-1] - exact).max() < 0.02  # and it converges to m*
