"""Conditional flow matching (Lipman et al. 2023, sec. 4: the conditional loss; Liu et al. 2023,
sec. 2: rectified flow's objective) for any process with Gaussian marginals."""

from __future__ import annotations

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.losses.base import sample_times
from diffusion_lab.processes.sde import GAUSSIAN
from diffusion_lab.score_model import ScoreModel
from diffusion_lab.utils import append_dims


class FlowMatchingLoss:
    """E_{t, x0, z} || u_theta(x_t, t) - (alpha'(t) x0 + sigma'(t) z) ||^2, x_t = alpha x0 + sigma z.

    The target is the conditional velocity d x_t / dt given x0 and z (z - x0 on the linear
    path of ``processes.flow``); its regression onto x_t is the marginal velocity, the
    probability flow the samplers integrate. u_theta is the model's ``velocity``, whatever its
    parameterisation (``velocity`` reads it directly). Times are ``sample_times``: t ~ U(eps, 1)
    by default (eps = 0: the whole path, t = 1 included, where alpha = 0). Averaged over
    dimensions and batch. ``noise``, when given, is the z paired with each x0 (rectified flow's
    reflow trains on pairs (z, x0) its previous flow generated); else z ~ N(0, I).
    """

    def __init__(self, time_sampling: str = "uniform", eps: float = 0.0) -> None:
        self.time_sampling = time_sampling
        self.eps = eps

    def __call__(
        self, model: ScoreModel, x0: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        process = model.process
        if GAUSSIAN not in process.provides:
            raise ConfigError(
                f"loss=flow_matching regresses alpha' x0 + sigma' z, which "
                f"{type(process).__name__} does not have: use process=flow, ve, vp or subvp"
            )
        t = sample_times(process, x0, self.time_sampling, self.eps)
        noise = torch.randn_like(x0) if noise is None else noise
        rate_alpha, rate_sigma = (append_dims(r, x0.ndim) for r in process.marginal_rates(t))
        target = rate_alpha.to(x0.dtype) * x0 + rate_sigma.to(x0.dtype) * noise
        xt = process.sample_marginal(x0, t, noise)
        return (model.velocity(xt, t) - target).pow(2).mean()
