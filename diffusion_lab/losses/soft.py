"""Soft Score Matching (Daras et al. 2022, eq. 12) and the Cold Diffusion loss (sec. 3.1).

For a linear corruption x_t = C_t x_0 + sigma_t z (eq. 4) and a model of the clean image,
x0_hat = h_theta(x_t, t) (eq. 8; for the ``x0_residual`` parameterisation phi_theta(x_t, t) + x_t,
eq. 10, so that x0_hat - x_0 = phi_theta - r_t with r_t = x_0 - x_t as in eq. 11), the per-example
loss is

    w(t) || C_t (x0_hat - x_0) ||^2,   w(t) = 1 / sigma_t^2   (App. D; the README's errata).

Eq. 9 and 11 print 1 / sigma_t^4: that is the score loss || s_theta - target ||^2 with
s_theta = (C_t h - x_t) / sigma_t^2 unweighted; eq. 12 with App. D's w(t) = 1 / sigma_t^2 is the
same loss times sigma_t^2, Song & Ermon's lambda(sigma) = sigma^2. So the weight on
|| C_t (x0_hat - x_0) ||^2 is 1 / sigma_t^2, never 1 / sigma^4 or 1 / sigma^6.

Reduction: summed over dimensions, averaged over the batch and halved (the 1/2 of eq. 9-11),
exactly the reduction of ``losses.dsm.DenoisingScoreMatching``. With that choice the constant
factor between this loss and the variance-weighted DSM is 1: by eq. 8,
sigma_t s_theta + z = (C_t x0_hat - x_t) / sigma_t + z = C_t (x0_hat - x_0) / sigma_t, so
1/2 || sigma s + z ||^2 = 1/2 || C_t (x0_hat - x_0) ||^2 / sigma_t^2 for every linear corruption
(with C_t = I, VE, the classic identity). It is tested to float precision with C_t = I.

Computed directly in the filtered space, C_t (x0_hat - x_0) = ``process.mean(x0_hat - x0, t)``
(the mean is linear in x_0 for every process this loss applies to), and only then divided by
sigma_t: no score is formed and no O(1) difference such as C_t x0_hat - x_t is divided by
sigma_t^2 and compensated by adding z back. In float32 at sigma = 0.01 the loss is then as
precise as x0_hat itself allows (tests/losses/test_soft_losses.py: per-example relative error 1.5e-5
against 2.3e-5 through the score, for x0_hat within 1e-3 of x_0; the floor is x0_hat's own
rounding, eps_32 |x| / |x0_hat - x0|).

Times come from ``losses.base.sample_times`` (``"uniform"``: t ~ U(eps, 1), the paper's
t ~ U[0, 1]; or ``"levels"``), then the noise from ``torch.randn_like``: the same draws, in the
same order, as the DSM loss, so that seeding both alike gives the same t and z.

The Cold Diffusion loss (Bansal et al. 2022; the paper's baseline, sec. 3.1 and sec. 4 "Training
Objective": FID 5.91 against 1.85) drops C_t: w(t) || x0_hat - x_0 ||^2, an upper bound on Soft
Score Matching up to ||C_t||. ``weighting`` is ``"inverse_variance"`` (w = 1/sigma_t^2) by
default for both, so that an ablation of the loss changes only the C_t; ``"none"`` (w = 1) is
Bansal et al.'s unweighted objective (they use an L1 norm; this is the squared error of sec. 3.1).
"""

from __future__ import annotations

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.losses.base import sample_times
from diffusion_lab.score_model import ScoreModel
from diffusion_lab.utils import append_dims

WEIGHTINGS = ("inverse_variance", "none")


class SoftScoreMatching:
    """1/2 E_t E_{x0, z} w(t) || C_t (x0_hat(x_t, t) - x_0) ||^2 (eq. 12), w = 1/sigma_t^2.

    ``filtered=False`` drops C_t (the Cold Diffusion loss, :class:`ColdDiffusionLoss`).
    """

    def __init__(
        self,
        time_sampling: str = "uniform",
        eps: float = 1e-5,
        weighting: str = "inverse_variance",
        filtered: bool = True,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown loss weighting {weighting!r}: use one of {WEIGHTINGS}")
        self.time_sampling = time_sampling
        self.eps = eps
        self.weighting = weighting
        self.filtered = filtered

    def per_example(
        self, model: ScoreModel, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """w(t) || C_t (x0_hat - x0) ||^2 (or without C_t) for given times and noise, shape (B,)."""
        process = model.process
        xt = process.sample_marginal(x0, t, noise)
        error = model.denoised(xt, t) - x0
        if self.filtered:
            error = process.mean(error, t)
        if self.weighting == "inverse_variance":
            sigma = append_dims(process.std(t), x0.ndim).to(error.dtype)
            error = error / sigma
        return error.pow(2).flatten(1).sum(1)

    def __call__(self, model: ScoreModel, x0: torch.Tensor) -> torch.Tensor:
        t = sample_times(model.process, x0, self.time_sampling, self.eps)
        noise = torch.randn_like(x0)
        return 0.5 * self.per_example(model, x0, t, noise).mean()


class ColdDiffusionLoss(SoftScoreMatching):
    """1/2 E w(t) || x0_hat - x_0 ||^2: Soft Score Matching without C_t (the paper's baseline)."""

    def __init__(
        self, time_sampling: str = "uniform", eps: float = 1e-5, weighting: str = "inverse_variance"
    ) -> None:
        super().__init__(time_sampling, eps, weighting, filtered=False)
