"""The log-density Fokker-Planck solver of FP score embedding (Na, Gao, Wan 2024, sec. 3.2-3.4).

What it solves. For the forward SDE dx = f dt + g dW on one image, the log-density m = log p obeys
(eq. 7-9)

    m_t = -D f + 1/2 g^2 L m - f D m + 1/2 g^2 (D m)^2,                                     (9)

posed, as the paper poses it, on the image's own pixel grid: every channel of a (C, H, W) image is
an independent PDE on its H x W grid with grid step ``h`` (default 1, the paper's unit spacing; a
general ``h`` divides differences by 2h and the Laplacian by h^2, for the convergence tests).

Conventions (every choice, errata included; see /work/shared/papers/README.md):

- Images are float64 arrays (C, H, W) with values in the FIXED range [0, 1]. scikit-learn's Scott
  bandwidth n^(-1/5) does not depend on the spread of the data, so the range changes m^0; callers
  map their data range to [0, 1] first.
- Row index i (0..H-1), column j (0..W-1), flattened index i*W + j (per channel; channel c is
  offset by c*H*W). "Plus" neighbours are (i+1, j) and (i, j+1), "minus" ones (i-1, j), (i, j-1).
- Zero padding at the border: values outside the grid are 0 (Dirichlet 0 on the ghost nodes).
- "grad" and "div" of eq. 11, 12 and 19 are ONE number per pixel, the sum of the two central
  differences (erratum note: implemented as written):
  (D u)_ij = (u_{i+1,j} - u_{i-1,j} + u_{i,j+1} - u_{i,j-1}) / (2h); (D m)^2 is its square.
  L u = (u_{i+1,j} + u_{i-1,j} + u_{i,j+1} + u_{i,j-1} - 4 u_ij) / h^2 (eq. 11).
- m^0 (sec. 3.3, last paragraph) is a kernel density estimate per channel: scikit-learn's
  ``KernelDensity(kernel="linear", bandwidth="scott", algorithm="kd_tree")`` fitted to the channel's
  H*W pixel values (1-D samples) and evaluated at every pixel's value (``kde="sklearn"``). The same
  estimate in closed form, (1/(n b)) sum_k (1 - |u - u_k|/b)_+ with b = n^(-1/5), is computed
  exactly by sorting and prefix sums in O(n log n) (``kde="exact"``, the default: the tree's exact
  evaluation is O(n^2) here, since the bandwidth covers a large share of [0, 1]); the two agree to
  rounding (tested).

The step (derived from eq. 15, NOT the matrix printed under eq. 16-17). Linearising
(D m)^2 ~ D m~ D m with m~ the previous fixed-point iterate (eq. 10, 14), the last two terms of (9)
become -v D m with the per-pixel v = f - 1/2 g^2 D m~ (eq. 13 prints "(f - 1/2 g^2 Delta)" where
this linearised gradient belongs). Implicit Euler in time, m_t ~ (m^n - m^{n-1})/dt, all other
terms at t_n (eq. 15), gives for pixel (i, j) the row

    diagonal            1 + 2 g^2 dt / h^2
    plus neighbours    -1/2 g^2 dt / h^2 + v dt / (2h)
    minus neighbours   -1/2 g^2 dt / h^2 - v dt / (2h)
    right-hand side     m^{n-1} + dt * forcing,   forcing = -(D f)^n,

the divergence of f being known, it goes to the right side. Interior row sums are exactly 1.
``stencil="printed"`` builds the matrix as the paper prints it (eq. 16-18): diagonal
b = 2 g^2 dt, plus neighbours a = v dt + 1/2 g^2 dt, minus neighbours c = v dt - 1/2 g^2 dt,
right side m^{n-1} alone (the forcing is dropped); with h != 1 its entries are scaled like the
derived ones (g^2 by 1/h^2, v by 1/h). Its rows do not sum to 1; it is for comparison only.

Assembly is vectorised: the CSR index structure of the block-diagonal (all channels) matrix is
built once per (C, H, W, h) and cached; each step only fills the data array (a gather from the
five per-pixel coefficients).

The fixed point (policy iteration, Alg. 1). ``iteration="per_step"`` (default): at each step n,
m^{(k)} = A(m~ = m^{(k-1)})^{-1} rhs from m^{(0)} = m^{n-1}, until ||m^{(k)} - m^{(k-1)}||_2 < tol
(2-norm over all C*H*W values); a step that does not converge in ``max_iterations`` raises
``FixedPointError`` naming the step. ``iteration="sweep"`` is Alg. 1 literally: sweeps k over the
whole horizon n = 1..N, each linear solve using D m^{(k-1),n} from the previous sweep, until the
2-norm of the change over all n is < tol; the initial guess m^{(0),n} = m^0 for every n (the KDE
held constant in time). At convergence both give the same fixed point (tested). Per step the
solution records the iterations (for "sweep": the sweep count at every step), the last change and
the nonlinear residual ||A(m^n) m^n - rhs||_inf.

Transport (sec. 3.4, eq. 21) with the velocity of eq. 3 (erratum: eq. 20 prints
(f - 1/2 g^2) grad m; the transport ODE has velocity f - 1/2 g^2 grad m):
a^{n-1} = f(x^{n-1}, t_{n-1}) - 1/2 g(t_{n-1})^2 s^{n-1}, x^n = x^{n-1} + dt a^{n-1}
(``velocity="previous"``), with the score s^n = D m^n (eq. 19, zero padded). Since f^n = f(x^n, t_n)
enters the step for m^n and x^n needs m^{n-1}, ``solve_embedding`` INTERLEAVES: x^n =
transport(x^{n-1}, m^{n-1}) first, then f^n = f(x^n, t_n), then the fixed-point solve for m^n.
``velocity="average"`` is Heun's method: the predictor x~^n = x^{n-1} + dt a^{n-1}, f^n =
f(x~^n, t_n), m^n solved at the predictor, a^n = f^n - 1/2 (g^n)^2 D m^n, and the corrector
x^n = x^{n-1} + dt (a^{n-1} + a^n) / 2 (m^n is not re-solved at the corrected x^n).

Time grid: t_n = t_0 + n dt, dt = (T - t_0)/N, n = 0..N; g^n = g(t_n).

Linear solvers (``solver``, all on the block-diagonal matrix of all channels in one call):
"lu" (scipy ``splu``, COLAMD ordering: the exact direct solve), "lu_<ordering>" for the other
``permc_spec`` orderings ("lu_natural", "lu_mmd_ata", "lu_mmd_at_plus_a"), "spsolve", and Krylov
solvers to a relative tolerance of 1e-12 started from the previous iterate: "gmres_dst" /
"bicgstab_dst" preconditioned by the exact fast sine-transform (``scipy.fft.dstn``, type I) solve
of the constant-coefficient part I - 1/2 g^2 dt L (exact for zero padding), "gmres_ilu"
(``spilu``) and "gmres_lu_reuse" (the LU of the step's first iterate reused as preconditioner for
the later iterates); a Krylov solve that does not reach its tolerance falls back on the exact
LU. ``DEFAULT_SOLVER`` is the fastest measured by
experiments/fp_solver_benchmark.py.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.fft
import scipy.sparse as sp
import scipy.sparse.linalg as spla

DriftFn = Callable[[np.ndarray, float], np.ndarray]
DiffusionFn = Callable[[float], float]
FieldFn = Callable[[float], np.ndarray]

STENCILS = ("derived", "printed")
ITERATIONS = ("per_step", "sweep")
VELOCITIES = ("previous", "average")
KDES = ("exact", "sklearn")
_LU_ORDERINGS = {
    "lu": "COLAMD",
    "lu_natural": "NATURAL",
    "lu_mmd_ata": "MMD_ATA",
    "lu_mmd_at_plus_a": "MMD_AT_PLUS_A",
}
SOLVERS = (*_LU_ORDERINGS, "spsolve", "gmres_dst", "bicgstab_dst", "gmres_ilu", "gmres_lu_reuse")
DEFAULT_SOLVER = "bicgstab_dst"
KRYLOV_RTOL = 1e-12


class FixedPointError(RuntimeError):
    """The fixed-point iteration of a step did not reach its tolerance."""


# ----------------------------------------------------------------------------- grid operators


def grad_sum(u: np.ndarray, h: float = 1.0) -> np.ndarray:
    """D u of eq. 11/12/19: (u_{i+1,j} - u_{i-1,j} + u_{i,j+1} - u_{i,j-1}) / (2h), zero padded.

    Works on the last two axes of ``u`` (any leading axes, e.g. channels).
    """
    out = np.zeros_like(u, dtype=np.float64)
    out[..., :-1, :] += u[..., 1:, :]
    out[..., 1:, :] -= u[..., :-1, :]
    out[..., :, :-1] += u[..., :, 1:]
    out[..., :, 1:] -= u[..., :, :-1]
    return out / (2 * h)


def laplacian(u: np.ndarray, h: float = 1.0) -> np.ndarray:
    """L u of eq. 11: (sum of the 4 neighbours - 4 u_ij) / h^2, zero padded (last two axes)."""
    out = -4.0 * np.asarray(u, dtype=np.float64)
    out[..., :-1, :] += u[..., 1:, :]
    out[..., 1:, :] += u[..., :-1, :]
    out[..., :, :-1] += u[..., :, 1:]
    out[..., :, 1:] += u[..., :, :-1]
    return out / h**2


# ----------------------------------------------------------------------------- initial condition


def _kde_exact(values: np.ndarray) -> np.ndarray:
    """log of (1/(n b)) sum_k (1 - |u - u_k|/b)_+ at every sample u, b = n^(-1/5), in O(n log n).

    For sorted samples, the window [u - b, u + b] is found by ``searchsorted``; the sum of
    1 - |u - u_k|/b over it splits into the left part (u_k <= u) and right part, each a count and
    a sum taken from prefix sums.
    """
    n = values.size
    b = n ** (-1.0 / 5.0)
    s = np.sort(values)
    prefix = np.concatenate([[0.0], np.cumsum(s)])
    lo = np.searchsorted(s, values - b, side="right")  # first k with u_k > u - b
    mid = np.searchsorted(s, values, side="right")  # first k with u_k > u
    hi = np.searchsorted(s, values + b, side="left")  # first k with u_k >= u + b
    n_left, n_right = mid - lo, hi - mid
    sum_left, sum_right = prefix[mid] - prefix[lo], prefix[hi] - prefix[mid]
    # left: sum (1 - (u - u_k)/b); right: sum (1 - (u_k - u)/b)
    total = (
        (n_left + n_right) - (values * n_left - sum_left) / b - (sum_right - values * n_right) / b
    )
    return np.log(total / (n * b))


def _kde_sklearn(values: np.ndarray) -> np.ndarray:
    """scikit-learn's KernelDensity(kernel="linear", bandwidth="scott", algorithm="kd_tree")."""
    from sklearn.neighbors import KernelDensity

    samples = values[:, None]
    kde = KernelDensity(kernel="linear", bandwidth="scott", algorithm="kd_tree").fit(samples)
    return kde.score_samples(samples)


