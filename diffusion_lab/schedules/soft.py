"""Blur levels for Soft Diffusion's blur stage (Daras et al. sec. 3.3, App. C, App. F.1.2).

In the blur stage the noise is constant (sigma = 0.1) and the blur std grows from ``blur_min``
(0.01: the identity) to ``blur_max`` (23 for CelebA-64, 18 for CIFAR-10; App. D). The soft blur
process places its levels at equal t across the blur stage and interpolates linearly in between
(App. C; :func:`interpolate_levels`). It chooses them by its ``blur_schedule`` settings
(:class:`BlurScheduleSettings`): data-free ones when it is built, the others in its ``fit`` from
the training images (:func:`fit_schedule`, which caches them by the images' hash), into a buffer
that checkpoints carry. The schedulers (``method``; the options of ``conf/process/blur_schedule/``):

- ``soft_wasserstein`` (:func:`wasserstein_path_levels`): sec. 3.3's shortest path. Candidate
  levels (256 by default), a distance M between the corrupted distributions of two levels, the
  graph G_eps whose edges join levels at distance at most eps (eq. 22), the path from the first
  to the last candidate that minimises the SUM of the distances (W, not W^2: the Fig. 6 caption;
  with W^2 every subdivision is cheaper, (a + b)^2 > a^2 + b^2, and the path visits every node),
  and eps found by bisection so that the path holds the requested number of levels (32; App. C
  and App. D).
- ``soft_mse_matched`` (:func:`mse_matched_levels`): App. F.1.2's baseline, eq. 45.
- ``soft_linear`` (:func:`linear_levels`): evenly spaced stds, no data needed; ``geometric``
  (no option file: ``process.blur_schedule.method=geometric``) spaces them geometrically, for
  comparison.

The distance (the paper does not say how it estimates W; it names ott-jax). Two levels i, j of
the blur stage are x_i = C_i x_0 + sigma eta and x_j = C_j x_0 + sigma eta' with the same sigma.
The synchronous coupling (same x_0, same eta) gives

    W2(q_i, q_j) <= M(i, j) = sqrt(E_{x_0} ||(C_i - C_j) x_0||^2)            (coupled estimate)

in which the noise cancels exactly. :func:`coupled_distances` computes M for all pairs of
candidates from one set of training images. Why this estimator and not W between sample sets
(measured on the 1,437 training digits at 16x16, sigma = 0.1, candidates 0.01 .. 8, one core):

- Self-distance: M(i, i) = 0 by construction, and M is a (pseudo-)metric on levels: the L2
  distance between the vectors (C_i x_n)_n, symmetric, with the triangle inequality exact on any
  sample. Exact W2 between two INDEPENDENT sample sets (256 against 256, optimal assignment by
  ``scipy.optimize.linear_sum_assignment``, :func:`sampled_level_distance`) is dominated by
  sampling noise: a level's distance to itself came out 2.2 to 3.1, while neighbouring
  candidates are 0.00 to 0.09 apart under M (median 0.02); with such estimates G_eps holds no
  path of small steps. Exact OT on SHARED samples (same x_0 and eta at both levels,
  :func:`empirical_w2`) is at most M (the identity matching is a coupling) and equalled M to four
  digits on every pair measured, neighbours and levels far apart alike (e.g. 0.0405 / 0.0405,
  0.9537 / 0.9537).
- Cost: M for all 32,640 pairs of 256 candidates is one blur of the N images per candidate and
  a (K, K) float64 Gram matrix: 4 to 6 s for the 1,437 digits, nearly all of it in the 256
  blurs of the reference :func:`gaussian_blur` (the Gram matrix: 0.7 s; the bisection with its
  about 15 shortest paths: 0.01 s). Exact OT on shared samples costs 15 ms per pair at N = 256,
  i.e. about 8 minutes for all pairs, for the same numbers.

The number of levels on the path as a function of eps. The graph only changes where eps crosses
a distance, so the bisection runs over the sorted distinct distances (a finite, exact search; the
distances at the search's resolution, next section). What is monotone, and what is not:

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

Ties: the search is exact on integers. Along the blur curve the triangle inequality is nearly an
equality, so paths of different lengths have nearly equal sums, and distances nearly equal ones.
On 200 training digits at 16x16 (64 candidates 0.01 .. 8, largest distance 5.6): M(0.01, 0.137)
is 1.04e-11 (both kernels are the identity to 3e-12) and M(1, 63) lies 6.7e-12 below M(0, 63),
so at eps = infinity the hop 0 -> 1 -> 63 is dearer than the direct path by 4e-12 (for a metric
the direct path is a shortest one; sec. 3.3: "for any metric M, the shortest path is to go
directly"), far below the float noise of the distances. Two causes of noise, two remedies:

- Cancellation. M^2 = (G_ii + G_jj - 2 G_ij) / N loses about c u G_ii (u = 2^-53; c grows
  with the length of the sums and depends on their order: the BLAS kernel, the chunking), i.e.
  an absolute error of about min(sqrt(c u S), c u S / (2 M)), S = G_ii / N, which ruins the
  smallest distances. With rows C_i x_n the Gram matrix gave M(0.01, 0.137) = 0 on the 200
  digits in one summation order and up to 9e-7 (1.7e-7 of the largest distance) in others
  (chunks of 1, 7, 37 or 200 images); on 1000 digits (256 candidates 0.01 .. 6) the distances
  below 1e-6 of the largest were off by up to 8.2e-7 of it over 17 orders (against a direct sum
  of squared differences). :func:`coupled_distances` therefore centres the rows on the first
  candidate's (C_i x_n - C_0 x_n; the same distances in exact arithmetic): the largest error
  fell to 2.1e-11 of the largest distance over 8 orders on the 1000 digits, 1.2e-12 over the 4
  on the 200.
- What remains, about 1e-12 to 1e-11 of the largest distance, still decides near-ties such as
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
  for eps are the distinct integers (:func:`eps_candidates`), so distances that noise alone
  separates are one candidate.

The schedule is then a function of the integers, the same on any machine. What rounding cannot
remove: a distance within noise of a half-integer multiple of the quantum may round either way,
a chance of about 2 x noise / quantum (about 1e-4 for an error of 5e-12 of the largest distance),
and it changes the schedule only if that distance also decides a tie. Returned costs are the
sums of the unrounded distances; eps is its integer times the quantum.

The bisection does not need monotonicity to be correct: it keeps the invariant
count(lo) > requested > count(hi) and stops at an eps whose path holds exactly the requested
number of levels. If two neighbouring distinct distances give counts on either side of the
request (only possible under ``sum``), the path whose count is closest to the request is
returned, the finer one (more levels) on a tie, with ``exact = False`` in its info and a warning
in the log; the soft process interpolates any number of levels, so a schedule of 31 or 33 levels
is still usable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import numpy as np
import torch
from pydantic import Field
from scipy.optimize import brentq, linear_sum_assignment

from diffusion_lab.config_types import PositiveFloat, PositiveInt
from diffusion_lab.errors import ConfigError
from diffusion_lab.operators import GaussianBlur

log = logging.getLogger("diffusion_lab")

#: ``blur(x, std) -> x``: a zero-padded Gaussian blur of std ``std`` of a batch (B, C, H, W).
BlurFn = Callable[[torch.Tensor, float], torch.Tensor]

Method = Literal["wasserstein", "mse_matched", "linear", "geometric"]
Spacing = Literal["linear", "geometric"]
Objective = Literal["sum", "fewest_levels"]
METHODS: tuple[str, ...] = get_args(Method)
SPACINGS: tuple[str, ...] = get_args(Spacing)
OBJECTIVES: tuple[str, ...] = get_args(Objective)
#: The schedulers that need no training images.
DATA_FREE = ("linear", "geometric")
SCHEDULE_FORMAT = 1


# --------------------------------------------------------------------------- blur and candidates


def gaussian_blur(
    x: torch.Tensor, std: float, half_size: int | None = None, method: str | None = None
) -> torch.Tensor:
    """The soft process's blur (``operators.GaussianBlur``, zero padding; ``method`` its
    implementation, None the default) of one std for the whole batch: the ``blur(x, std)`` the
    schedules use. ``half_size`` None: H - 1 or W - 1, which with zero padding is the untruncated
    kernel (taps further out only ever meet the padding). The kernel of std 0.01 is the identity
    to float precision."""
    x = torch.as_tensor(x)
    half = max(x.shape[-2:]) - 1 if half_size is None else int(half_size)
    return GaussianBlur(torch.full((x.shape[0],), float(std)), half, method).apply(x)


def candidate_blurs(
    blur_min: float = 0.01, blur_max: float = 23.0, num: int = 256, spacing: str = "linear"
) -> np.ndarray:
    """The candidate stds from ``blur_min`` to ``blur_max`` exactly (float64).

    ``linear`` (default): evenly spaced stds. ``geometric`` spends over a third of 256
    candidates from 0.01 to 23 below a std of 0.3, where a sampled kernel is nearly the identity
    and the coupled distances are nearly 0; on 16x16 digits (blur_max 8) its 32-level path put
    10 levels between stds 0.16 and 0.20, while linear spacing gave an even path (largest
    neighbour distance: 0.086 linear, 0.077 geometric, both far below the path's eps of 0.25).
    """
    if not 0 < blur_min <= blur_max:
        raise ConfigError(f"need 0 < blur_min <= blur_max, got {blur_min} and {blur_max}")
    if num < 2:
        raise ConfigError(f"need at least 2 candidate blur levels, got {num}")
    if spacing == "linear":
        stds = np.linspace(blur_min, blur_max, num)
    elif spacing == "geometric":
        stds = np.geomspace(blur_min, blur_max, num)
    else:
        raise ConfigError(f"unknown candidate spacing {spacing!r}: use {' or '.join(SPACINGS)}")
    stds[0], stds[-1] = blur_min, blur_max
    return stds


def linear_levels(
    num_levels: int = 32, blur_min: float = 0.01, blur_max: float = 23.0
) -> list[float]:
    """``soft_linear``: ``num_levels`` evenly spaced stds from blur_min to blur_max."""
    if num_levels < 2:
        raise ConfigError(f"need at least 2 blur levels, got {num_levels}")
    return candidate_blurs(blur_min, blur_max, num_levels, "linear").tolist()


def interpolate_levels(levels: Sequence[float], u: torch.Tensor | float) -> torch.Tensor:
    """The std at position u in [0, 1] of the blur stage: levels at u_k = k / (K - 1), linear
    in between (App. C: "linear interpolation to extend to the continuous case")."""
    grid = np.linspace(0.0, 1.0, len(levels))
    u = torch.as_tensor(u, dtype=torch.float64)
    return torch.from_numpy(np.interp(u.numpy(), grid, np.asarray(levels, dtype=np.float64)))


# --------------------------------------------------------------------------- distances


def _blurred_stack(x0: torch.Tensor, blur: BlurFn, stds: Sequence[float]) -> torch.Tensor:
    """(K, N * D) float64: row k is C_k x_0 for all images, flattened."""
    return torch.stack([blur(x0, float(s)).to(torch.float64).reshape(-1) for s in stds])


def coupled_distances(
    x0: torch.Tensor, blur: BlurFn, stds: Sequence[float], chunk_images: int | None = None
) -> np.ndarray:
    """M(i, j) = sqrt(E_n ||(C_i - C_j) x_n||^2) for all pairs of ``stds`` (K, K), float64.

    The synchronous-coupling bound on W2 between the blur-stage levels (module docstring): the
    noise, equal at both levels, cancels. The images are blurred in chunks of ``chunk_images``
    (None: all at once up to about 256 MB of float64 per chunk) and the Gram matrix
    G = sum_n Y_n Y_n^T is accumulated in float64, M^2 = (diag G_i + diag G_j - 2 G_ij) / N; the
    diagonal is set to 0 exactly and round-off below 0 to 0. The rows are centred on the first
    candidate's, Y_n = (C_k x_n - C_0 x_n)_k (distances are unchanged in exact arithmetic): the
    cancellation then scales with ||(C_i - C_0) x||^2, not ||C_i x||^2, and distances among the
    candidates that are nearly the identity (the small stds) keep their digits instead of
    coming out as rounding noise up to 1e-6 of the largest distance, which differs with the
    summation order (module docstring, "Ties").
    """
    x0 = torch.as_tensor(x0)
    n = x0.shape[0]
    if n < 1:
        raise ConfigError("coupled_distances needs at least one image")
    k = len(stds)
    per_image = x0[0].numel() * k * 8
    chunk = chunk_images or max(1, min(n, (256 << 20) // max(per_image, 1)))
    gram = torch.zeros(k, k, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n, chunk):
            y = _blurred_stack(x0[start : start + chunk], blur, stds)
            y = y - y[:1]
            gram += y @ y.T
    sq = torch.diagonal(gram)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram) / n
    d2 = d2.clamp_min(0.0)
    d2 = 0.5 * (d2 + d2.T)
    d2.fill_diagonal_(0.0)
    return d2.sqrt().numpy()


def empirical_w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact W2 between two equal-size empirical sets (rows flattened), by an optimal assignment
    (``scipy.optimize.linear_sum_assignment`` on squared Euclidean costs)."""
    a = torch.as_tensor(a, dtype=torch.float64).reshape(a.shape[0], -1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(b.shape[0], -1)
    if a.shape != b.shape:
        raise ValueError(f"empirical_w2 needs sets of equal shape, got {a.shape} and {b.shape}")
    cost = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(math.sqrt(cost[rows, cols].mean()))


def sampled_level_distance(
    x0: torch.Tensor,
    blur: BlurFn,
    std_i: float,
    std_j: float,
    sigma: float,
    generator: torch.Generator,
    shared: bool,
) -> float:
    """Exact OT W2 between samples of two blur-stage levels (for comparison with M).

    ``shared``: both sets use the same x_0 and the same noise (a coupled sample; the result is
    at most M(i, j)). Otherwise the two sets use disjoint halves of ``x0`` and independent noise
    (independent sample sets, dominated by sampling noise: module docstring).
    """
    x0 = torch.as_tensor(x0, dtype=torch.float64)
    if shared:
        xa = xb = x0
        na = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        nb = na
    else:
        half = x0.shape[0] // 2
        xa, xb = x0[:half], x0[half : 2 * half]
        na = torch.randn(xa.shape, generator=generator, dtype=torch.float64)
        nb = torch.randn(xb.shape, generator=generator, dtype=torch.float64)
    a = blur(xa, std_i).to(torch.float64) + sigma * na
    b = blur(xb, std_j).to(torch.float64) + sigma * nb
    return empirical_w2(a, b)


# --------------------------------------------------------------------------- shortest path

#: The resolution of the path search, relative to the largest distance of the matrix: every
#: distance (and eps) is rounded to an integer multiple of ``DISTANCE_RTOL * max M`` and paths are
#: compared exactly on those integers (module docstring, "Ties"). 1e-7: 5,000 times the largest
#: float64 error of :func:`coupled_distances` measured over summation orders (2.1e-11 of the
#: largest distance, 1000 digits, 256 candidates), so that noise moves an integer with a chance
#: of about 1e-4 at most, and still fine enough that a path's sum is resolved to 1e-7 of the
#: largest distance.
DISTANCE_RTOL = 1e-7

_UNREACHABLE = np.iinfo(np.int64).max


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


def _eps_units(eps: float, quantum: float) -> int:
    """eps in units of the quantum, rounded as the distances are (an edge M <= eps is one with
    units(M) <= units(eps))."""
    if math.isnan(eps):
        raise ValueError("eps is NaN")
    if quantum == 0.0:
        return 0 if eps >= 0 else -1
    return int(min(np.rint(eps / quantum), 2.0**62))


def _search(units: np.ndarray, eps_units: int, objective: str) -> list[int] | None:
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


def _path_cost(d: np.ndarray, path: Sequence[int]) -> float:
    return float(sum(d[i, j] for i, j in zip(path, path[1:])))


def shortest_path(
    distances: np.ndarray, eps: float, objective: str = "fewest_levels"
) -> tuple[list[int], float] | None:
    """The path 0 -> K-1 through increasing levels whose edges are at most ``eps`` (eq. 22), and
    its sum of distances; None if no such path exists.

    ``objective`` ``fewest_levels`` (the default; module docstring): the path with the fewest
    levels, the smallest sum among those. ``sum`` (sec. 3.3 read literally): the path whose SUM
    of distances is smallest, the fewest levels among those. Edges join i < j only (a blur
    schedule is increasing); zero distances stay edges. The search is exact on the distances
    rounded to the resolution ``DISTANCE_RTOL`` (:func:`quantise_distances`; eps rounded the
    same way), and a tie that remains is broken by the lexicographically smallest index
    sequence, so the path does not depend on the last bits of the distances (module docstring,
    "Ties"). The returned sum is that of the unrounded distances along the path.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown path objective {objective!r}: use {' or '.join(OBJECTIVES)}")
    d = np.asarray(distances, dtype=np.float64)
    units, quantum = quantise_distances(d)
    path = _search(units, _eps_units(float(eps), quantum), objective)
    return None if path is None else (path, _path_cost(d, path))


def _bottleneck_units(units: np.ndarray) -> int:
    best = np.full(units.shape[0], _UNREACHABLE, dtype=np.int64)
    best[0] = 0
    for j in range(1, units.shape[0]):
        best[j] = np.min(np.maximum(best[:j], units[:j, j]))
    return int(best[-1])


def bottleneck(distances: np.ndarray) -> float:
    """The smallest eps for which an increasing path 0 -> K-1 exists (the minimax path), at the
    search's resolution: a multiple of the quantum of :func:`quantise_distances`."""
    units, quantum = quantise_distances(distances)
    return _bottleneck_units(units) * quantum


def eps_candidates(distances: np.ndarray) -> np.ndarray:
    """The eps values at which the graph G_eps changes, from the bottleneck up: the distinct
    rounded distances (``np.unique`` of the integers of :func:`quantise_distances`) times the
    quantum. Distances that differ below the resolution give one candidate, not several."""
    units, quantum = quantise_distances(distances)
    return _eps_grid(units) * quantum


def _eps_grid(units: np.ndarray) -> np.ndarray:
    values = np.unique(units[np.triu_indices(units.shape[0], 1)])
    return values[values >= _bottleneck_units(units)]  # below it no path exists


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

    The distinct distances are those at the search's resolution (:func:`eps_candidates`: the
    distinct integers of :func:`quantise_distances`), and every path is searched on the same
    integers (:func:`shortest_path`), so the result depends on the distances only through them.
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
    values = _eps_grid(units)
    results: dict[int, list[int]] = {}
    evaluations: list[tuple[float, int]] = []

    def eps_at(index: int) -> float:
        return float(values[index] * quantum)

    def count(index: int) -> int:
        if index not in results:
            found = _search(units, int(values[index]), objective)
            assert found is not None  # every value is at least the bottleneck
            results[index] = found
            evaluations.append((eps_at(index), len(found)))
        return len(results[index])

    def result(index: int, exact: bool) -> PathResult:
        path = results[index]
        return PathResult(path, eps_at(index), _path_cost(d, path), num_levels, exact,
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


def wasserstein_path_levels(
    x0: torch.Tensor,
    blur: BlurFn,
    num_levels: int = 32,
    blur_min: float = 0.01,
    blur_max: float = 23.0,
    num_candidates: int = 256,
    spacing: str = "linear",
    progress: bool = False,
    objective: str = "fewest_levels",
) -> tuple[list[float], dict[str, Any]]:
    """``soft_wasserstein``: the levels on the shortest coupled-W path (sec. 3.3, App. C) and an
    info dict (eps, cost, count, exact, the candidates' distance timing)."""
    stds = candidate_blurs(blur_min, blur_max, num_candidates, spacing)
    start = time.perf_counter()
    distances = coupled_distances(x0, blur, stds)
    seconds = time.perf_counter() - start
    found = find_eps(distances, num_levels, progress=progress, objective=objective)
    levels = [float(stds[i]) for i in found.path]
    info = {
        "eps": found.eps,
        "path_cost": found.cost,
        "num_levels_found": len(levels),
        "exact": found.exact,
        "candidate_indices": found.path,
        "distance_seconds": seconds,
        "max_neighbour_distance": float(np.diag(distances, 1).max()),
        "bisection": found.evaluations,
    }
    return levels, info


# --------------------------------------------------------------------------- MSE matched (eq. 45)


def blur_mse(x0: torch.Tensor, blur: BlurFn, std: float, sigma: float) -> float:
    """E ||x_0 - x_t||^2 per image at blur ``std`` with noise ``sigma``, exactly:
    E_n ||(I - C) x_n||^2 + D sigma^2 (the cross term has mean zero)."""
    x0 = torch.as_tensor(x0, dtype=torch.float64)
    with torch.no_grad():
        residual = x0 - blur(x0, float(std)).to(torch.float64)
    return float(residual.pow(2).flatten(1).sum(1).mean()) + x0[0].numel() * sigma**2


def ve_mse_ratio(u: np.ndarray, ve_sigma_min: float, ve_sigma_max: float) -> np.ndarray:
    """The right side of eq. 45 for the VE SDE: E||x_0 - x'_t||^2 / E||x_0 - x'_1||^2 =
    sigma(t)^2 / sigma_max^2 with geometric sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
    return (ve_sigma_min / ve_sigma_max) ** (2.0 * (1.0 - np.asarray(u, dtype=np.float64)))


def mse_matched_levels(
    x0: torch.Tensor,
    blur: BlurFn,
    sigma: float = 0.1,
    num_levels: int = 32,
    blur_min: float = 0.01,
    blur_max: float = 23.0,
    ve_sigma_min: float = 0.01,
    ve_sigma_max: float = 50.0,
    xtol: float = 1e-10,
) -> tuple[list[float], dict[str, Any]]:
    """``soft_mse_matched``: App. F.1.2's baseline (eq. 45).

    Level k sits at u_k = k / (K - 1) of the blur stage, which plays the VE SDE's t in [0, 1].
    Eq. 45 asks m(b_k) / m(blur_max) = sigma_VE(u_k)^2 / sigma_VE(1)^2, with
    m(b) = E||x_0 - x_t||^2 = E||(I - C_b) x_0||^2 + D sigma^2 (:func:`blur_mse`) and the VE SDE's
    geometric sigma from ``ve_sigma_min`` to ``ve_sigma_max`` (Song et al. 2021b; 50 is the
    project's and Score SDE's CIFAR-10 value). m(b_K) = m(blur_max) holds by construction.

    Where it cannot be met: m(b) >= m(blur_min) = D sigma^2 (the noise alone; C_{0.01} = I), while
    the VE target falls to (ve_sigma_min / ve_sigma_max)^2 m(blur_max), far below it early in the
    blur stage. There the level is clamped to ``blur_min`` until the target exceeds m(blur_min)
    (``info["clamped"]`` counts them); beyond that each level solves m(b) = target by Brent's
    method on [blur_min, blur_max] (to ``xtol``), and the levels are made non-decreasing (m is
    increasing in b for a Gaussian blur; with zero padding round-off could break a tie).
    """
    if num_levels < 2:
        raise ConfigError(f"need at least 2 blur levels, got {num_levels}")
    if not 0 < ve_sigma_min < ve_sigma_max:
        raise ConfigError(
            f"need 0 < ve_sigma_min < ve_sigma_max, got {ve_sigma_min}, {ve_sigma_max}"
        )
    u = np.linspace(0.0, 1.0, num_levels)
    m_min = blur_mse(x0, blur, blur_min, sigma)
    m_max = blur_mse(x0, blur, blur_max, sigma)
    targets = m_max * ve_mse_ratio(u, ve_sigma_min, ve_sigma_max)
    levels = []
    clamped = 0
    for target in targets[:-1]:
        if target <= m_min:
            levels.append(float(blur_min))
            clamped += 1
            continue
        b = brentq(
            lambda s, t=target: blur_mse(x0, blur, s, sigma) - t, blur_min, blur_max, xtol=xtol
        )
        levels.append(float(b))
    levels.append(float(blur_max))
    levels = np.maximum.accumulate(np.asarray(levels)).tolist()
    info = {
        "clamped": clamped,
        "mse_blur_min": m_min,
        "mse_blur_max": m_max,
        "targets": targets.tolist(),
        "ve_sigma_min": ve_sigma_min,
        "ve_sigma_max": ve_sigma_max,
    }
    return levels, info


# --------------------------------------------------------------------------- saved schedules


def data_hash(x0: torch.Tensor) -> str:
    """sha256 of the images the schedule was computed from (shape, dtype and float32 bytes)."""
    x = torch.as_tensor(x0).detach().to(torch.float32).contiguous().cpu()
    digest = hashlib.sha256(repr(tuple(x.shape)).encode())
    digest.update(x.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class BlurSchedule:
    """A found schedule as saved: its levels, the settings that produced them, the data's hash
    (None for ``linear``, which needs no data) and what the scheduler reported."""

    name: str
    levels: list[float]
    settings: dict[str, Any]
    data_hash: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    format: int = SCHEDULE_FORMAT


def save_schedule(path: str | Path, schedule: BlurSchedule) -> Path:
    """Write ``schedule`` as JSON to ``path`` (atomically: a temporary file, then a rename)."""
    from diffusion_lab.cache import write_atomic

    path = Path(path)
    text = json.dumps(asdict(schedule), indent=1, sort_keys=True) + "\n"
    write_atomic(path, lambda handle: handle.write(text.encode()))
    return path


def load_schedule(path: str | Path) -> BlurSchedule:
    """Read a schedule written by :func:`save_schedule`; a ConfigError naming the file if it is
    missing or not a schedule."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"blur schedule file {path} does not exist: write it with "
            "`python -m diffusion_lab.soft_schedule [data overrides] --out PATH`"
        )
    try:
        raw = json.loads(path.read_text())
        schedule = BlurSchedule(**raw)
        levels = [float(v) for v in schedule.levels]
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"blur schedule file {path} is not a schedule: {exc}") from None
    if len(levels) < 2 or any(b < a for a, b in zip(levels, levels[1:])):
        raise ConfigError(f"blur schedule file {path}: levels must be >= 2 and non-decreasing")
    schedule.levels = levels
    return schedule


