"""Estimates of the peak memory and the duration of one :func:`solve_embedding` (Na, Gao, Wan
2024, Alg. 1 on one image), for planning a run before it starts."""

from __future__ import annotations

import math

#: Peak bytes of ``solve_embedding`` per value (pixel and channel) of the image, measured with
#: tracemalloc (numpy's allocations) at 1x32x32 .. 3x128x128 and N = 3 .. 20: the CSR pattern,
#: one assembly and BiCGSTAB's vectors (fixed), plus per time step the float64 tables of m, x and
#: the score and their temporaries; Alg. 1's sweeps keep the previous horizon and its copy.
SOLVE_BYTES_FIXED = 240
SOLVE_BYTES_PER_STEP = 34
SWEEP_BYTES_PER_STEP = 16
#: Python's own objects during a solve (the solver's state, scipy's wrappers), which do not
#: grow with the image: the peak of a 1x32x32 solve varied by 9 KB between runs (447 to 456 KB).
SOLVE_BYTES_OVERHEAD = 32 * 1024
#: Rough seconds per value and time step on one CPU core (the default solver and tolerance;
#: 155 s measured for a 3x1000x1000 image with N = 10), plus a fixed start-up.
SOLVE_SECONDS_PER_VALUE_STEP = 5e-6
SOLVE_SECONDS_FIXED = 0.5


def solve_memory_bytes(
    shape: tuple[int, int, int], num_steps: int, iteration: str = "per_step"
) -> int:
    """Estimated peak memory of :func:`solve_embedding` for one (C, H, W) image and N steps."""
    per_step = SOLVE_BYTES_PER_STEP + (SWEEP_BYTES_PER_STEP if iteration == "sweep" else 0)
    values = math.prod(shape)
    return SOLVE_BYTES_OVERHEAD + values * (SOLVE_BYTES_FIXED + per_step * (num_steps + 1))


def solve_seconds(shape: tuple[int, int, int], num_steps: int) -> float:
    """A rough duration of :func:`solve_embedding` for one (C, H, W) image and N steps (the
    fixed-point iterations per step grow slowly with the image, so this is an order of size)."""
    return SOLVE_SECONDS_FIXED + SOLVE_SECONDS_PER_VALUE_STEP * math.prod(shape) * num_steps
