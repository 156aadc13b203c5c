"""The linear solve of each fixed-point iterate, A(m~) m = rhs (Na, Gao, Wan 2024, eq. 15-17), on
the block-diagonal matrix of all channels in one call.

``"lu"``: scipy's ``splu`` with COLAMD ordering, the exact direct solve. ``"bicgstab_dst"`` (the
default, the fastest measured by the solver benchmark of the experiments): BiCGSTAB to a relative
tolerance of :data:`KRYLOV_RTOL` started from the previous iterate, preconditioned by the exact
fast sine-transform solve (``scipy.fft.dstn``, type I) of the constant-coefficient part
I - 1/2 g^2 dt L of the step matrix (exact for zero padding; L the 5-point Laplacian of eq. 11);
a Krylov solve that does not reach its tolerance falls back on the exact LU. Other solvers plug in
as subclasses of :class:`LinearSolver` (``solve_embedding(solver=...)`` takes a factory too).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import scipy.fft
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .timer import SolveTimer

KRYLOV_RTOL = 1e-12


class LinearSolver(ABC):
    """One linear solve per fixed-point iterate, timed into the solve's :class:`SolveTimer`
    ("factorisation": factorisations and preconditioners, "solve": the rest)."""

    def __init__(self, timer: SolveTimer | None = None) -> None:
        self.timer = SolveTimer() if timer is None else timer
        self.krylov_iterations = 0
        self.step_params: tuple = ()

    def start_step(self, shape: tuple[int, int, int], g: float, dt: float, h: float) -> None:
        """Called at every new time step: remember its constants (solvers that reuse work across
        its iterates reset it here too)."""
        self.step_params = (shape, g, dt, h)

    @abstractmethod
    def solve(self, a: sp.csr_matrix, b: np.ndarray, x0: np.ndarray) -> np.ndarray:
        """Solve A x = b (flat arrays); ``x0`` is the previous iterate (a Krylov initial guess)."""


SolverFactory = Callable[[SolveTimer], LinearSolver]


class DirectLU(LinearSolver):
    """scipy's ``splu`` of A with the column ordering ``permc_spec``, then its solve."""

    def __init__(self, timer: SolveTimer | None = None, permc_spec: str = "COLAMD") -> None:
        super().__init__(timer)
        self.permc_spec = permc_spec

    def solve(self, a: sp.csr_matrix, b: np.ndarray, x0: np.ndarray) -> np.ndarray:
        with self.timer("factorisation"):
            lu = spla.splu(a.tocsc(), permc_spec=self.permc_spec)
        with self.timer("solve"):
            return lu.solve(b)


class DSTPreconditioner:
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


class KrylovSolver(LinearSolver):
    """A preconditioned Krylov solve from the previous iterate to :data:`KRYLOV_RTOL`, with the
    exact LU as fallback. Subclasses set ``method`` (a scipy Krylov solver) and its further
    ``options``. The preconditioner is the step's :class:`DSTPreconditioner`, built at the step's
    first iterate and reused for the others; subclasses may choose another."""

    method: Callable[..., tuple[np.ndarray, int]]
    options: dict[str, object]

    def __init__(self, timer: SolveTimer | None = None) -> None:
        super().__init__(timer)
        self.reused: Callable[[np.ndarray], np.ndarray] | None = None

    def start_step(self, shape: tuple[int, int, int], g: float, dt: float, h: float) -> None:
        """Remember the step's constants and forget the previous step's preconditioner."""
        super().start_step(shape, g, dt, h)
        self.reused = None

    def preconditioner(self, a: sp.csr_matrix) -> Callable[[np.ndarray], np.ndarray]:
        """r -> M^{-1} r for the step matrix ``a``."""
        if self.reused is None:
            self.reused = DSTPreconditioner(*self.step_params)
        return self.reused

    def solve(self, a: sp.csr_matrix, b: np.ndarray, x0: np.ndarray) -> np.ndarray:
        with self.timer("factorisation"):
            n = a.shape[0]
            m = spla.LinearOperator((n, n), matvec=self.preconditioner(a), dtype=np.float64)
        with self.timer("solve"):
            count = [0]

            def callback(_: object) -> None:
                count[0] += 1

            x, info = self.method(
                a, b, x0=x0, rtol=KRYLOV_RTOL, atol=0.0, M=m, callback=callback, **self.options
            )
            self.krylov_iterations += count[0]
            if info != 0:
                # fall back on the exact direct solve rather than return an inaccurate iterate
                return spla.splu(a.tocsc()).solve(b)
            return x


class BiCGStabDST(KrylovSolver):
    """BiCGSTAB (at most 2000 iterations) preconditioned by the sine-transform solve."""

    method = staticmethod(spla.bicgstab)
    options = {"maxiter": 2000}


SOLVERS: dict[str, SolverFactory] = {"lu": DirectLU, "bicgstab_dst": BiCGStabDST}
DEFAULT_SOLVER = "bicgstab_dst"


def make_solver(solver: str | SolverFactory, timer: SolveTimer) -> LinearSolver:
    """The solver named in :data:`SOLVERS`, or made by the factory ``solver``, timing into ``timer``."""
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {tuple(SOLVERS)}, got {solver!r}")
        solver = SOLVERS[solver]
    return solver(timer)
