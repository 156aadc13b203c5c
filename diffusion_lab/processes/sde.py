"""Forward SDEs dx = f(x, t) dt + g(t) dW on continuous time t in [0, 1] (t = 0 clean).

Khungurn sec. 7.2: the VE SDE (SMLD / NCSN, sec. 7.2.1), the VP SDE (DDPM, sec. 7.2.2) and the
sub-VP SDE (sec. 7.2.3). All three are linear, so every marginal is Gaussian,
x(t) = alpha(t) x(0) + sigma(t) z, and everything a sampler needs follows from
``marginal_coefficients``: the exact one-step transition, the ancestral step, DDIM and Tweedie.

Each process is defined by its N discrete noise levels (the DDPM betas, the NCSN sigmas) and
interpolates them in continuous time, so that the discrete methods (DDPM, NCSN) are exactly the
processes sampled on their grid ``level_times()`` and the continuous methods (Score SDE) use the
same objects between grid points: one code path, not two.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffusion_lab import schedules
from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.base import (
    LINEAR_MEAN,
    NOISY_AT_ZERO,
    ForwardProcess,
    declare_capability,
)
from diffusion_lab.sample_streams import rand, randn
from diffusion_lab.utils import append_dims, time_dtype

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

GAUSSIAN = declare_capability(
    "gaussian_sde",
    "has Gaussian marginals alpha(t) x0 + sigma(t) z (VE, VP, sub-VP, flow matching)",
)
HAS_SDE = declare_capability(
    "sde",
    "has a forward SDE dx = f dt + g dW, finite on [0, 1], whose reverse SDE a learned score "
    "drives (VE, VP, sub-VP, FP embedding)",
)
PROBABILITY_FLOW = declare_capability(
    "probability_flow",
    "has a probability-flow ODE a learned model drives (VE, VP, sub-VP, flow matching, FP "
    "embedding)",
)
INVERTIBLE_MEAN = declare_capability(
    "invertible_mean",
    "has an invertible mean, alpha(t) > 0 on all of [0, 1] (VE, VP, sub-VP; not a flow, whose "
    "alpha(1) = 0)",
)
UNIT_MEAN = declare_capability("unit_mean", "keeps the mean at x0 (alpha(t) = 1: a VE process)")
PRIORS = ("gaussian", "uniform")


def _interpolate(table: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Piecewise-linear interpolation of ``table`` at fractional indices; also its slope (in
    ``time_dtype`` of the position: bfloat16 cannot hold indices up to N)."""
    position = position.to(time_dtype(position))
    table = table.to(position)
    last = table.numel() - 1
    position = position.clamp(0, last)
    left = position.floor().clamp(max=last - 1).long()
    weight = position - left
    slope = table[left + 1] - table[left]
    return table[left] + weight * slope, slope


