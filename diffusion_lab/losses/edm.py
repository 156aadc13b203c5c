"""EDM's training objective (Karras et al. 2022, eq. 2 and Table 1, "Ours"), for any process
with Gaussian marginals x_t = alpha x_0 + sigma z."""

from __future__ import annotations

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.samplers.grids import noise_ratio, time_of_ratio
from diffusion_lab.score_model import EDM_SIGMA_DATA, ScoreModel
from diffusion_lab.utils import append_dims


class EDMLoss:
    """E lambda(r) || D(x_t, t) - x_0 ||^2 with ln r ~ N(P_mean, P_std^2) and lambda(r) =
    (r^2 + s^2) / (r s)^2, r = sigma(t) / alpha(t) the noise level of x / alpha (Karras et al.'s
    sigma) and s = sigma_data.

    Each example's r is drawn, its time found on the process (``time_of_ratio``: clamped to
    the process's range, so a VE process with sigma_max = 50 draws no r above 50) and the
    weight taken at the r of that time. D is the model's clean-image estimate, whatever its
    parameterisation (EDM's own preconditioning is ``parameterization=edm``, whose lambda makes
    the effective target of F unit-variance). Averaged over dimensions and batch.
    """

    def __init__(
        self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = EDM_SIGMA_DATA
    ) -> None:
        if not p_std > 0 or not sigma_data > 0:
            raise ConfigError(
                f"loss.p_std and loss.sigma_data must be positive, got {p_std} and {sigma_data}"
            )
        self.p_mean, self.p_std, self.sigma_data = float(p_mean), float(p_std), float(sigma_data)

    def __call__(self, model: ScoreModel, x0: torch.Tensor) -> torch.Tensor:
        process = model.process
        if "gaussian_sde" not in process.provides:
            raise ConfigError(
                f"loss=edm draws noise levels sigma / alpha, which {type(process).__name__} "
                "does not have: use it with process=ve, vp, subvp or flow"
            )
        drawn = (self.p_mean + self.p_std * torch.randn(x0.shape[0], device=x0.device)).exp()
        t = time_of_ratio(process, drawn).to(x0.dtype)
        ratio = noise_ratio(process, t)
        weight = (ratio**2 + self.sigma_data**2) / (ratio * self.sigma_data) ** 2
        xt = process.sample_marginal(x0, t, torch.randn_like(x0))
        error = (model.denoised(xt, t) - x0).pow(2)
        return (append_dims(weight.to(error.dtype), error.ndim) * error).mean()
