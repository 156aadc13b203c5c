"""DDPM's simplified objective L_simple (Ho et al. 2020 eq. 14), and its min-SNR-gamma
weighting (Hang et al. 2023)."""

from __future__ import annotations

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.losses.base import sample_times
from diffusion_lab.score_model import ScoreModel
from diffusion_lab.utils import append_dims

WEIGHTINGS = ("uniform", "min_snr")


class EpsilonLoss:
    """E_{i, x0, z} w(t) || z - eps_theta(sqrt(abar_i) x0 + sqrt(1 - abar_i) z, i) ||^2.

    Equivalent to Khungurn's DDPM objective (sec. 7.1.2) with eps = -sqrt(1 - abar_i) s. The
    squared error is averaged over dimensions and batch, as in Ho et al.'s code. ``weighting``:
    ``"uniform"`` (w = 1, L_simple) or ``"min_snr"``: w = min(SNR, gamma) / SNR with SNR =
    alpha^2 / sigma^2, Hang et al. 2023's min(SNR, gamma) on the x0 error ||x0 - x0_hat||^2,
    which is the noise error divided by SNR (sec. 3.4; gamma = ``snr_gamma``, 5 in the paper).
    It reads the noise of any parameterisation (eps, v, x0, a score): the weighting is the
    same for all.
    """

    def __init__(
        self,
        time_sampling: str = "levels",
        eps: float = 1e-5,
        weighting: str = "uniform",
        snr_gamma: float = 5.0,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ConfigError(
                f"unknown loss.weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}"
            )
        if not snr_gamma > 0:
            raise ConfigError(f"loss.snr_gamma must be positive, got {snr_gamma}")
        self.time_sampling = time_sampling
        self.eps = eps
        self.weighting = weighting
        self.snr_gamma = float(snr_gamma)

    def weights(self, model: ScoreModel, t: torch.Tensor) -> torch.Tensor:
        """w(t) per example (B,)."""
        if self.weighting == "uniform":
            return torch.ones_like(t)
        alpha, sigma = model.process.marginal_coefficients(t)
        # min(SNR, gamma) / SNR = min(1, gamma / SNR), finite where SNR = 0 (a flow's t = 1)
        return (self.snr_gamma * sigma**2 / alpha**2).clamp(max=1)

    def __call__(self, model: ScoreModel, x0: torch.Tensor) -> torch.Tensor:
        t = sample_times(model.process, x0, self.time_sampling, self.eps)
        noise = torch.randn_like(x0)
        xt = model.process.sample_marginal(x0, t, noise)
        error = (model.eps(xt, t) - noise).pow(2)
        if self.weighting == "uniform":
            return error.mean()
        return (append_dims(self.weights(model, t).to(error.dtype), error.ndim) * error).mean()
