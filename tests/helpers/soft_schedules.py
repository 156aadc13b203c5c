"""Test-local pieces of the soft blur schedules: the path search and the bisection's eps grid as
functions of a distance matrix, evenly spaced levels, and exact OT between sampled levels (the
comparison with the coupled distance; Daras et al. sec. 3.3)."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from diffusion_lab.errors import ConfigError
from diffusion_lab.schedules.soft.blur import BlurFn, candidate_blurs
from diffusion_lab.schedules.soft.paths import (
    OBJECTIVES,
    bottleneck_units,
    eps_grid,
    path_cost,
    search_path,
)
from diffusion_lab.schedules.soft.quantise import eps_in_units, quantise_distances


def linear_levels(
    num_levels: int = 32, blur_min: float = 0.01, blur_max: float = 23.0
) -> list[float]:
    """``soft_linear``: ``num_levels`` evenly spaced stds from blur_min to blur_max."""
    if num_levels < 2:
        raise ConfigError(f"need at least 2 blur levels, got {num_levels}")
    return candidate_blurs(blur_min, blur_max, num_levels, "linear").tolist()


def shortest_path(
    distances: np.ndarray, eps: float, objective: str = "fewest_levels"
) -> tuple[list[int], float] | None:
    """The path 0 -> K-1 through increasing levels whose edges are at most ``eps`` (eq. 22), and
    its sum of distances; None if no such path exists.

    ``objective`` ``fewest_levels`` (the default; ``schedules.soft.paths``): the path with the
    fewest levels, the smallest sum among those. ``sum`` (sec. 3.3 read literally): the path whose SUM
    of distances is smallest, the fewest levels among those. Edges join i < j only (a blur
    schedule is increasing); zero distances stay edges. The search is exact on the distances
    rounded to the resolution ``DISTANCE_RTOL`` (:func:`quantise_distances`; eps rounded the
    same way), and a tie that remains is broken by the lexicographically smallest index
    sequence, so the path does not depend on the last bits of the distances (``quantise``). The
    returned sum is that of the unrounded distances along the path.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown path objective {objective!r}: use {' or '.join(OBJECTIVES)}")
    d = np.asarray(distances, dtype=np.float64)
    units, quantum = quantise_distances(d)
    path = search_path(units, eps_in_units(float(eps), quantum), objective)
    return None if path is None else (path, path_cost(d, path))


def bottleneck(distances: np.ndarray) -> float:
    """The smallest eps for which an increasing path 0 -> K-1 exists (the minimax path), at the
    search's resolution: a multiple of the quantum of :func:`quantise_distances`."""
    units, quantum = quantise_distances(distances)
    return bottleneck_units(units) * quantum


def eps_candidates(distances: np.ndarray) -> np.ndarray:
    """The eps values at which the graph G_eps changes, from the bottleneck up: the distinct
    rounded distances (``np.unique`` of the integers of :func:`quantise_distances`) times the
    quantum. Distances that differ below the resolution give one candidate, not several."""
    units, quantum = quantise_distances(distances)
    return eps_grid(units) * quantum


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
    (independent sample sets, dominated by sampling noise: ``distances``).
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
