"""Flow-matching paths (Lipman et al. 2023; Liu et al. 2023, rectified flow): x_t = alpha(t) x_0
+ sigma(t) z on t in [0, 1] that end in pure noise, alpha(1) = 0, sigma(1) = 1.

- ``linear``: alpha = 1 - t, sigma = t (the optimal-transport conditional path of Lipman et al.
  sec. 4.1 with sigma_min = 0; rectified flow's straight line, Liu et al. sec. 2);
- ``cosine``: alpha = cos(pi t / 2), sigma = sin(pi t / 2) (the "trigonometric" path, Albergo &
  Vanden-Eijnden 2023), variance preserving.

The conditional velocity is d x_t / dt = alpha' x_0 + sigma' z (z - x_0 on the linear path;
Lipman et al. sec. 4.1 with the roles of t = 0 and 1 swapped to this project's convention,
t = 0 clean): the target of
``losses.flow_matching``. Every Gaussian sampler sees a flow only through alpha, sigma and the
model's (x0, eps) estimates, so the Euler, Heun, DDIM, DPM-Solver++ and RK45 samplers serve it.
The process is not an ``sde``: as an SDE its drift alpha'/alpha x and diffusion diverge at t = 1,
where alpha = 0, so the reverse-SDE samplers are refused on it; its probability flow is finite.
"""

from __future__ import annotations

import math

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.base import LINEAR_MEAN
from diffusion_lab.processes.sde import GAUSSIAN, PROBABILITY_FLOW, SDE
from diffusion_lab.utils import append_dims

PATHS = ("linear", "cosine")


class FlowProcess(SDE):
    """A flow-matching path (module docstring) with ``num_steps`` levels t = i / N, i = 1..N, the
    grid its samplers stride; networks are conditioned on t."""

    provides = frozenset({GAUSSIAN, PROBABILITY_FLOW, LINEAR_MEAN})

    def __init__(
        self, path: str = "linear", num_steps: int = 1000, conditioning: str | None = None
    ) -> None:
        super().__init__(num_steps, conditioning)
        if path not in PATHS:
            raise ConfigError(f"process.path must be one of {PATHS}, got {path!r}")
        self.path = path

    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - t, t), or (sin(pi (1 - t) / 2), sin(pi t / 2)): alpha(1) = 0 exactly."""
        if self.path == "linear":
            return 1 - t, t.clone()
        return torch.sin(math.pi / 2 * (1 - t)), torch.sin(math.pi / 2 * t)

    def marginal_rates(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(-1, 1), or (-pi/2 cos(pi (1 - t) / 2), pi/2 cos(pi t / 2))."""
        if self.path == "linear":
            return -torch.ones_like(t), torch.ones_like(t)
        half_pi = math.pi / 2
        return -half_pi * torch.cos(half_pi * (1 - t)), half_pi * torch.cos(half_pi * t)

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear SDE with these marginals, f = (alpha'/alpha) x and g^2 = 2 sigma sigma' -
        2 (alpha'/alpha) sigma^2: finite on [0, 1), infinite at t = 1 (hence no ``sde``)."""
        alpha, sigma = self.marginal_coefficients(t)
        rate_alpha, rate_sigma = self.marginal_rates(t)
        log_rate = rate_alpha / alpha
        g_sq = 2 * sigma * rate_sigma - 2 * log_rate * sigma**2
        return append_dims(log_rate, x.ndim) * x, g_sq.clamp(min=0).sqrt()

    def prior_std(self) -> float:
        return 1.0

    def level_times(self) -> torch.Tensor:
        return torch.arange(1, self.num_steps + 1, dtype=torch.float32) / self.num_steps
