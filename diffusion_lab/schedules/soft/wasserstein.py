"""``soft_wasserstein``: the blur levels on sec. 3.3's shortest path of coupled W distances
(Daras et al. sec. 3.3, eq. 22; App. C; 256 candidates and 32 levels in App. D)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from diffusion_lab.schedules.soft.blur import BlurFn, candidate_blurs
from diffusion_lab.schedules.soft.distances import coupled_distances
from diffusion_lab.schedules.soft.paths import find_eps


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
