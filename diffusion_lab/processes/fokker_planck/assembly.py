"""The step matrix of the log-density PDE (Na, Gao, Wan 2024, eq. 13-18), for all channels at once.

Linearising (D m)^2 ~ D m~ D m with m~ the previous fixed-point iterate (eq. 10, 14), the last two
terms of eq. 9 become -v D m with the per-pixel v = f - 1/2 g^2 D m~ (eq. 13 prints
"(f - 1/2 g^2 Delta)" where this linearised gradient belongs). Implicit Euler in time,
m_t ~ (m^n - m^{n-1})/dt, all other terms at t_n (eq. 15), gives for pixel (i, j) the row (derived
from eq. 15, NOT the matrix printed under eq. 16-17)

    diagonal            1 + 2 g^2 dt / h^2
    plus neighbours    -1/2 g^2 dt / h^2 + v dt / (2h)
    minus neighbours   -1/2 g^2 dt / h^2 - v dt / (2h)
    right-hand side     m^{n-1} + dt * forcing,   forcing = -(D f)^n,

the divergence of f being known, it goes to the right side. Interior row sums are exactly 1.
``stencil="printed"`` builds the matrix as the paper prints it (eq. 16-18): diagonal
b = 2 g^2 dt, plus neighbours a = v dt + 1/2 g^2 dt, minus neighbours c = v dt - 1/2 g^2 dt,
right side m^{n-1} alone (the forcing is dropped); with h != 1 its entries are scaled like the
derived ones (g^2 by 1/h^2, v by 1/h). Its rows do not sum to 1; it is for comparison only.

Row index i (0..H-1), column j (0..W-1), flattened index i*W + j (per channel; channel c is offset
by c*H*W). "Plus" neighbours are (i+1, j) and (i, j+1), "minus" ones (i-1, j), (i, j-1); a missing
neighbour (zero padding) drops out of the row. The CSR index structure of the block-diagonal matrix
is built once per (C, H, W) and cached (:func:`csr_pattern`); each step only fills the data array
(a gather from the five per-pixel coefficients).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .grid import grad_sum

STENCILS = ("derived", "printed")


@dataclass(frozen=True)
class CSRPattern:
    """The CSR structure of the block-diagonal 5-point matrix of a (C, H, W) grid."""

    indptr: np.ndarray
    indices: np.ndarray
    gather: np.ndarray  # flat indices into the (5, C*H*W) coefficient table, in CSR order
    size: int


@functools.lru_cache(maxsize=16)
def csr_pattern(shape: tuple[int, int, int]) -> CSRPattern:
    """Build (once per shape) the CSR index structure; slot order is column order:
    (i-1, j), (i, j-1), (i, j), (i, j+1), (i+1, j)."""
    c, h, w = shape
    size = c * h * w
    rows = np.arange(size)
    i = (rows // w) % h
    j = rows % w
    offsets = np.array([-w, -1, 0, 1, w])
    exists = np.stack([i > 0, j > 0, np.ones(size, bool), j < w - 1, i < h - 1])  # (5, size)
    cols = rows[None, :] + offsets[:, None]
    keep = exists.T  # (size, 5): row-major = CSR order, columns increasing within a row
    indices = cols.T[keep].astype(np.int32)
    counts = keep.sum(1)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    slot = np.broadcast_to(np.arange(5)[None, :], (size, 5))[keep]
    gather = slot * size + np.broadcast_to(rows[:, None], (size, 5))[keep]
    return CSRPattern(indptr, indices, gather, size)


def stencil_coefficients(
    v: np.ndarray, g: float, dt: float, h: float = 1.0, stencil: str = "derived"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(diagonal, plus, minus) coefficients per pixel of the step matrix (see module docstring).

    derived (eq. 15): 1 + 2 g^2 dt/h^2, -g^2 dt/(2h^2) + v dt/(2h), -g^2 dt/(2h^2) - v dt/(2h).
    printed (eq. 16-17): b = 2 g^2 dt, a = v dt + g^2 dt/2, c = v dt - g^2 dt/2 (h = 1).
    """
    diffusion = g**2 * dt / h**2
    if stencil == "derived":
        advection = v * (dt / (2 * h))
        diag = np.full_like(v, 1.0 + 2.0 * diffusion)
        return diag, -0.5 * diffusion + advection, -0.5 * diffusion - advection
    if stencil == "printed":
        advection = v * (dt / h)
        diag = np.full_like(v, 2.0 * diffusion)
        return diag, advection + 0.5 * diffusion, advection - 0.5 * diffusion
    raise ValueError(f"stencil must be one of {STENCILS}, got {stencil!r}")


def assemble_matrix(
    v: np.ndarray, g: float, dt: float, h: float = 1.0, stencil: str = "derived"
) -> sp.csr_matrix:
    """The block-diagonal (all channels) step matrix A for the per-pixel v (C, H, W).

    Only the data array is computed here; the index structure comes from the cached pattern.
    """
    v = np.asarray(v, dtype=np.float64)
    pattern = csr_pattern(tuple(v.shape))
    diag, plus, minus = stencil_coefficients(v.ravel(), g, dt, h, stencil)
    table = np.concatenate([minus, minus, diag, plus, plus])
    data = table[pattern.gather]
    return sp.csr_matrix(
        (data, pattern.indices, pattern.indptr), shape=(pattern.size, pattern.size), copy=False
    )


def linearised_velocity(f: np.ndarray, g: float, m_tilde: np.ndarray, h: float = 1.0) -> np.ndarray:
    """v = f - 1/2 g^2 D m~ (eq. 14-15: the linearised coefficient of D m)."""
    return f - 0.5 * g**2 * grad_sum(m_tilde, h)


def right_hand_side(
    m_prev: np.ndarray, forcing: np.ndarray, dt: float, stencil: str = "derived"
) -> np.ndarray:
    """m^{n-1} + dt * forcing (derived, forcing = -(D f)^n normally); m^{n-1} alone (printed, eq. 18)."""
    if stencil == "printed":
        return np.array(m_prev, dtype=np.float64)
    return m_prev + dt * forcing
