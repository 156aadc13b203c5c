"""NCSNv2's heuristics for the noise levels and the Langevin step (Song & Ermon 2020).

Khungurn sec. 6 (Techniques 1, 2 and 4; 3 is ``ScoreModel(parameterization="score_over_sigma")``
and 5 the EMA callback):

- Technique 1 (sec. 6.1): sigma_1 = the largest Euclidean distance between two training points,
  :func:`largest_pairwise_distance`, computed block by block (never an N x N matrix).
- Technique 2 (sec. 6.2): a geometric sequence whose common ratio gamma satisfies
  Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) ~ 0.5,
  :func:`common_ratio`. Khungurn writes "erf"; the derivation (Spagnoletti et al. sec. 7, under
  their Proposition 2: Z ~ N(0, 1)) and the NCSNv2 paper give Phi, the standard normal CDF, which
  is what is used here. :func:`num_levels` is the smallest L whose geometric ratio
  (sigma_1 / sigma_L)^(1/(L-1)) does not exceed gamma.
- Technique 4 (sec. 6.4): with p_sigma_i = N(0, sigma_i^2 I), T Langevin steps
  x <- x + a s + sqrt(2a) z, a = eps sigma_i^2 / sigma_L^2, started from N(0, sigma_{i-1}^2 I),
  end in N(0, s_T^2 I) with s_T^2 / sigma_i^2 given in closed form (:func:`langevin_variance_ratio`).
  That ratio is always > 1 (it lies between gamma^2 and its fixed point 1 / (1 - eps / (2
  sigma_L^2))), so "as close as possible to 1" is its minimum over eps, found numerically
  (:func:`langevin_step_size`).

These functions take any (N, ...) tensor of training data in model range and know no data set;
``python -m diffusion_lab.noise_levels [Hydra data overrides]`` prints their numbers for the
training split of any ``data`` config and the matching Hydra overrides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.optimize import brentq, minimize_scalar
from scipy.stats import norm

from diffusion_lab.errors import ConfigError


def largest_pairwise_distance(data: torch.Tensor, chunk: int = 1024) -> float:
    """max_{i<j} ||x_i - x_j|| over the N examples of ``data`` (N, ...) (Technique 1).

    Rows are compared block by block (``chunk`` rows against the rows from there on), in float64
    with ||a||^2 + ||b||^2 - 2 a.b, so memory is O(chunk * N), never O(N^2).
    """
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    x = data.reshape(data.shape[0], -1).to(torch.float64)
    if x.shape[0] < 2:
        raise ConfigError("need at least two examples for a pairwise distance")
    sq = x.pow(2).sum(1)
    best = 0.0
    for start in range(0, x.shape[0], chunk):
        block = x[start : start + chunk]
        d2 = sq[start : start + chunk, None] + sq[None, start:] - 2 * block @ x[start:].T
        best = max(best, float(d2.max()))
    return math.sqrt(max(best, 0.0))


def level_overlap(gamma: float, dim: int) -> float:
    """Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) (Khungurn sec. 6.2).

    The mass that p_sigma_i puts on the 3-std interval of p_sigma_{i-1}, gamma = sigma_{i-1}/sigma_i,
    under the radial approximation ||x|| ~ N(sqrt(D) sigma, sigma^2 / 2).
    """
    shift = math.sqrt(2 * dim) * (gamma - 1)
    return float(norm.cdf(shift + 3 * gamma) - norm.cdf(shift - 3 * gamma))


def common_ratio(dim: int, target: float = 0.5, xtol: float = 1e-12) -> float:
    """Technique 2: the gamma > 1 with ``level_overlap(gamma, dim) = target``, by ``brentq``.

    The overlap falls from Phi(3) - Phi(-3) = 0.997 at gamma = 1 towards 0 once sqrt(2D) > 3;
    for D <= 4 it never falls to 0.5 and a ConfigError says so.
    """
    if not 0 < target < level_overlap(1.0, dim):
        raise ConfigError(f"overlap target must lie in (0, {level_overlap(1.0, dim):.4f})")
    high = 2.0
    while level_overlap(high, dim) > target:
        high *= 2
        if high > 1e6:
            raise ConfigError(f"no common ratio reaches overlap {target} in D = {dim} dimensions")
    return float(brentq(lambda g: level_overlap(g, dim) - target, 1.0, high, xtol=xtol))


def num_levels(sigma_max: float, sigma_min: float, gamma: float) -> int:
    """The smallest L with (sigma_max / sigma_min)^(1/(L-1)) <= gamma (at least 2)."""
    if not 0 < sigma_min < sigma_max or gamma <= 1:
        raise ConfigError("need 0 < sigma_min < sigma_max and gamma > 1")
    return max(2, math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-9) + 1)


def langevin_variance_ratio(eps: float, n_steps: int, gamma: float, sigma_min: float) -> float:
    """s_T^2 / sigma_i^2 after T = ``n_steps`` Langevin steps at one level (Khungurn sec. 6.4).

    (1 - eps/sigma_L^2)^(2T) (gamma^2 - 2 eps / (sigma_L^2 - sigma_L^2 (1 - eps/sigma_L^2)^2))
    + 2 eps / (sigma_L^2 - sigma_L^2 (1 - eps/sigma_L^2)^2).
    """
    var_l = sigma_min**2
    contraction = 1 - eps / var_l
    fixed = 2 * eps / (var_l - var_l * contraction**2)
    return contraction ** (2 * n_steps) * (gamma**2 - fixed) + fixed


def langevin_step_size(n_steps: int, gamma: float, sigma_min: float) -> float:
    """Technique 4: the eps that brings s_T^2 / sigma_i^2 closest to 1 (its minimum over eps).

    Searched by ``minimize_scalar`` on log(eps / sigma_L^2) in (-30, 0), i.e. 0 < eps < sigma_L^2
    (the update contracts, 0 < 1 - eps / sigma_L^2 < 1).
    """
    if n_steps < 1:
        raise ConfigError(f"need at least one Langevin step per level, got {n_steps}")

    def objective(log_u: float) -> float:
        return langevin_variance_ratio(math.exp(log_u) * sigma_min**2, n_steps, gamma, sigma_min)

    result = minimize_scalar(
        objective, bounds=(-30.0, 0.0), method="bounded", options={"xatol": 1e-10}
    )
    return math.exp(result.x) * sigma_min**2


@dataclass(frozen=True)
class NCSNv2Config:
    """The numbers the heuristics give for one data set (sigma_1 > ... > sigma_L geometric)."""

    dim: int
    sigma_max: float
    sigma_min: float
    gamma_criterion: float  # Technique 2's ratio
    gamma: float  # the ratio actually used: (sigma_max / sigma_min)^(1/(L-1)) <= gamma_criterion
    num_levels: int
    n_steps_each: int
    step_lr: float  # Technique 4's eps for ``gamma``
    variance_ratio: float  # s_T^2 / sigma_i^2 at that eps

    def overrides(self) -> list[str]:
        """Hydra overrides for ``process`` (a VESDE), ``schedule`` and ``sampler`` (annealed Langevin)."""
        return [
            f"process.sigma_max={self.sigma_max:.6g}",
            f"process.sigma_min={self.sigma_min:g}",
            f"process.num_steps={self.num_levels}",
            "schedule=geometric",
            f"sampler.n_steps_each={self.n_steps_each}",
            f"sampler.step_lr={self.step_lr:.3g}",
        ]


def ncsnv2_config(
    data: torch.Tensor,
    n_steps_each: int = 5,
    sigma_min: float = 0.01,
    target: float = 0.5,
    chunk: int = 1024,
) -> NCSNv2Config:
    """Techniques 1, 2 and 4 on training data (N, ...) in model range: sigma_1, L, gamma, eps."""
    dim = int(data[0].numel())
    sigma_max = largest_pairwise_distance(data, chunk)
    gamma_criterion = common_ratio(dim, target)
    levels = num_levels(sigma_max, sigma_min, gamma_criterion)
    gamma = (sigma_max / sigma_min) ** (1 / (levels - 1))
    eps = langevin_step_size(n_steps_each, gamma, sigma_min)
    return NCSNv2Config(
        dim=dim,
        sigma_max=sigma_max,
        sigma_min=sigma_min,
        gamma_criterion=gamma_criterion,
        gamma=gamma,
        num_levels=levels,
        n_steps_each=n_steps_each,
        step_lr=eps,
        variance_ratio=langevin_variance_ratio(eps, n_steps_each, gamma, sigma_min),
    )
