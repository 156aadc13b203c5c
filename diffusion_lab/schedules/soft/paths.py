"""The shortest path through the graph of candidate blur levels and the bisection on eps
(Daras et al. sec. 3.3, eq. 22; App. C, App. D).

The graph G_eps joins candidate levels i < j at distance M(i, j) <= eps (eq. 22); the path runs
from the first to the last candidate and minimises the SUM of the distances (W, not W^2: the
Fig. 6 caption; with W^2 every subdivision is cheaper, (a + b)^2 > a^2 + b^2, and the path visits
every node); eps is found by bisection so that the path holds the requested number of levels (32;
App. C and App. D).

The number of levels on the path as a function of eps. The graph only changes where eps crosses
a distance, so the bisection runs over the sorted distinct distances (a finite, exact search; the
distances at the search's resolution, ``quantise``). What is monotone, and what is not:

- The cost of the minimum-sum path, and the FEWEST levels of any eps-feasible path, are
  non-increasing in eps: raising eps only adds edges, so every path feasible at eps stays
  feasible with its cost and its length.
- The levels on the minimum-SUM path (the paper's objective) are non-increasing in eps when M is
  a concave function of a one-dimensional coordinate, M(i, j) = f(|j - i|), f concave,
  f(0) = 0: a path is a vector of jumps of at most k steps (k the largest with f(k) <= eps) that
  sums to K - 1; sum f(jump) is Schur-concave, so it is smallest at the vector that majorises
  all others, (k, ..., k, r) padded with zeros, i.e. the path of ceil((K - 1) / k) jumps, the
  fewest possible, non-increasing in eps as k is.
- It is NOT a theorem for general metrics, and it does not hold exactly for the coupled blur
  distance. Five levels 0 < a < 1 < b < 3 with M(0,a) = M(b,3) = 2, M(a,1) = M(1,b) = 3.1,
  M(0,1) = M(1,3) = 5, M(a,b) = 5.5, M(0,b) = M(a,3) = 5.6, M(0,3) = 7.5 (a metric, increasing
  along the order): at eps = 5 the minimum-sum path is 0-1-3 (sum 10, 3 levels), at eps = 5.5
  it is 0-a-b-3 (sum 9.5, 4 levels). On the digits, sweeping eps over every distinct distance,
  the count of the minimum-sum path rises by one or two levels at some steps while falling
  overall (along the blur curve the triangle inequality is nearly an equality locally, so paths
  of different lengths have nearly equal sums). The tests hold both facts.

Hence two objectives (``objective``):

- ``fewest_levels`` (default): among the paths with edges <= eps, the one with the fewest
  levels, and among those the smallest sum of distances. Sec. 3.3 and App. D tune eps "such that
  the shortest path contains 32 distributions", which presumes that the count is a function of
  eps that falls as eps grows; under this objective it provably is, so the bisection over eps is
  exact and every count between the bottleneck path's and K's is reached. Its path is also a
  shortest (minimum-sum) path among those of its length, and on the digits (the soft ablations'
  16x16, blur 0.01 -> 6, 256 candidates, 32 levels) its sum, 6.1506, is within 0.01% of the
  minimum-sum path's, 6.1505.
- ``sum`` (sec. 3.3 and the Fig. 6 caption read literally: the minimum sum of distances; among
  equal sums the fewest levels, as sec. 3.3's eps = infinity case has it: the direct path). Its
  count is not monotone in eps (above), and where the sum path reaches the requested count it
  does so partly by visiting nearly coincident candidates that cost almost nothing: on the same
  digits its 32 levels include 2.195 / 2.218 (a step of 0.028 in M, the others 0.1 to 0.22;
  with the float search of before, on this machine, 0.174 / 0.198 / 0.245 and 5.342 / 5.389),
  while the fewest-levels path climbs in steps of M of 0.18 to 0.22 but one (0.063, 5.460 ->
  5.577; the sum of 32 levels barely depends on where a spare level goes). A level spent on a
  near-duplicate is a level not spent where the distribution changes.

The bisection does not need monotonicity to be correct: it keeps the invariant
count(lo) > requested > count(hi) and stops at an eps whose path holds exactly the requested
number of levels. If two neighbouring distinct distances give counts on either side of the
request (only possible under ``sum``), the path whose count is closest to the request is
returned, the finer one (more levels) on a tie, with ``exact = False`` in its info and a warning
in the log; the soft process interpolates any number of levels, so a schedule of 31 or 33 levels
is still usable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from diffusion_lab.errors import ConfigError
from diffusion_lab.schedules.soft.quantise import quantise_distances

log = logging.getLogger("diffusion_lab")

Objective = Literal["sum", "fewest_levels"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)

_UNREACHABLE = np.iinfo(np.int64).max


def search_path(units: np.ndarray, eps_units: int, objective: str) -> list[int] | None:
    """The best increasing path 0 -> K-1 with edges of at most ``eps_units``, exactly.

    Paths are ordered lexicographically by (sum of units, levels) for ``sum`` and (levels, sum)
    for ``fewest_levels``, both encoded in one int64 per edge (sum * (K + 1) + 1, resp.
    B + units with B larger than any path's sum), and then by the index sequence: the cost to
    reach K-1 from every node by dynamic programming over the DAG (edges i < j), then the path
    from 0 taking at each node the smallest next index on an optimal path.
    """
    k = units.shape[0]
    if k * k * (int(units.max(initial=0)) + 1) >= 2**61:
        raise ValueError(f"{k} candidates are too many for exact path keys")
    allowed = np.triu(units <= eps_units, 1)
    if objective == "sum":
        edge = units * (k + 1) + 1
    else:
        edge = units + (k * int(units.max(initial=0)) + 1)
    togo = np.full(k, _UNREACHABLE, dtype=np.int64)
    togo[k - 1] = 0
    successors: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * k
    for i in range(k - 2, -1, -1):
        nxt = i + 1 + np.flatnonzero(allowed[i, i + 1 :])
        nxt = nxt[togo[nxt] != _UNREACHABLE]
        successors[i] = nxt
        if nxt.size:
            togo[i] = (edge[i, nxt] + togo[nxt]).min()
    if togo[0] == _UNREACHABLE:
        return None
    path = [0]
    while path[-1] != k - 1:
        i = path[-1]
        nxt = successors[i]
        path.append(int(nxt[edge[i, nxt] + togo[nxt] == togo[i]][0]))
    return path


def path_cost(d: np.ndarray, path: Sequence[int]) -> float:
    """The sum of the (unrounded) distances ``d`` along ``path``."""
    return float(sum(d[i, j] for i, j in zip(path, path[1:])))


def bottleneck_units(units: np.ndarray) -> int:
    """The smallest eps (in units) for which an increasing path 0 -> K-1 exists: the minimax
    path, by dynamic programming over the levels."""
    best = np.full(units.shape[0], _UNREACHABLE, dtype=np.int64)
    best[0] = 0
    for j in range(1, units.shape[0]):
        best[j] = np.min(np.maximum(best[:j], units[:j, j]))
    return int(best[-1])


def eps_grid(units: np.ndarray) -> np.ndarray:
    """The eps values (in units) at which G_eps changes, from the bottleneck up: the distinct
    integers of the upper triangle. Distances that differ below the resolution give one value."""
    values = np.unique(units[np.triu_indices(units.shape[0], 1)])
    return values[values >= bottleneck_units(units)]  # below it no path exists


@dataclass
class PathResult:
    """The chosen path: node indices, eps, its cost, whether the count is the one requested, and
    the (eps, count) pairs the bisection evaluated. ``eps`` is ``eps_units`` times ``quantum``
    (:func:`quantise_distances`): the integer is what the search used, the same on any machine
    for the same data; the float follows the largest distance to its last bits."""

    path: list[int]
    eps: float
    cost: float
    requested: int
    exact: bool
    evaluations: list[tuple[float, int]] = field(default_factory=list)
    eps_units: int = 0
    quantum: float = 0.0


def find_eps(
    distances: np.ndarray,
    num_levels: int = 32,
    progress: bool = False,
    objective: str = "fewest_levels",
) -> PathResult:
    """Bisection on eps over the sorted distinct distances so that the shortest path holds
    ``num_levels`` levels (both end points included; module docstring for the invariant and for
    what is returned when no eps gives exactly that count).

    The distinct distances are those at the search's resolution (:func:`eps_grid`: the
    distinct integers of :func:`quantise_distances`), and every path is searched on the same
    integers (:func:`search_path`), so the result depends on the distances only through them.
    """
    d = np.asarray(distances, dtype=np.float64)
    k = d.shape[0]
    if num_levels < 2:
        raise ConfigError(f"need at least 2 blur levels, got {num_levels}")
    if num_levels > k:
        raise ConfigError(f"cannot choose {num_levels} levels from {k} candidates")
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown path objective {objective!r}: use {' or '.join(OBJECTIVES)}")
    units, quantum = quantise_distances(d)
    values = eps_grid(units)
    results: dict[int, list[int]] = {}
    evaluations: list[tuple[float, int]] = []

    def eps_at(index: int) -> float:
        return float(values[index] * quantum)

    def count(index: int) -> int:
        if index not in results:
            found = search_path(units, int(values[index]), objective)
            assert found is not None  # every value is at least the bottleneck
            results[index] = found
            evaluations.append((eps_at(index), len(found)))
        return len(results[index])

    def result(index: int, exact: bool) -> PathResult:
        path = results[index]
        return PathResult(path, eps_at(index), path_cost(d, path), num_levels, exact,
                          evaluations, int(values[index]), quantum)  # fmt: skip

    steps = max(1, math.ceil(math.log2(max(len(values), 2)))) + 2
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="blur schedule: bisection on eps", unit="path")
    try:
        lo, hi = 0, len(values) - 1
        for index in (lo, hi):
            count(index)
            if bar is not None:
                bar.update(1)
        if count(lo) <= num_levels or count(hi) >= num_levels:
            # the request is outside the reachable range (or met at an end)
            best = lo if count(lo) <= num_levels else hi
            exact = count(best) == num_levels
            if not exact:
                log.warning(
                    "blur schedule: no eps gives %d levels; the path holds %d (eps = %.6g)",
                    num_levels, count(best), eps_at(best),
                )  # fmt: skip
            return result(best, exact)
        while hi - lo > 1:  # invariant: count(lo) > num_levels > count(hi)
            mid = (lo + hi) // 2
            c = count(mid)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(eps=f"{eps_at(mid):.4g}", levels=c)
            if c == num_levels:
                return result(mid, True)
            if c > num_levels:
                lo = mid
            else:
                hi = mid
        # neighbouring distinct distances on either side: the count jumped over the request
        best = lo if count(lo) - num_levels <= num_levels - count(hi) else hi
        log.warning(
            "blur schedule: no eps gives %d levels (%d at eps = %.6g, %d at %.6g); returning %d",
            num_levels, count(lo), eps_at(lo), count(hi), eps_at(hi), count(best),
        )  # fmt: skip
        return result(best, False)
    finally:
        if bar is not None:
            bar.close()
