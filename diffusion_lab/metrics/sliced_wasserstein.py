r"""Sliced Wasserstein distance between two point clouds (or flattened image batches).

.. math::

    SW_p(\mu, \nu) = \Big( \mathbb{E}_{\theta \sim U(S^{d-1})}
        \big[ W_p^p(\theta_\# \mu, \theta_\# \nu) \big] \Big)^{1/p},
    \qquad
    W_p^p(\alpha, \beta) = \int_0^1 |F_\alpha^{-1}(u) - F_\beta^{-1}(u)|^p \, du .

The expectation is a Monte Carlo mean over ``n_projections`` random directions; each 1-D distance is
exact: the empirical quantile functions are step functions with steps at ``i/N`` and ``j/M``, so the
integral is a finite sum over the merged steps (for N = M, the mean of ``|x_(i) - y_(i)|^p`` over the
sorted projections). For d = 1 the result is the exact W_p.
"""

from __future__ import annotations

import torch


def _quantile_levels(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Interval weights and the sorted-sample indices of two empirical quantile functions on them."""
    f64 = torch.float64
    steps = torch.cat(
        [torch.arange(1, n + 1, dtype=f64) / n, torch.arange(1, m + 1, dtype=f64) / m]
    )
    upper = torch.unique(steps.clamp(max=1.0))
    lower = torch.cat([upper.new_zeros(1), upper[:-1]])
    mid = (lower + upper) / 2
    ix = (mid * n).floor().long().clamp(max=n - 1)
    iy = (mid * m).floor().long().clamp(max=m - 1)
    return upper - lower, ix, iy


def wasserstein_1d(x: torch.Tensor, y: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Exact W_p^p between empirical distributions along dim 0, batched over dim 1: (N, K), (M, K).

    Sorted along the last axis of the transposed (contiguous) arrays, twice as fast as along dim 0.
    """
    xs = x.T.contiguous().sort(dim=1).values
    ys = y.T.contiguous().sort(dim=1).values
    if xs.shape[1] == ys.shape[1]:  # equal sizes: the mean of |x_(i) - y_(i)|^p
        return ((xs - ys).abs().double() ** p).mean(dim=1)
    weights, ix, iy = _quantile_levels(xs.shape[1], ys.shape[1])
    diff = (xs[:, ix.to(xs.device)] - ys[:, iy.to(ys.device)]).abs().double() ** p
    return (diff * weights.to(diff.device)).sum(dim=1)


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    n_projections: int = 256,
    generator: torch.Generator | None = None,
    p: float = 2,
) -> float:
    """SW_p between point clouds x (N, ...) and y (M, ...), flattened to (N, d) and (M, d).

    Directions are uniform on the unit sphere (normalised Gaussians drawn with ``generator`` on the
    CPU); N and M may differ.
    """
    x = x.reshape(len(x), -1).double()
    y = y.reshape(len(y), -1).to(x.device).double()
    if x.shape[1] != y.shape[1] or len(x) == 0 or len(y) == 0:
        raise ValueError(f"need two non-empty point clouds of one dim, got {x.shape} and {y.shape}")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    theta = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    return float(wasserstein_1d(x @ theta, y @ theta, p).mean() ** (1.0 / p))