def compute_schedule(
    method: str,
    x0: torch.Tensor | None,
    blur: BlurFn | None,
    *,
    name: str | None = None,
    num_levels: int = 32,
    blur_min: float = 0.01,
    blur_max: float = 23.0,
    sigma: float = 0.1,
    num_candidates: int = 256,
    spacing: str = "linear",
    ve_sigma_min: float = 0.01,
    ve_sigma_max: float = 50.0,
    progress: bool = False,
    objective: str = "fewest_levels",
) -> BlurSchedule:
    """Run scheduler ``method`` (wasserstein, mse_matched, linear or geometric) and wrap the
    result."""
    if method not in METHODS:
        raise ConfigError(f"unknown blur schedule method {method!r}: use {', '.join(METHODS)}")
    settings: dict[str, Any] = {
        "method": method,
        "num_levels": int(num_levels),
        "blur_min": float(blur_min),
        "blur_max": float(blur_max),
    }
    if method in DATA_FREE:
        if num_levels < 2:
            raise ConfigError(f"need at least 2 blur levels, got {num_levels}")
        levels = candidate_blurs(blur_min, blur_max, num_levels, method).tolist()
        return BlurSchedule(name or f"soft_{method}", levels, settings)
    if x0 is None or blur is None:
        raise ConfigError(f"blur schedule {method} needs training images and a blur")
    settings |= {"sigma": float(sigma), "num_images": int(x0.shape[0]),
                 "image_shape": list(x0.shape[1:])}  # fmt: skip
    if method == "wasserstein":
        settings |= {"num_candidates": int(num_candidates), "spacing": spacing,
                     "objective": objective, "distance_rtol": DISTANCE_RTOL,
                     "distance": "coupled: sqrt(E ||(C_i - C_j) x0||^2)"}  # fmt: skip
        levels, info = wasserstein_path_levels(
            x0, blur, num_levels, blur_min, blur_max, num_candidates, spacing, progress, objective
        )
    else:
        settings |= {"ve_sigma_min": float(ve_sigma_min), "ve_sigma_max": float(ve_sigma_max)}
        levels, info = mse_matched_levels(
            x0, blur, sigma, num_levels, blur_min, blur_max, ve_sigma_min, ve_sigma_max
        )
    return BlurSchedule(name or f"soft_{method}", levels, settings, data_hash(x0), info)


