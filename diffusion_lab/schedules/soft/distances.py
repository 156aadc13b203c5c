"""The distance between two levels of the blur stage (Daras et al. sec. 3.3, App. C).

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
  ``scipy.optimize.linear_sum_assignment``; the tests' ``sampled_level_distance``) is dominated
  by sampling noise: a level's distance to itself came out 2.2 to 3.1, while neighbouring
  candidates are 0.00 to 0.09 apart under M (median 0.02); with such estimates G_eps holds no
  path of small steps. Exact OT on SHARED samples (same x_0 and eta at both levels) is at most M
  (the identity matching is a coupling) and equalled M to four digits on every pair measured,
  neighbours and levels far apart alike (e.g. 0.0405 / 0.0405, 0.9537 / 0.9537).
- Cost: M for all 32,640 pairs of 256 candidates is one blur of the N images per candidate and
  a (K, K) float64 Gram matrix: 4 to 6 s for the 1,437 digits, nearly all of it in the 256
  blurs of the reference ``blur.gaussian_blur`` (the Gram matrix: 0.7 s; the bisection with its
  about 15 shortest paths: 0.01 s). Exact OT on shared samples costs 15 ms per pair at N = 256,
  i.e. about 8 minutes for all pairs, for the same numbers.

Cancellation in the Gram matrix: M^2 = (G_ii + G_jj - 2 G_ij) / N loses about c u G_ii (u =
2^-53; c grows with the length of the sums and depends on their order: the BLAS kernel, the
chunking), i.e. an absolute error of about min(sqrt(c u S), c u S / (2 M)), S = G_ii / N, which
ruins the smallest distances. With rows C_i x_n the Gram matrix gave M(0.01, 0.137) = 0 on 200
digits in one summation order and up to 9e-7 (1.7e-7 of the largest distance) in others (chunks
of 1, 7, 37 or 200 images); on 1000 digits (256 candidates 0.01 .. 6) the distances below 1e-6 of
the largest were off by up to 8.2e-7 of it over 17 orders (against a direct sum of squared
differences). :func:`coupled_distances` therefore centres the rows on the first candidate's
(C_i x_n - C_0 x_n; the same distances in exact arithmetic): the largest error fell to 2.1e-11 of
the largest distance over 8 orders on the 1000 digits, 1.2e-12 over the 4 on the 200. What
remains is absorbed by the path search's rounding (``quantise``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.schedules.soft.blur import BlurFn


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
    summation order (module docstring).
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
