"""The pixel grid of the log-density PDE (Na, Gao, Wan 2024, sec. 3.2-3.3): the one-number
"gradient" of eq. 11, 12 and 19, zero padded, and the time grid.

Erratum note (implemented as written): "grad" and "div" are ONE number per pixel, the sum of the
two central differences, (D u)_ij = (u_{i+1,j} - u_{i-1,j} + u_{i,j+1} - u_{i,j-1}) / (2h), with
values outside the grid 0 (Dirichlet 0 on the ghost nodes); (D m)^2 is its square.
"""

from __future__ import annotations

import numpy as np


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


def time_grid(num_steps: int, t0: float, T: float) -> np.ndarray:
    """t_n = t_0 + n dt, dt = (T - t_0)/N, n = 0..N (eq. 15's implicit Euler steps)."""
    if num_steps < 1 or not T > t0:
        raise ValueError(f"need num_steps >= 1 and T > t0, got {num_steps}, [{t0}, {T}]")
    return t0 + (T - t0) * np.arange(num_steps + 1) / num_steps