# --------------------------------------------------------------------------- the process's settings


@dataclass(frozen=True)
class BlurScheduleSettings:
    """How a soft blur process chooses its levels: its ``blur_schedule`` settings block
    (``conf/process/soft_blur.yaml``; the options of ``conf/process/blur_schedule/`` set
    ``method``). The range (``blur_min``, ``blur_max``), the noise (``sigma_max``) and the blur
    (its kernel) are the process's own.

    ``method``: ``wasserstein`` (sec. 3.3, App. C), ``mse_matched`` (App. F.1.2, eq. 45),
    ``linear`` or ``geometric`` (no data). ``num_levels`` levels in all; the data-driven methods
    read the first ``num_images`` of the images given to ``fit``; ``num_candidates``,
    ``spacing`` and ``objective`` are the path search's (:func:`wasserstein_path_levels`),
    ``ve_sigma_min`` and ``ve_sigma_max`` the VE SDE that ``mse_matched`` matches. ``file``: a
    schedule written by ``python -m diffusion_lab.soft_schedule`` to use instead of computing
    one (:func:`fit_schedule`).
    """

    method: Method = "linear"
    num_levels: Annotated[int, Field(ge=2)] = 32
    num_candidates: Annotated[int, Field(ge=2)] = 256
    spacing: Spacing = "linear"
    objective: Objective = "fewest_levels"
    ve_sigma_min: PositiveFloat = 0.01
    ve_sigma_max: PositiveFloat = 50.0
    num_images: PositiveInt = 1000
    file: str | None = None

    def __post_init__(self) -> None:
        key = "process.blur_schedule"
        for name, choices in (("method", METHODS), ("spacing", SPACINGS),
                              ("objective", OBJECTIVES)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"{key}.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )
        if self.num_levels < 2:
            raise ConfigError(f"{key}.num_levels must be at least 2, got {self.num_levels}")
        if self.method == "wasserstein" and self.num_candidates < self.num_levels:
            raise ConfigError(
                f"{key}.num_candidates ({self.num_candidates}) must be at least num_levels "
                f"({self.num_levels}): the path chooses its levels among the candidates"
            )
        if not 0 < self.ve_sigma_min < self.ve_sigma_max:
            raise ConfigError(
                f"{key}.ve_sigma_min and ve_sigma_max must satisfy 0 < ve_sigma_min < "
                f"ve_sigma_max, got {self.ve_sigma_min} and {self.ve_sigma_max}"
            )
        if self.num_images < 1:
            raise ConfigError(f"{key}.num_images must be at least 1, got {self.num_images}")

    @classmethod
    def from_mapping(cls, values: Any) -> BlurScheduleSettings:
        """The settings of a config block (a mapping); a misspelt key is a ConfigError that
        names the closest one."""
        from diffusion_lab.schema import did_you_mean

        values = dict(values)
        for name in values:
            if name not in cls.__dataclass_fields__:
                raise ConfigError(
                    did_you_mean("process.blur_schedule", name, cls.__dataclass_fields__)
                )
        return cls(**values)

    @property
    def needs_data(self) -> bool:
        """Whether the levels are computed from training images (in ``fit``)."""
        return self.method not in DATA_FREE


def schedule_cache_path(name: str, key: dict[str, Any]) -> Path:
    """``<cache>/blur_schedules/<name>-<hash of key>.json``."""
    from diffusion_lab.cache import cache_dir

    text = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_dir() / "blur_schedules" / f"{name}-{digest}.json"


def fit_schedule(
    settings: BlurScheduleSettings,
    x0: torch.Tensor | None,
    blur: BlurFn,
    *,
    blur_min: float,
    blur_max: float,
    sigma: float,
    blur_key: dict[str, Any],
    progress: bool = False,
) -> tuple[BlurSchedule, Path | None]:
    """The schedule ``settings`` give for the images ``x0`` (model range; the first
    ``settings.num_images`` are read), and the file it was read from or written to (None for
    the data-free methods).

    ``settings.file`` set: that file, whose method, blur_min, blur_max and num_levels must be the
    settings' (a schedule of other images is used with a warning). Otherwise the cache file keyed
    by the settings, the range, sigma, the blur (``blur_key``: what identifies ``blur``) and the
    hash of the images read (:func:`data_hash`) is read if it exists, else the schedule is
    computed, saved there and reused by any run that fits the same images with the same settings.
    """
    name = f"soft_{settings.method}"
    if not settings.needs_data:
        schedule = compute_schedule(settings.method, None, None, num_levels=settings.num_levels,
                                    blur_min=blur_min, blur_max=blur_max)  # fmt: skip
        return schedule, None
    if x0 is None:
        raise ConfigError(f"blur schedule {name} needs training images: fit the process to them")
    x0 = torch.as_tensor(x0).detach()[: settings.num_images].to("cpu", torch.float64)
    if settings.file:
        return _read_schedule_file(settings, x0, blur_min, blur_max), Path(settings.file)
    key = {**asdict(settings), "file": None, "blur_min": float(blur_min),
           "blur_max": float(blur_max), "sigma": float(sigma), "blur": blur_key,
           "distance_rtol": DISTANCE_RTOL, "format": SCHEDULE_FORMAT,
           "data_hash": data_hash(x0)}  # fmt: skip
    path = schedule_cache_path(name, key)
    if path.is_file():
        return load_schedule(path), path
    log.info("blur schedule %s: computing from %d training images", name, x0.shape[0])
    schedule = compute_schedule(
        settings.method, x0, blur, name=name, num_levels=settings.num_levels, blur_min=blur_min,
        blur_max=blur_max, sigma=sigma, num_candidates=settings.num_candidates,
        spacing=settings.spacing, ve_sigma_min=settings.ve_sigma_min,
        ve_sigma_max=settings.ve_sigma_max, progress=progress, objective=settings.objective,
    )  # fmt: skip
    save_schedule(path, schedule)
    log.info("blur schedule %s: saved to %s", name, path)
    return schedule, path


def _read_schedule_file(
    settings: BlurScheduleSettings, x0: torch.Tensor, blur_min: float, blur_max: float
) -> BlurSchedule:
    file = settings.file
    schedule = load_schedule(file)
    for key, want in (("method", settings.method), ("blur_min", blur_min),
                      ("blur_max", blur_max), ("num_levels", settings.num_levels)):  # fmt: skip
        have = schedule.settings.get(key)
        if have is None:
            continue
        if have != want if isinstance(want, str) else not math.isclose(have, want, rel_tol=1e-9):
            where = "process.blur_schedule" if key in ("method", "num_levels") else "process"
            raise ConfigError(
                f"blur schedule file {file} was computed with {key}={have}, the config asks for "
                f"{key}={want}: recompute it or change {where}.{key}"
            )
    if schedule.data_hash != data_hash(x0):
        log.warning("blur schedule file %s was computed from other images than these", file)
    return schedule
