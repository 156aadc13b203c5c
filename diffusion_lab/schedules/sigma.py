"""NCSN sigma schedules: the L noise levels of a VE process.

Each returns L noise levels in the papers' order, sigma_1 = sigma_max > ... > sigma_L = sigma_min
(Spagnoletti et al. sec. 3), in float64, with both end points exact (no duplicated or
zero last level); :func:`diffusion_lab.schedules.sigma_schedule` picks one by name.

The five sigma schedules of Spagnoletti et al. sec. 7 ("Noise scale"): geometric, linear,
cosine, squared cosine and sigmoid. The last three are given there as shapes f(k) with
constants (alpha = 1.0064; alpha = 1.068; alpha = 2.5, beta = 1.009) that do not by themselves
end at sigma_min; as the papers' README (errata) asks, each is rescaled affinely,

    sigma_i = sigma_min + (sigma_max - sigma_min) (f_i - f_L) / (f_1 - f_L),

so that it runs exactly from sigma_1 = sigma_max to sigma_L = sigma_min. Reading notes (the
printed formulas are not self-consistent; each choice below is the one under which the paper's
constants do what the paper says they do, namely end near sigma_L / sigma_1 = 0.01 before the
rescale):

- cosine and squared cosine are evaluated at u_k = k / (L - 1), k = 0..L-1 (the text prints
  k / (alpha L), which never reaches u = 1): then cos(pi / (2 * 1.0064)) = 0.00999 and
  cos(pi / (2 * 1.068))^2 = 0.00997, i.e. the alphas were chosen for u in [0, 1].
- sigmoid: printed as -1 / (1 + exp(-k - alpha)) + beta, which for k >= 0 lies entirely in the
  sigmoid's upper tail (no S shape, contrary to the paper's own description of gamma_k first
  rising then falling) and, for L = 200, underflows to duplicate levels. We use
  f(t) = beta - 1 / (1 + exp(-(t - alpha))) on t_k = 10 k / (L - 1): the S-curve with its
  inflection at t = alpha, for which beta = 1.009 gives f(10) / f(0) = 0.0102.
"""

from __future__ import annotations

import math

import torch


def geometric_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """sigma_i = sigma_max * (sigma_min / sigma_max)^((i-1)/(L-1)), i = 1..L (NCSN, Khungurn sec. 5.1)."""
    return torch.exp(
        torch.linspace(math.log(sigma_max), math.log(sigma_min), num_levels, dtype=torch.float64)
    )


def linear_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """sigma_i evenly spaced from sigma_max to sigma_min (Spagnoletti et al. sec. 4)."""
    return torch.linspace(sigma_max, sigma_min, num_levels, dtype=torch.float64)


COSINE_ALPHA = 1.0064  # Spagnoletti et al. sec. 7, cosine schedule
SQUARED_COSINE_ALPHA = 1.068  # Spagnoletti et al. sec. 7, squared cosine schedule
SIGMOID_ALPHA, SIGMOID_BETA = 2.5, 1.009  # Spagnoletti et al. sec. 7, sigmoid schedule
SIGMOID_SPAN = 10.0  # the sigmoid's argument runs over [0, SIGMOID_SPAN] (module docstring)


def rescale_levels(shape: torch.Tensor, sigma_max: float, sigma_min: float) -> torch.Tensor:
    """Map a decreasing shape f_1 > ... > f_L affinely onto sigma_max .. sigma_min exactly.

    sigma_i = sigma_min + (sigma_max - sigma_min) (f_i - f_L) / (f_1 - f_L) (papers' README,
    errata for Spagnoletti et al.); the end points are set exactly, not by round-off.
    """
    unit = (shape - shape[-1]) / (shape[0] - shape[-1])
    levels = sigma_min + (sigma_max - sigma_min) * unit
    levels[0], levels[-1] = sigma_max, sigma_min
    return levels


def _unit_grid(num_levels: int) -> torch.Tensor:
    """u_k = k / (L - 1), k = 0..L-1, in float64."""
    return torch.linspace(0.0, 1.0, num_levels, dtype=torch.float64)


def cosine_shape(num_levels: int, alpha: float = COSINE_ALPHA) -> torch.Tensor:
    """f_k = cos(u_k / alpha * pi / 2) (Spagnoletti et al. sec. 7, cosine scheduler)."""
    return torch.cos(_unit_grid(num_levels) / alpha * math.pi / 2)


def squared_cosine_shape(num_levels: int, alpha: float = SQUARED_COSINE_ALPHA) -> torch.Tensor:
    """f_k = cos(u_k / alpha * pi / 2)^2 (Spagnoletti et al. sec. 7, squared cosine scheduler)."""
    return cosine_shape(num_levels, alpha) ** 2


def sigmoid_shape(
    num_levels: int, alpha: float = SIGMOID_ALPHA, beta: float = SIGMOID_BETA
) -> torch.Tensor:
    """f_k = beta - 1 / (1 + exp(-(t_k - alpha))), t_k = 10 k / (L - 1) (Spagnoletti et al. sec. 7,
    sigmoid scheduler, read as the module docstring explains)."""
    t = SIGMOID_SPAN * _unit_grid(num_levels)
    return beta - torch.sigmoid(t - alpha)


def cosine_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """Cosine schedule (alpha = 1.0064), rescaled to run from sigma_max to sigma_min exactly."""
    return rescale_levels(cosine_shape(num_levels), sigma_max, sigma_min)


def squared_cosine_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """Squared cosine schedule (alpha = 1.068), rescaled to run from sigma_max to sigma_min."""
    return rescale_levels(squared_cosine_shape(num_levels), sigma_max, sigma_min)


def sigmoid_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """Sigmoid schedule (alpha = 2.5, beta = 1.009), rescaled to run from sigma_max to sigma_min."""
    return rescale_levels(sigmoid_shape(num_levels), sigma_max, sigma_min)


SIGMA_SCHEDULES = {
    "geometric": geometric_sigmas,
    "linear": linear_sigmas,
    "cosine": cosine_sigmas,
    "squared_cosine": squared_cosine_sigmas,
    "sigmoid": sigmoid_sigmas,
}