def _hermite_interpolate(
    table: torch.Tensor, position: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """C^1 cubic Hermite interpolation of ``table`` at fractional indices; also its derivative.

    Passes through every table entry; the slopes at the knots are central differences (one-sided
    at the ends), so the derivative is continuous: an ODE solver sees no jumps.
    """
    position = position.to(time_dtype(position))
    table = table.to(position)
    last = table.numel() - 1
    knot_slopes = torch.empty_like(table)
    knot_slopes[1:-1] = (table[2:] - table[:-2]) / 2
    knot_slopes[0], knot_slopes[-1] = table[1] - table[0], table[-1] - table[-2]
    position = position.clamp(0, last)
    left = position.floor().clamp(max=last - 1).long()
    u = position - left
    y0, y1, m0, m1 = table[left], table[left + 1], knot_slopes[left], knot_slopes[left + 1]
    value = (
        (2 * u**3 - 3 * u**2 + 1) * y0
        + (u**3 - 2 * u**2 + u) * m0
        + (-2 * u**3 + 3 * u**2) * y1
        + (u**3 - u**2) * m1
    )
    slope = (6 * u**2 - 6 * u) * (y0 - y1) + (3 * u**2 - 4 * u + 1) * m0 + (3 * u**2 - 2 * u) * m1
    return value, slope


class SDE(ForwardProcess):
    """A linear forward SDE with Gaussian marginals on t in [0, 1]: mean(x0, t) = alpha(t) x0.

    Subclasses give ``marginal_coefficients`` (alpha(t), sigma(t)), ``sde`` (f, g), the prior,
    the discrete level grid and the network's noise label; the rest is shared.
    """

    provides = frozenset({GAUSSIAN, HAS_SDE, PROBABILITY_FLOW, LINEAR_MEAN, INVERTIBLE_MEAN})
    #: Default variance of ``ancestral_step`` (DDPM's transition variance for VP; SMLD's posterior).
    ancestral_variance = "transition"

    @abc.abstractmethod
    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)) such that x(t) | x(0) ~ N(alpha x(0), sigma^2 I)."""

    @abc.abstractmethod
    def marginal_rates(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha'(t), sigma'(t)), the time derivatives of ``marginal_coefficients``."""

    @abc.abstractmethod
    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift f(x, t) (shaped like x) and diffusion g(t) (shape (B,))."""

    def probability_flow_velocity(
        self, model: Any, x: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """dx/dt of the probability flow at (x, t) for ``model`` (a sampler's
        ``CountingModel``): alpha' x0_hat + sigma' eps_hat, from ``model.predictions``.

        This is f - g^2 s / 2 (Khungurn sec. 7.3.3) written with the marginal's rates: for a
        linear SDE f = (alpha'/alpha) x and g^2 = 2 sigma sigma' - 2 (alpha'/alpha) sigma^2, and
        x = alpha x0 + sigma eps, s = -eps / sigma. Unlike f and g, it stays finite where
        alpha = 0 (the end t = 1 of a flow-matching path, ``processes.flow``).
        """
        x0_hat, eps_hat = model.predictions(x, t)
        rate_alpha, rate_sigma = self.marginal_rates(t)
        return append_dims(rate_alpha, x.ndim) * x0_hat + append_dims(rate_sigma, x.ndim) * eps_hat

    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the Gaussian prior p_1 = N(0, prior_std^2 I)."""

    def mean(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """alpha(t) x0."""
        return append_dims(self.marginal_coefficients(t)[0], x0.ndim) * x0

    def std(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t)."""
        return self.marginal_coefficients(t)[1]

    def marginal_prob(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean alpha(t) x0 and std sigma(t) (shape (B,)) of x(t) given x(0) = x0."""
        alpha, sigma = self.marginal_coefficients(t)
        return append_dims(alpha, x0.ndim) * x0, sigma

    def sample_marginal(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """x(t) = alpha(t) x0 + sigma(t) noise."""
        mean, std = self.marginal_prob(x0, t)
        return mean + append_dims(std, x0.ndim) * noise

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """A draw from the prior N(0, prior_std^2 I)."""
        return self.prior_std() * randn(shape, generator, device)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I) per example."""
        dim = z[0].numel()
        std = self.prior_std()
        sq = z.flatten(1).pow(2).sum(1)
        return -0.5 * dim * math.log(2 * math.pi * std**2) - sq / (2 * std**2)

    def transition_coefficients(
        self, t_from: torch.Tensor, t_to: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of the exact transition x(t_to) = a x(t_from) + b z for t_from < t_to.

        For a linear SDE, a = alpha(t_to) / alpha(t_from) and b^2 = sigma(t_to)^2 - a^2 sigma(t_from)^2.
        """
        alpha_from, sigma_from = self.marginal_coefficients(t_from)
        alpha_to, sigma_to = self.marginal_coefficients(t_to)
        a = alpha_to / alpha_from
        b_sq = (sigma_to**2 - a**2 * sigma_from**2).clamp(min=0)
        return a, b_sq.sqrt()

    def discretize(
        self, x: torch.Tensor, t: torch.Tensor, dt: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step x(t) = x(t - dt) + f + G z as (f, G) (Khungurn eq. 13), exact for linear SDEs.

        For the VP SDE this is DDPM's chain, f = (sqrt(1 - beta_i) - 1) x, G = sqrt(beta_i); for the
        VE SDE, f = 0, G = sqrt(sigma_i^2 - sigma_{i-1}^2) (SMLD). ``dt`` defaults to 1/N.
        """
        dt = 1.0 / self.num_steps if dt is None else dt
        a, b = self.transition_coefficients((t - dt).clamp(min=0), t)
        return (append_dims(a, x.ndim) - 1) * x, b

    def ancestral_step(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor,
        score: torch.Tensor,
        variance: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of x(t_prev) given x(t), by Tweedie on the transition t_prev -> t.

        E[a x(t_prev) | x(t)] = x(t) + b^2 score (Khungurn sec. 7.1.2), so mean = (x + b^2 s) / a.
        ``variance="transition"`` uses b^2 (DDPM's sigma_t^2 = beta_t, Ho et al. eq. 11 with
        Khungurn eq. 14); ``"posterior"`` uses b^2 sigma(t_prev)^2 / sigma(t)^2, the variance of
        q(x_prev | x_t, x_0) (Score SDE's ancestral sampler for SMLD).
        """
        variance = variance or self.ancestral_variance
        a, b = self.transition_coefficients(t_prev, t)
        mean = (x + append_dims(b**2, x.ndim) * score) / append_dims(a, x.ndim)
        if variance == "transition":
            return mean, b
        if variance == "posterior":
            return mean, self.posterior_std(t, t_prev)
        raise ConfigError(
            f"unknown ancestral variance {variance!r}: use 'transition' or 'posterior'"
        )

    def posterior_std(self, t: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
        """The std of q(x(t_prev) | x(t), x(0)) for t_prev < t: b sigma(t_prev) / sigma(t), b the
        transition's std (DDIM's sigma_t at eta = 1, Song et al. 2020 eq. 16), written as
        sigma_prev sqrt(1 - (a sigma_prev / sigma)^2) with a = alpha / alpha_prev, so that it
        stays finite where alpha(t) = 0 (a flow's t = 1)."""
        alpha_prev, sigma_prev = self.marginal_coefficients(t_prev)
        alpha, sigma = self.marginal_coefficients(t)
        kept = alpha * sigma_prev / (alpha_prev * sigma)
        return sigma_prev * (1 - kept**2).clamp(min=0).sqrt()

    def denoise(self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Tweedie's estimate E[x(0) | x(t)] = (x + sigma^2 score) / alpha (the final denoising step)."""
        alpha, sigma = self.marginal_coefficients(t)
        return (x + append_dims(sigma**2, x.ndim) * score) / append_dims(alpha, x.ndim)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE dx = [f - g^2 s] dt + g dW_bar, or with ``probability_flow`` the
        ODE dx/dt = f - g^2 s / 2 (Khungurn sec. 7.3.1 and 7.3.3)."""
        return ReverseSDE(self, score_fn, probability_flow)


@dataclass
class ReverseSDE:
    """The reverse of ``forward`` driven by ``score_fn``; time still runs in forward units."""

    forward: SDE
    score_fn: ScoreFn
    probability_flow: bool = False

    @property
    def _score_weight(self) -> float:
        return 0.5 if self.probability_flow else 1.0

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse drift f - w g^2 s and diffusion (0 for the probability flow)."""
        drift, g = self.forward.sde(x, t)
        drift = drift - append_dims(g**2, x.ndim) * self.score_fn(x, t) * self._score_weight
        return drift, torch.zeros_like(g) if self.probability_flow else g

    def discretize(
        self, x: torch.Tensor, t: torch.Tensor, dt: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse-diffusion discretisation (Khungurn eq. 13): x_prev = x - f + G^2 s + G z."""
        f, big_g = self.forward.discretize(x, t, dt)
        rev_f = f - append_dims(big_g**2, x.ndim) * self.score_fn(x, t) * self._score_weight
        return rev_f, torch.zeros_like(big_g) if self.probability_flow else big_g


class VESDE(SDE):
    """Variance exploding SDE dx = sqrt(d sigma^2/dt) dW (Khungurn sec. 7.2.1).

    sigma(t) interpolates the N levels of a sigma schedule log-linearly on t_i = i/(N-1); with the
    default geometric schedule this is exactly sigma(t) = sigma_min (sigma_max/sigma_min)^t and
    g(t) = sigma(t) sqrt(2 log(sigma_max/sigma_min)). As in Score SDE, x(0) is taken to carry the
    smallest noise level already (p_0 = p_data convolved with N(0, sigma_min^2)), so the marginal
    std is sigma(t) and level i is NCSN's x + sigma_i z exactly.

    ``prior``: sampling starts from N(0, sigma_max^2 I) (``"gaussian"``) or, as NCSN and NCSNv2
    do, from the uniform distribution on ``prior_range``^D (``"uniform"``: U[0, 1]^D, their
    data range).
    """

    provides = SDE.provides | {UNIT_MEAN, NOISY_AT_ZERO}
    ancestral_variance = "posterior"
    native_conditioning = "sigma"

    def __init__(
        self,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        num_steps: int = 1000,
        schedule: str = "geometric",
        prior: str = "gaussian",
        prior_range: tuple[float, float] = (0.0, 1.0),
        conditioning: str | None = None,
    ) -> None:
        super().__init__(num_steps, conditioning)
        if prior not in PRIORS:
            raise ConfigError(f"process.prior must be one of {PRIORS}, got {prior!r}")
        low, high = prior_range
        if not low < high:
            raise ConfigError(
                f"process.prior_range must be [low, high] with low < high, got {prior_range}"
            )
        self.prior, self.prior_range = prior, (float(low), float(high))
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        levels = schedules.sigma_schedule(schedule, sigma_max, sigma_min, num_steps)
        self._log_sigmas = levels.flip(0).log()  # increasing with t

    @property
    def sigmas(self) -> torch.Tensor:
        """The N levels in the papers' order, sigma_max first."""
        return self._log_sigmas.flip(0).exp()

    def _log_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.fixed_table("_log_sigmas", t.device, time_dtype(t))
        log_sigma, slope = _interpolate(table, t * (self.num_steps - 1))
        return log_sigma, slope * (self.num_steps - 1)

    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_sigma, _ = self._log_sigma(t)
        return torch.ones_like(t), log_sigma.exp()

    def marginal_rates(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_sigma, dlog_sigma_dt = self._log_sigma(t)
        return torch.zeros_like(t), log_sigma.exp() * dlog_sigma_dt

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_sigma, dlog_sigma_dt = self._log_sigma(t)
        return torch.zeros_like(x), log_sigma.exp() * (2 * dlog_sigma_dt).sqrt()

    def prior_std(self) -> float:
        return self.sigma_max

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """N(0, sigma_max^2 I), or U(prior_range)^D for ``prior="uniform"``."""
        if self.prior == "gaussian":
            return super().prior_sampling(shape, generator, device)
        low, high = self.prior_range
        return low + (high - low) * rand(shape, generator, device)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log density of the prior at z per example (-inf outside the uniform prior's box)."""
        if self.prior == "gaussian":
            return super().prior_logp(z)
        low, high = self.prior_range
        flat = z.flatten(1)
        inside = ((flat >= low) & (flat <= high)).all(1)
        logp = torch.full_like(flat[:, 0], -flat.shape[1] * math.log(high - low))
        return torch.where(inside, logp, torch.full_like(logp, -math.inf))

    def level_times(self) -> torch.Tensor:
        return torch.linspace(0, 1, self.num_steps)

    def native_noise_label(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t): NCSN networks are conditioned on the noise level."""
        return self.marginal_coefficients(t)[1]


class VPSDE(SDE):
    """Variance preserving SDE dx = -beta(t)/2 x dt + sqrt(beta(t)) dW (Khungurn sec. 7.2.2).

    Built from DDPM's discrete betas: log alpha_bar is interpolated between the grid points
    t_i = i/N, where it equals sum_{j<=i} log(1 - beta_j). So on the grid the marginal is DDPM's
    N(sqrt(alpha_bar_i) x0, (1 - alpha_bar_i) I) exactly (Ho et al. eq. 4). The interpolation is
    C^1 cubic Hermite, so beta(t) = -d log alpha_bar / dt is continuous (a piecewise-linear one
    would make beta jump at all N knots and cost an adaptive ODE solver thousands of steps); it
    stays within O(1/N) of Score SDE's beta_min + t (beta_max - beta_min).
    """

    native_conditioning = "index"

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        num_steps: int = 1000,
        schedule: str = "beta_linear",
        conditioning: str | None = None,
    ) -> None:
        super().__init__(num_steps, conditioning)
        self.beta_min, self.beta_max = beta_min, beta_max
        self.discrete_betas = schedules.beta_schedule(schedule, num_steps, beta_min, beta_max)
        if not bool(((self.discrete_betas > 0) & (self.discrete_betas < 1)).all()):
            raise ConfigError("VP betas must lie in (0, 1): lower beta_max or raise num_steps")
        zero = torch.zeros(1, dtype=torch.float64)
        self._log_alpha_bars = torch.cat([zero, torch.log1p(-self.discrete_betas).cumsum(0)])

    def log_alpha_bar(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log alpha_bar(t) = -int_0^t beta(s) ds and beta(t)."""
        table = self.fixed_table("_log_alpha_bars", t.device, time_dtype(t))
        value, slope = _hermite_interpolate(table, t * self.num_steps)
        return value, -slope * self.num_steps

    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha_bar, _ = self.log_alpha_bar(t)
        return (0.5 * log_alpha_bar).exp(), (-torch.expm1(log_alpha_bar)).sqrt()

    def marginal_rates(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha' = -beta alpha / 2 and sigma' = beta alpha_bar / (2 sigma)."""
        log_alpha_bar, beta = self.log_alpha_bar(t)
        alpha_bar = log_alpha_bar.exp()
        sigma = (-torch.expm1(log_alpha_bar)).sqrt()
        return -0.5 * beta * alpha_bar.sqrt(), beta * alpha_bar / (2 * sigma)

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, beta = self.log_alpha_bar(t)
        return -0.5 * append_dims(beta, x.ndim) * x, beta.sqrt()

    def prior_std(self) -> float:
        return 1.0

    def level_times(self) -> torch.Tensor:
        return torch.arange(1, self.num_steps + 1, dtype=torch.float32) / self.num_steps

    def native_noise_label(self, t: torch.Tensor) -> torch.Tensor:
        """DDPM's 0-based step index i - 1 at t = i/N (continuous in between)."""
        return t * self.num_steps - 1


class SubVPSDE(VPSDE):
    """Sub-VP SDE dx = -beta/2 x dt + sqrt(beta (1 - alpha_bar^2)) dW (Khungurn sec. 7.2.3).

    Same mean as VP, marginal std 1 - alpha_bar(t) (not its square root).
    """

    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha_bar, _ = self.log_alpha_bar(t)
        return (0.5 * log_alpha_bar).exp(), -torch.expm1(log_alpha_bar)

    def marginal_rates(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha' as VP's and sigma' = beta alpha_bar."""
        log_alpha_bar, beta = self.log_alpha_bar(t)
        alpha_bar = log_alpha_bar.exp()
        return -0.5 * beta * alpha_bar.sqrt(), beta * alpha_bar

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha_bar, beta = self.log_alpha_bar(t)
        return -0.5 * append_dims(beta, x.ndim) * x, (beta * -torch.expm1(2 * log_alpha_bar)).sqrt()
