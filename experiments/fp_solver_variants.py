"""The linear solvers that ``fp_solver_benchmark.py`` compares with the package's own (Na, Gao,
Wan 2024, eq. 15-17: one solve of the step matrix per fixed-point iterate).

Beside ``diffusion_lab.processes.fokker_planck``'s "lu" (COLAMD) and "bicgstab_dst": the other
``splu`` orderings ("lu_natural", "lu_mmd_ata", "lu_mmd_at_plus_a"), scipy's ``spsolve``, and GMRES
(restart 60, at most 50 cycles, to the package's Krylov tolerance, from the previous iterate)
preconditioned by the sine-transform solve ("gmres_dst"), by ``spilu`` ("gmres_ilu") or by the
LU of the step's first iterate reused for its later iterates ("gmres_lu_reuse"). Each name maps to
a factory that ``solve_embedding(solver=...)`` takes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from diffusion_lab.processes import fokker_planck as fp
from diffusion_lab.processes.fokker_planck.linear_solvers import (
    DirectLU,
    KrylovSolver,
    LinearSolver,
    SolverFactory,
)


class SpSolve(LinearSolver):
    """scipy's ``spsolve`` (SuperLU, factorised and solved in one call)."""

    def solve(self, a: sp.csr_matrix, b: np.ndarray, x0: np.ndarray) -> np.ndarray:
        with self.timer("solve"):
            return spla.spsolve(a.tocsc(), b)


class GMRES(KrylovSolver):
    """Restarted GMRES (restart 60, at most 50 cycles), preconditioned by the step's
    sine-transform solve."""

    method = staticmethod(spla.gmres)
    options = {"restart": 60, "maxiter": 50, "callback_type": "pr_norm"}


class GMRESILU(GMRES):
    """GMRES preconditioned by the incomplete LU of each iterate's matrix."""

    def preconditioner(self, a: sp.csr_matrix) -> Callable[[np.ndarray], np.ndarray]:
        return spla.spilu(a.tocsc(), drop_tol=1e-4, fill_factor=10).solve


class GMRESLUReuse(GMRES):
    """GMRES preconditioned by the exact LU of the step's first iterate."""

    def preconditioner(self, a: sp.csr_matrix) -> Callable[[np.ndarray], np.ndarray]:
        if self.reused is None:
            self.reused = spla.splu(a.tocsc()).solve
        return self.reused


SOLVERS: dict[str, SolverFactory] = {
    **fp.SOLVERS,
    "lu_natural": functools.partial(DirectLU, permc_spec="NATURAL"),
    "lu_mmd_ata": functools.partial(DirectLU, permc_spec="MMD_ATA"),
    "lu_mmd_at_plus_a": functools.partial(DirectLU, permc_spec="MMD_AT_PLUS_A"),
    "spsolve": SpSolve,
    "gmres_dst": GMRES,
    "gmres_ilu": GMRESILU,
    "gmres_lu_reuse": GMRESLUReuse,
}
