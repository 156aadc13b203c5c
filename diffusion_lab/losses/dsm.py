"""Denoising score matching (Vincent 2011) as NCSN and Score SDE weight it."""

from __future__ import annotations

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.losses.base import sample_times
from diffusion_lab.score_model import ScoreModel
from diffusion_lab.utils import append_dims

WEIGHTINGS = ("variance", "likelihood")


class DenoisingScoreMatching:
    """E_t lambda(t) E_{x0, x_t} || s_theta(x_t, t) - grad log p_0t(x_t | x0) ||^2 (Khungurn eq. 9).

    The target is grad log p_0t = -(x_t - alpha x0) / sigma^2 = -z / sigma (for NCSN,
    -(x_tilde - x) / sigma^2, Khungurn eq. 7). ``weighting="variance"``: lambda = sigma(t)^2, so
    the summand is || sigma s + z ||^2 (NCSN's lambda(sigma) = sigma^2, Score SDE's default);
    ``"likelihood"``: lambda = g(t)^2 (Song et al. 2021b). Summed over dimensions, averaged
    over the batch, halved as in Score SDE's code. ``time_sampling="fixed"``: one noise level,
    ``fixed_time`` (Vincent's DSM at a single sigma, Spagnoletti et al. eq. 8).
    """

    def __init__(
        self,
        time_sampling: str = "uniform",
        eps: float = 1e-5,
        weighting: str = "variance",
        fixed_time: float | None = None,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown DSM weighting {weighting!r}: use one of {WEIGHTINGS}")
        self.time_sampling = time_sampling
        self.eps = eps
        self.weighting = weighting
        self.fixed_time = fixed_time

    def __call__(self, model: ScoreModel, x0: torch.Tensor) -> torch.Tensor:
        process = model.process
        t = sample_times(process, x0, self.time_sampling, self.eps, None, self.fixed_time)
        noise = torch.randn_like(x0)
        if self.weighting == "variance":
            return self.variance_weighted(model, x0, t, noise).mean()
        xt = process.sample_marginal(x0, t, noise)
        g = process.sde(xt, t)[1]
        residual = model.score(xt, t) + noise / append_dims(process.std(t), x0.ndim)
        return 0.5 * (g.pow(2) * residual.pow(2).flatten(1).sum(1)).mean()

    @staticmethod
    def variance_weighted(
        model: ScoreModel, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """1/2 || sigma(t) s_theta(x_t, t) + z ||^2 per example (B,), x_t = mean + sigma z."""
        xt = model.process.sample_marginal(x0, t, noise)
        sigma = append_dims(model.process.std(t), x0.ndim)
        return 0.5 * (sigma * model.score(xt, t) + noise).pow(2).flatten(1).sum(1)
