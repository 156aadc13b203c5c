"""The path search's resolution: distances rounded to integers, so that ties are exact (Daras
et al. sec. 3.3, App. C).

Ties: the search is exact on integers. Along the blur curve the triangle inequality is nearly an
equality, so paths of different lengths have nearly equal sums, and distances nearly equal ones.
On 200 training digits at 16x16 (64 candidates 0.01 .. 8, largest distance 5.6): M(0.01, 0.137)
is 1.04e-11 (both kernels are the identity to 3e-12) and M(1, 63) lies 6.7e-12 below M(0, 63),
so at eps = infinity the hop 0 -> 1 -> 63 is dearer than the direct path by 4e-12 (for a metric
the direct path is a shortest one; sec. 3.3: "for any metric M, the shortest path is to go
directly"), far below the float noise of the distances. One cause of noise, cancellation in the Gram
matrix, ``distances.coupled_distances`` reduces by centring its rows (that module's docstring).

What remains of the noise, about 1e-12 to 1e-11 of the largest distance, still decides near-ties such as
the one above if the search compares floats: another machine (another BLAS) then gets another
schedule from the same data and config; under ``sum`` the old float search gave 11 different
32-level schedules from the 1000 digits in 17 summation orders. So every distance is rounded to
an integer multiple of the quantum ``DISTANCE_RTOL`` * max M (:func:`quantise_distances`;
DISTANCE_RTOL = 1e-7: 5,000 times the largest error measured, no distance's integer changed
over the 8 orders, and a path's sum is resolved to about 1e-7 of the largest distance, far
below any difference that matters for a schedule), eps likewise, and the search compares
paths exactly on those integers, lexicographically: ``sum`` by (sum, levels, index sequence),
``fewest_levels`` by (levels, sum, index sequence); the index sequence (the lexicographically
smallest wins) decides only paths equal at the resolution in both. The bisection's candidates
for eps are the distinct integers (``paths.eps_grid``), so distances that noise alone
separates are one candidate.

The schedule is then a function of the integers, the same on any machine. What rounding cannot
remove: a distance within noise of a half-integer multiple of the quantum may round either way,
a chance of about 2 x noise / quantum (about 1e-4 for an error of 5e-12 of the largest distance),
and it changes the schedule only if that distance also decides a tie. Returned costs are the
sums of the unrounded distances; eps is its integer times the quantum.
"""

from __future__ import annotations

import math

import numpy as np

#: The resolution of the path search, relative to the largest distance of the matrix: every
#: distance (and eps) is rounded to an integer multiple of ``DISTANCE_RTOL * max M`` and paths are
#: compared exactly on those integers (module docstring). 1e-7: 5,000 times the largest
#: float64 error of ``distances.coupled_distances`` measured over summation orders (2.1e-11 of the
#: largest distance, 1000 digits, 256 candidates), so that noise moves an integer with a chance
#: of about 1e-4 at most, and still fine enough that a path's sum is resolved to 1e-7 of the
#: largest distance.
DISTANCE_RTOL = 1e-7


def quantise_distances(distances: np.ndarray) -> tuple[np.ndarray, float]:
    """The distances as integer multiples of the search's resolution, and that quantum.

    Returns ``(units, quantum)``: ``units`` (K, K) int64, round(M / quantum) (half to even), and
    quantum = ``DISTANCE_RTOL`` * (the largest distance of the upper triangle, the only part the
    search reads; ``units`` is that triangle mirrored, with a zero diagonal); all zero with
    quantum 0 when every distance is 0. The largest distance is 1 / DISTANCE_RTOL units exactly,
    so a relative perturbation of the whole matrix moves the quantum with it. Distances must be
    finite and nonnegative.
    """
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distances must be a square matrix, got shape {d.shape}")
    upper = d[np.triu_indices(d.shape[0], 1)]
    if not np.all(np.isfinite(upper)) or np.any(upper < 0):
        raise ValueError("distances must be finite and nonnegative")
    largest = float(upper.max(initial=0.0))
    if largest == 0.0:
        return np.zeros(d.shape, dtype=np.int64), 0.0
    quantum = DISTANCE_RTOL * largest
    units = np.triu(np.rint(np.triu(d, 1) / quantum).astype(np.int64), 1)
    return units + units.T, quantum


def eps_in_units(eps: float, quantum: float) -> int:
    """eps in units of the quantum, rounded as the distances are (an edge M <= eps is one with
    units(M) <= units(eps))."""
    if math.isnan(eps):
        raise ValueError("eps is NaN")
    if quantum == 0.0:
        return 0 if eps >= 0 else -1
    return int(min(np.rint(eps / quantum), 2.0**62))