def initial_log_density(image: np.ndarray, method: str = "exact") -> np.ndarray:
    """m^0 (sec. 3.3): per channel, the linear-kernel Scott KDE of the channel's own pixel values,
    evaluated at every pixel's value. ``image`` is (C, H, W) in [0, 1]; returns (C, H, W)."""
    if method not in KDES:
        raise ValueError(f"kde must be one of {KDES}, got {method!r}")
    image = np.asarray(image, dtype=np.float64)
    _check_image(image)
    fit = _kde_exact if method == "exact" else _kde_sklearn
    return np.stack([fit(channel.ravel()).reshape(channel.shape) for channel in image])


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3:
        raise ValueError(f"an image is (C, H, W), got shape {image.shape}")
    if image.min() < 0 or image.max() > 1:
        raise ValueError("images must lie in [0, 1]: map the data range to [0, 1] first")


# ----------------------------------------------------------------------------- assembly


@dataclass(frozen=True)
class _Pattern:
    """The CSR structure of the block-diagonal 5-point matrix of a (C, H, W) grid."""

    indptr: np.ndarray
    indices: np.ndarray
    gather: np.ndarray  # flat indices into the (5, C*H*W) coefficient table, in CSR order
    size: int


@functools.lru_cache(maxsize=16)
def _pattern(shape: tuple[int, int, int]) -> _Pattern:
    """Build (once per shape) the CSR index structure; slot order is column order:
    (i-1, j), (i, j-1), (i, j), (i, j+1), (i+1, j)."""
    c, h, w = shape
    size = c * h * w
    rows = np.arange(size)
    i = (rows // w) % h
    j = rows % w
    offsets = np.array([-w, -1, 0, 1, w])
    exists = np.stack([i > 0, j > 0, np.ones(size, bool), j < w - 1, i < h - 1])  # (5, size)
    cols = rows[None, :] + offsets[:, None]
    keep = exists.T  # (size, 5): row-major = CSR order, columns increasing within a row
    indices = cols.T[keep].astype(np.int32)
    counts = keep.sum(1)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    slot = np.broadcast_to(np.arange(5)[None, :], (size, 5))[keep]
    gather = slot * size + np.broadcast_to(rows[:, None], (size, 5))[keep]
    return _Pattern(indptr, indices, gather, size)


def stencil_coefficients(
    v: np.ndarray, g: float, dt: float, h: float = 1.0, stencil: str = "derived"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(diagonal, plus, minus) coefficients per pixel of the step matrix (see module docstring).

    derived (eq. 15): 1 + 2 g^2 dt/h^2, -g^2 dt/(2h^2) + v dt/(2h), -g^2 dt/(2h^2) - v dt/(2h).
    printed (eq. 16-17): b = 2 g^2 dt, a = v dt + g^2 dt/2, c = v dt - g^2 dt/2 (h = 1).
    """
    diffusion = g**2 * dt / h**2
    if stencil == "derived":
        advection = v * (dt / (2 * h))
        diag = np.full_like(v, 1.0 + 2.0 * diffusion)
        return diag, -0.5 * diffusion + advection, -0.5 * diffusion - advection
    if stencil == "printed":
        advection = v * (dt / h)
        diag = np.full_like(v, 2.0 * diffusion)
        return diag, advection + 0.5 * diffusion, advection - 0.5 * diffusion
    raise ValueError(f"stencil must be one of {STENCILS}, got {stencil!r}")


def assemble_matrix(
    v: np.ndarray, g: float, dt: float, h: float = 1.0, stencil: str = "derived"
) -> sp.csr_matrix:
    """The block-diagonal (all channels) step matrix A for the per-pixel v (C, H, W).

    Only the data array is computed here; the index structure comes from the cached pattern.
    """
    v = np.asarray(v, dtype=np.float64)
    pattern = _pattern(tuple(v.shape))
    diag, plus, minus = stencil_coefficients(v.ravel(), g, dt, h, stencil)
    table = np.concatenate([minus, minus, diag, plus, plus])
    data = table[pattern.gather]
    return sp.csr_matrix(
        (data, pattern.indices, pattern.indptr), shape=(pattern.size, pattern.size), copy=False
    )


def linearised_velocity(f: np.ndarray, g: float, m_tilde: np.ndarray, h: float = 1.0) -> np.ndarray:
    """v = f - 1/2 g^2 D m~ (eq. 14-15: the linearised coefficient of D m)."""
    return f - 0.5 * g**2 * grad_sum(m_tilde, h)


def right_hand_side(
    m_prev: np.ndarray, forcing: np.ndarray, dt: float, stencil: str = "derived"
) -> np.ndarray:
    """m^{n-1} + dt * forcing (derived, forcing = -(D f)^n normally); m^{n-1} alone (printed, eq. 18)."""
    if stencil == "printed":
        return np.array(m_prev, dtype=np.float64)
    return m_prev + dt * forcing


# ----------------------------------------------------------------------------- linear solvers


class _DSTPreconditioner:
    """Exact solve of (I - 1/2 g^2 dt L) y = r with zero padding by the type-I sine transform.

    The sine modes sin(p pi (i+1)/(H+1)) sin(q pi (j+1)/(W+1)) diagonalise L with eigenvalue
    -mu_pq / h^2, mu_pq = 4 sin^2(p pi/(2(H+1))) + 4 sin^2(q pi/(2(W+1))).
    """

    def __init__(self, shape: tuple[int, int, int], g: float, dt: float, h: float) -> None:
        _, nh, nw = shape
        p = np.arange(1, nh + 1)[:, None]
        q = np.arange(1, nw + 1)[None, :]
        mu = (
            4 * np.sin(p * np.pi / (2 * (nh + 1))) ** 2
            + 4 * np.sin(q * np.pi / (2 * (nw + 1))) ** 2
        )
        self.inverse = 1.0 / (1.0 + 0.5 * g**2 * dt * mu / h**2)
        self.shape = shape

    def __call__(self, r: np.ndarray) -> np.ndarray:
        spec = scipy.fft.dstn(r.reshape(self.shape), type=1, axes=(1, 2), norm="ortho")
        return scipy.fft.idstn(spec * self.inverse, type=1, axes=(1, 2), norm="ortho").ravel()


@dataclass
class LinearSolver:
    """One linear solve per fixed-point iterate; ``start_step`` is called at every new step so
    that solvers reusing work (a factorisation, a preconditioner) across iterates can reset."""

    name: str = DEFAULT_SOLVER
    seconds: dict[str, float] = field(default_factory=lambda: {"factorisation": 0.0, "solve": 0.0})
    krylov_iterations: int = 0
    _reuse: object = None
    _step_params: tuple = ()

    def __post_init__(self) -> None:
        if self.name not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.name!r}")

    def start_step(self, shape: tuple[int, int, int], g: float, dt: float, h: float) -> None:
        """Forget per-step reused work; remember the step's constants."""
        self._reuse = None
        self._step_params = (shape, g, dt, h)

    def solve(self, a: sp.csr_matrix, b: np.ndarray, x0: np.ndarray) -> np.ndarray:
        """Solve A x = b (flat arrays); ``x0`` is the initial guess of the Krylov solvers."""
        name = self.name
        if name in _LU_ORDERINGS:
            start = time.perf_counter()
            lu = spla.splu(a.tocsc(), permc_spec=_LU_ORDERINGS[name])
            middle = time.perf_counter()
            x = lu.solve(b)
            self.seconds["factorisation"] += middle - start
            self.seconds["solve"] += time.perf_counter() - middle
            return x
        start = time.perf_counter()
        if name == "spsolve":
            x = spla.spsolve(a.tocsc(), b)
            self.seconds["solve"] += time.perf_counter() - start
            return x
        preconditioner = self._preconditioner(a)
        middle = time.perf_counter()
        self.seconds["factorisation"] += middle - start
        x = self._krylov(a, b, x0, preconditioner)
        self.seconds["solve"] += time.perf_counter() - middle
        return x

    def _preconditioner(self, a: sp.csr_matrix) -> spla.LinearOperator:
        n = a.shape[0]
        if self.name in ("gmres_dst", "bicgstab_dst"):
            if self._reuse is None:
                self._reuse = _DSTPreconditioner(*self._step_params)
            apply = self._reuse
        elif self.name == "gmres_ilu":
            apply = spla.spilu(a.tocsc(), drop_tol=1e-4, fill_factor=10).solve
        else:  # gmres_lu_reuse
            if self._reuse is None:
                self._reuse = spla.splu(a.tocsc()).solve
            apply = self._reuse
        return spla.LinearOperator((n, n), matvec=apply, dtype=np.float64)

    def _krylov(
        self, a: sp.csr_matrix, b: np.ndarray, x0: np.ndarray, m: spla.LinearOperator
    ) -> np.ndarray:
        count = [0]

        def callback(_: object) -> None:
            count[0] += 1

        if self.name == "bicgstab_dst":
            x, info = spla.bicgstab(
                a, b, x0=x0, rtol=KRYLOV_RTOL, atol=0.0, M=m, maxiter=2000, callback=callback
            )
        else:
            x, info = spla.gmres(
                a,
                b,
                x0=x0,
                rtol=KRYLOV_RTOL,
                atol=0.0,
                M=m,
                restart=60,
                maxiter=50,
                callback=callback,
                callback_type="pr_norm",
            )
        self.krylov_iterations += count[0]
        if info != 0:
            # fall back on the exact direct solve rather than return an inaccurate iterate
            return spla.splu(a.tocsc()).solve(b)
        return x


# ----------------------------------------------------------------------------- one step


@dataclass
class _Context:
    """What every step of one solve shares."""

    shape: tuple[int, int, int]
    dt: float
    h: float
    stencil: str
    solver: LinearSolver
    seconds: dict[str, float]


def _linear_step(
    ctx: _Context,
    m_prev: np.ndarray,
    f: np.ndarray,
    g: float,
    forcing: np.ndarray,
    m_tilde: np.ndarray,
) -> np.ndarray:
    """One linear solve of eq. 15: A(m~) m = m^{n-1} + dt forcing, with m~ = ``m_tilde``."""
    start = time.perf_counter()
    a = assemble_matrix(linearised_velocity(f, g, m_tilde, ctx.h), g, ctx.dt, ctx.h, ctx.stencil)
    rhs = right_hand_side(m_prev, forcing, ctx.dt, ctx.stencil)
    ctx.seconds["assembly"] += time.perf_counter() - start
    return ctx.solver.solve(a, rhs.ravel(), m_tilde.ravel()).reshape(ctx.shape)


def nonlinear_residual(
    ctx: _Context, m: np.ndarray, m_prev: np.ndarray, f: np.ndarray, g: float, forcing: np.ndarray
) -> float:
    """||A(m) m - rhs||_inf: how well m solves the (unlinearised) discrete eq. 13/15."""
    start = time.perf_counter()
    a = assemble_matrix(linearised_velocity(f, g, m, ctx.h), g, ctx.dt, ctx.h, ctx.stencil)
    rhs = right_hand_side(m_prev, forcing, ctx.dt, ctx.stencil)
    value = float(np.abs(a @ m.ravel() - rhs.ravel()).max())
    ctx.seconds["assembly"] += time.perf_counter() - start
    return value


def fixed_point_step(
    ctx: _Context,
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
        new = _linear_step(ctx, m_prev, f, g, forcing, current)
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


# ----------------------------------------------------------------------------- time marching


@dataclass
class FPSolution:
    """Output of ``solve_embedding`` / ``solve_log_density``; arrays are (N+1, C, H, W).

    ``x`` holds the embedded images x^0 = image .. x^N (for ``solve_log_density``: None).
    ``iterations``, ``changes``, ``residuals`` are per step n = 1..N (length N): fixed-point
    iterations (sweep count for ``iteration="sweep"``), the last change ||m^(k) - m^(k-1)||_2
    (for sweeps: the last change over the whole horizon) and ||A(m^n) m^n - rhs||_inf.
    ``seconds``: kde, assembly, factorisation, solve, transport, total (time.perf_counter).
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


class _Fields:
    """The known coefficients of step n: f^n and the forcing. Subclasses may transport."""

    def begin(self, m0: np.ndarray) -> None:
        """Called at the start of every pass over the horizon."""

    def before(self, n: int, m_prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(f^n, forcing^n), given m^{n-1}."""
        raise NotImplementedError

    def after(self, n: int, m: np.ndarray) -> None:
        """Called with m^n once it is solved."""


class _GivenFields(_Fields):
    """f(t) given as a field of t only, forcing -(D f) or given (no transport)."""

    def __init__(
        self, f_fn: FieldFn, forcing_fn: FieldFn | None, times: np.ndarray, h: float
    ) -> None:
        self.f_fn, self.forcing_fn, self.times, self.h = f_fn, forcing_fn, times, h

    def before(self, n: int, m_prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = float(self.times[n])
        f = np.asarray(self.f_fn(t), dtype=np.float64)
        forcing = -grad_sum(f, self.h) if self.forcing_fn is None else self.forcing_fn(t)
        return f, np.asarray(forcing, dtype=np.float64)


def transport_step(
    x_prev: np.ndarray, drift_prev: np.ndarray, g_prev: float, score_prev: np.ndarray, dt: float
) -> np.ndarray:
    """Eq. 21 with the velocity of eq. 3: x^n = x^{n-1} + dt (f^{n-1} - 1/2 (g^{n-1})^2 s^{n-1})."""
    return x_prev + dt * (drift_prev - 0.5 * g_prev**2 * score_prev)


class _TransportFields(_Fields):
    """f^n = f(x^n, t_n) with x^n transported from x^{n-1} by m^{n-1} (interleaved)."""

    def __init__(
        self,
        image: np.ndarray,
        drift: DriftFn,
        diffusion: DiffusionFn,
        times: np.ndarray,
        h: float,
        velocity: str,
        seconds: dict[str, float],
    ) -> None:
        self.drift, self.diffusion, self.times, self.h = drift, diffusion, times, h
        self.velocity, self.seconds = velocity, seconds
        self.dt = float(times[1] - times[0])
        self.x = np.zeros((len(times), *image.shape))
        self.x[0] = image

    def begin(self, m0: np.ndarray) -> None:
        self.drift_prev = np.asarray(self.drift(self.x[0], float(self.times[0])), dtype=np.float64)

    def _velocity(self, drift: np.ndarray, n: int, m: np.ndarray) -> np.ndarray:
        return drift - 0.5 * self.diffusion(float(self.times[n])) ** 2 * grad_sum(m, self.h)

    def before(self, n: int, m_prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start = time.perf_counter()
        g_prev = self.diffusion(float(self.times[n - 1]))
        score_prev = grad_sum(m_prev, self.h)
        self.a_prev = self.drift_prev - 0.5 * g_prev**2 * score_prev
        self.x[n] = transport_step(self.x[n - 1], self.drift_prev, g_prev, score_prev, self.dt)
        f = np.asarray(self.drift(self.x[n], float(self.times[n])), dtype=np.float64)
        self.drift_prev = f
        self.seconds["transport"] += time.perf_counter() - start
        return f, -grad_sum(f, self.h)

    def after(self, n: int, m: np.ndarray) -> None:
        if self.velocity == "previous":
            return
        start = time.perf_counter()  # Heun: correct x^n with a^n at the predictor
        a_n = self._velocity(self.drift_prev, n, m)
        self.x[n] = self.x[n - 1] + self.dt * 0.5 * (self.a_prev + a_n)
        self.drift_prev = np.asarray(self.drift(self.x[n], float(self.times[n])), dtype=np.float64)
        self.seconds["transport"] += time.perf_counter() - start


def _time_grid(num_steps: int, t0: float, T: float) -> np.ndarray:
    """t_n = t_0 + n dt, dt = (T - t_0)/N, n = 0..N."""
    if num_steps < 1 or not T > t0:
        raise ValueError(f"need num_steps >= 1 and T > t0, got {num_steps}, [{t0}, {T}]")
    return t0 + (T - t0) * np.arange(num_steps + 1) / num_steps


def _march(
    m0: np.ndarray,
    fields: _Fields,
    g_fn: DiffusionFn,
    times: np.ndarray,
    tol: float,
    max_iterations: int,
    stencil: str,
    iteration: str,
    solver: str,
    h: float,
    seconds: dict[str, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, LinearSolver]:
    """The shared time loop of both entry points: per-step fixed points or whole-horizon sweeps."""
    if stencil not in STENCILS:
        raise ValueError(f"stencil must be one of {STENCILS}, got {stencil!r}")
    if iteration not in ITERATIONS:
        raise ValueError(f"iteration must be one of {ITERATIONS}, got {iteration!r}")
    n_steps = len(times) - 1
    linear = LinearSolver(solver)
    ctx = _Context(tuple(m0.shape), float(times[1] - times[0]), h, stencil, linear, seconds)
    g = [float(g_fn(float(t))) for t in times]
    m = np.empty((n_steps + 1, *m0.shape))
    m[0] = m0
    iterations = np.zeros(n_steps, dtype=int)
    changes = np.zeros(n_steps)
    known: list[tuple[np.ndarray, np.ndarray]] = [None] * (n_steps + 1)  # type: ignore[list-item]
    fields.begin(m0)
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
            fields.begin(m0)
            for n in range(1, n_steps + 1):
                known[n] = fields.before(n, m[n - 1])
                linear.start_step(ctx.shape, g[n], ctx.dt, h)
                m[n] = _linear_step(ctx, m[n - 1], known[n][0], g[n], known[n][1], previous[n])
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
    return m, iterations, changes, residuals, linear


def _new_seconds() -> dict[str, float]:
    return {"kde": 0.0, "assembly": 0.0, "factorisation": 0.0, "solve": 0.0, "transport": 0.0}


def _finish(
    x: np.ndarray | None,
    m: np.ndarray,
    times: np.ndarray,
    stats: tuple[np.ndarray, np.ndarray, np.ndarray, LinearSolver],
    seconds: dict[str, float],
    h: float,
    started: float,
) -> FPSolution:
    iterations, changes, residuals, linear = stats
    seconds.update(linear.seconds)
    start = time.perf_counter()
    score = grad_sum(m, h)  # eq. 19
    seconds["transport"] += time.perf_counter() - start
    seconds["total"] = time.perf_counter() - started
    return FPSolution(
        x, m, score, times, iterations, changes, residuals, seconds, linear.krylov_iterations
    )


def solve_log_density(
    m0: np.ndarray,
    f_fn: FieldFn,
    g_fn: DiffusionFn,
    num_steps: int = 10,
    t0: float = 0.0,
    T: float = 1.0,
    tol: float = 1e-6,
    max_iterations: int = 100,
    stencil: str = "derived",
    iteration: str = "per_step",
    solver: str = DEFAULT_SOLVER,
    h: float = 1.0,
    forcing_fn: FieldFn | None = None,
) -> FPSolution:
    """Solve eq. 9 from m^0 (C, H, W) for a drift field f_fn(t) -> (C, H, W) of t only (no
    transport); ``forcing_fn(t)`` replaces the known part -(D f)(t) of the right-hand side."""
    started = time.perf_counter()
    m0 = np.asarray(m0, dtype=np.float64)
    times = _time_grid(num_steps, t0, T)
    seconds = _new_seconds()
    fields = _GivenFields(f_fn, forcing_fn, times, h)
    m, *stats = _march(
        m0, fields, g_fn, times, tol, max_iterations, stencil, iteration, solver, h, seconds
    )
    return _finish(None, m, times, tuple(stats), seconds, h, started)


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
    solver: str = DEFAULT_SOLVER,
    h: float = 1.0,
    kde: str = "exact",
) -> FPSolution:
    """Alg. 1 and the embedding of sec. 3.4 for one (C, H, W) image in [0, 1]: m^0 by KDE, the
    log-density FP steps interleaved with the transport of eq. 21 (see module docstring)."""
    if velocity not in VELOCITIES:
        raise ValueError(f"velocity must be one of {VELOCITIES}, got {velocity!r}")
    started = time.perf_counter()
    image = np.asarray(image, dtype=np.float64)
    seconds = _new_seconds()
    start = time.perf_counter()
    m0 = initial_log_density(image, kde)
    seconds["kde"] = time.perf_counter() - start
    times = _time_grid(num_steps, t0, T)
    fields = _TransportFields(image, drift, diffusion, times, h, velocity, seconds)
    m, *stats = _march(
        m0, fields, diffusion, times, tol, max_iterations, stencil, iteration, solver, h, seconds
    )
    return _finish(fields.x, m, times, tuple(stats), seconds, h, started)


# ----------------------------------------------------------------------------- cost estimates

#: Peak bytes of ``solve_embedding`` per value (pixel and channel) of the image, measured with
#: tracemalloc (numpy's allocations) at 1x32x32 .. 3x128x128 and N = 3 .. 20: the CSR pattern,
#: one assembly and BiCGSTAB's vectors (fixed), plus per time step the float64 tables of m, x and
#: the score and their temporaries; Alg. 1's sweeps keep the previous horizon and its copy.
SOLVE_BYTES_FIXED = 240
SOLVE_BYTES_PER_STEP = 34
SWEEP_BYTES_PER_STEP = 16
#: Rough seconds per value and time step on one CPU core (the default solver and tolerance;
#: 155 s measured for a 3x1000x1000 image with N = 10), plus a fixed start-up.
SOLVE_SECONDS_PER_VALUE_STEP = 5e-6
SOLVE_SECONDS_FIXED = 0.5


def solve_memory_bytes(
    shape: tuple[int, int, int], num_steps: int, iteration: str = "per_step"
) -> int:
    """Estimated peak memory of :func:`solve_embedding` for one (C, H, W) image and N steps."""
    per_step = SOLVE_BYTES_PER_STEP + (SWEEP_BYTES_PER_STEP if iteration == "sweep" else 0)
    return math.prod(shape) * (SOLVE_BYTES_FIXED + per_step * (num_steps + 1))


def solve_seconds(shape: tuple[int, int, int], num_steps: int) -> float:
    """A rough duration of :func:`solve_embedding` for one (C, H, W) image and N steps (the
    fixed-point iterations per step grow slowly with the image, so this is an order of size)."""
    return SOLVE_SECONDS_FIXED + SOLVE_SECONDS_PER_VALUE_STEP * math.prod(shape) * num_steps


# ----------------------------------------------------------------------------- framework SDEs


def sde_coefficients(sde: object) -> tuple[DriftFn, DiffusionFn]:
    """(drift(x, t), diffusion(t)) in float64 numpy from a diffusion_lab SDE (VESDE, VPSDE,
    SubVPSDE): ``sde.sde(x[None], t[None])`` evaluated in float64 torch."""
    import torch

    def drift(x: np.ndarray, t: float) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))[None]
        f, _ = sde.sde(xt, torch.tensor([t], dtype=torch.float64))
        return f[0].detach().cpu().numpy().astype(np.float64)

    def diffusion(t: float) -> float:
        x = torch.zeros((1, 1), dtype=torch.float64)
        _, g = sde.sde(x, torch.tensor([t], dtype=torch.float64))
        return float(g[0])

    return drift, diffusion


__all__ = [
    "DEFAULT_SOLVER",
    "SOLVERS",
    "FPSolution",
    "FixedPointError",
    "LinearSolver",
    "assemble_matrix",
    "grad_sum",
    "initial_log_density",
    "laplacian",
    "linearised_velocity",
    "sde_coefficients",
    "solve_embedding",
    "solve_log_density",
    "solve_memory_bytes",
    "solve_seconds",
    "stencil_coefficients",
    "transport_step",
]
