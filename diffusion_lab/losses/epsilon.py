"""DDPM's simplified objective L_simple (Ho et al. 2020 eq. 14)."""

from __future__ import annotations

import torch

from diffusion_lab.losses.base import sample_times
from diffusion_lab.score_model import ScoreModel


class EpsilonLoss:
    """E_{i, x0, z} || z - eps_theta(sqrt(abar_i) x0 + sqrt(1 - abar_i) z, i) ||^2.

    Equivalent to Khungurn's DDPM objective (sec. 7.1.2) with eps = -sqrt(1 - abar_i) s. The
    squared error is averaged over dimensions and batch, as in Ho et al.'s code.
    """

    def __init__(self, time_sampling: str = "levels", eps: float = 1e-5) -> None:
        self.time_sampling = time_sampling
        self.eps = eps

    def __call__(self, model: ScoreModel, x0: torch.Tensor) -> torch.Tensor:
        t = sample_times(model.process, x0, self.time_sampling, self.eps)
        noise = torch.randn_like(x0)
        xt = model.process.sample_marginal(x0, t, noise)
        return (model.eps(xt, t) - noise).pow(2).mean()
