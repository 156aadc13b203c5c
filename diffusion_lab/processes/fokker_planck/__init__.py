"""The log-density Fokker-Planck solver of FP score embedding (Na, Gao, Wan 2024, sec. 3.2-3.4).

For the forward SDE dx = f dt + g dW on one image, the log-density m = log p obeys (eq. 7-9)

    m_t = -D f + 1/2 g^2 L m - f D m + 1/2 g^2 (D m)^2,                                     (9)

posed, as the paper poses it, on the image's own pixel grid: every channel of a (C, H, W) image is
an independent PDE on its H x W grid with grid step ``h`` (default 1, the paper's unit spacing; a
general ``h`` divides differences by 2h and the Laplacian by h^2), zero padded at the border.
D is the one-number "gradient" of eq. 11/12/19 and L the 5-point Laplacian of eq. 11 (the errata
of the papers' README: implemented as written). Images are float64 in the fixed range [0, 1].

One job per module:

- ``grid``: D (:func:`grad_sum`) and the time grid;
- ``kde``: m^0, the linear-kernel Scott KDE of sec. 3.3;
- ``assembly``: the step matrix derived from eq. 15 (or printed under eq. 16-18);
- ``linear_solvers``: its solve per fixed-point iterate (direct LU, preconditioned BiCGSTAB);
- ``fixed_point``: Alg. 1's policy iteration within a step (eq. 14-15);
- ``transport``: the interleaved transport of the image (eq. 21 with eq. 3's velocity);
- ``march``: the time march and :func:`solve_embedding`;
- ``timer``: the seconds of each phase; ``cost``: memory and time estimates;
- ``torch_bridge``: the framework's SDEs as numpy coefficient functions.
"""

from .assembly import STENCILS, assemble_matrix, linearised_velocity
from .cost import solve_memory_bytes, solve_seconds
from .fixed_point import FixedPointError
from .grid import grad_sum
from .kde import KDES, initial_log_density
from .linear_solvers import DEFAULT_SOLVER, SOLVERS, LinearSolver
from .march import FPSolution, solve_embedding
from .torch_bridge import sde_coefficients
from .transport import DriftFn, transport_step

__all__ = [
    "DEFAULT_SOLVER",
    "KDES",
    "SOLVERS",
    "STENCILS",
    "DriftFn",
    "FPSolution",
    "FixedPointError",
    "LinearSolver",
    "assemble_matrix",
    "grad_sum",
    "initial_log_density",
    "linearised_velocity",
    "sde_coefficients",
    "solve_embedding",
    "solve_memory_bytes",
    "solve_seconds",
    "transport_step",
]
