"""Exact log-likelihoods and bits/dim by the probability-flow ODE.

The probability flow dx/dt = v(x, t) = f(x, t) - g(t)^2 s(x, t) / 2 (Khungurn sec. 7.3.3; Song et
al. 2021 eq. 13) is a neural ODE, so the instantaneous change of variables (Chen et al. 2018, thm.
1; Song et al. 2021 App. D.2, eq. 39) gives

    d/dt [x(t), log p_t(x(t))] = [v(x, t), -div_x v(x, t)],

hence log p_eps(x(eps)) = log p_1(x(1)) + int_eps^1 div_x v(x(t), t) dt. The state [x, int div] is
integrated from eps to 1 with scipy's ``solve_ivp`` (RK45, rtol/atol as given; Song et al. use 1e-5,
1e-5 and eps = 1e-5), and log p_1 is the process prior ``prior_logp``.

The divergence is estimated by Hutchinson-Skilling, div v = E[e^T (dv/dx) e] with E[e e^T] = I
(Rademacher or Gaussian probes e, one fixed probe per solve as in Song et al. App. D.2, so the
integrand is a smooth function of t the adaptive solver can follow), via one vector-Jacobian
product per evaluation. The estimate of log p is unbiased; ``num_probes`` > 1 averages independent
probes (each example is replicated and all copies are solved together). ``divergence="exact"``
sums the D diagonal Jacobian entries with D vector-Jacobian products: for tests and small D.

Gradients are taken under ``torch.enable_grad()`` and ``torch.inference_mode(False)``, so these
functions also work inside a Lightning validation or test step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.jacobian_trace import exact_trace, hutchinson_trace, make_probe
from diffusion_lab.processes.sde import SDE
from diffusion_lab.samplers.base import CountingModel, Model
from diffusion_lab.samplers.ode import integrate
from diffusion_lab.score_model import ScoreModel
from diffusion_lab.utils import batch_time

DIVERGENCES = ("hutchinson", "exact")


@dataclass
class LikelihoodResult:
    """Per-example log p_eps(x) (nats), its two terms, the latent x(1) and the NFE.

    ``logp = prior_logp + delta_logp`` with ``delta_logp = int_eps^1 div v dt``. ``nfe`` counts
    batched score evaluations (each with one backward pass per probe or, for the exact divergence,
    D backward passes).
    """

    logp: torch.Tensor
    prior_logp: torch.Tensor
    delta_logp: torch.Tensor
    z: torch.Tensor
    nfe: int


@dataclass
class BitsPerDimResult:
    """Per-example bits/dim, the model-space log-likelihood it came from, and the NFE."""

    bpd: torch.Tensor
    logp: torch.Tensor
    nfe: int


def velocity_and_divergence(
    score: Model, process: SDE, x: torch.Tensor, t: float, probe: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The probability-flow velocity v(x, t) and its divergence per example.

    With a ``probe`` e: the Hutchinson-Skilling estimate e^T (dv/dx) e from one vector-Jacobian
    product; with ``None``: the exact trace, one vector-Jacobian product per dimension.
    """
    flow = process.reverse(score, probability_flow=True)
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        v = flow.sde(x, batch_time(t, x))[0]
        div = exact_trace(v, x) if probe is None else hutchinson_trace(v, x, probe)
    return v.detach(), div.detach()


def log_likelihood(
    model: Model,
    process: SDE,
    x: torch.Tensor,
    eps: float = 1e-5,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    divergence: str = "hutchinson",
    probe: str = "rademacher",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
) -> LikelihoodResult:
    """log p_eps(x) per example (nats) by the probability-flow ODE, in the score's space.

    ``x`` is x(eps) in model space (the range the score was trained in). eps > 0 avoids the
    singular score at t = 0 (Song et al. App. D.2); p_eps is within O(sigma(eps)^2) of p_0 (for
    VE, p_0 already carries sigma_min noise: see ``VESDE``). See the module docstring for the
    divergence options.
    """
    if divergence not in DIVERGENCES:
        raise ConfigError(f"unknown divergence {divergence!r}: use one of {DIVERGENCES}")
    if num_probes < 1:
        raise ConfigError(f"num_probes must be >= 1, got {num_probes}")
    if not 0 < eps < 1:
        raise ConfigError(f"likelihood eps must lie in (0, 1), got {eps}")
    batch = x.shape[0]
    copies = num_probes if divergence == "hutchinson" else 1
    xs = x.detach().repeat_interleave(copies, dim=0)
    probes = make_probe(xs, probe, generator) if divergence == "hutchinson" else None
    score = CountingModel(model, process)
    flat_dim = xs[0].numel()

    def rhs(t: float, state: torch.Tensor) -> torch.Tensor:
        v, div = velocity_and_divergence(
            score, process, state[:, :flat_dim].reshape(xs.shape), t, probes
        )
        return torch.cat([v.flatten(1), div[:, None]], dim=1)

    start = torch.cat([xs.flatten(1), torch.zeros_like(xs.flatten(1)[:, :1])], dim=1)
    end = integrate(rhs, start, eps, 1.0, rtol, atol, method)
    z = end[:, :flat_dim].reshape(xs.shape)
    delta = end[:, flat_dim].reshape(batch, copies).mean(1)
    prior = process.prior_logp(z).reshape(batch, copies).mean(1)
    return LikelihoodResult(prior + delta, prior, delta, z[::copies], score.nfe)


@torch.no_grad()
def unnormalized_log_density(model: ScoreModel, x: torch.Tensor, t: float = 1e-5) -> torch.Tensor:
    """log p_t(x) + log Z(t) = -E_theta(x, t) per example, for an energy parameterization
    (Khungurn sec. 2): exact up to the unknown log-partition, with no ODE solve. The normalised
    value is :func:`log_likelihood`'s (the difference is the same for every x, tested)."""
    return -model.energy(x, batch_time(t, x))


def uniform_dequantize(
    x: torch.Tensor,
    data_range: Sequence[float] = (0.0, 1.0),
    num_bins: int = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform dequantisation: the level k of x (on the grid lo + k (hi - lo) / (num_bins - 1))
    becomes lo + (k + U) (hi - lo) / num_bins, U ~ U[0, 1), i.e. uniform over the k-th of num_bins
    equal bins of [lo, hi). For 8-bit data in [0, 1] this is Score SDE's (255 x + U) / 256.

    Raises ``ValueError`` if x is not on the grid (dequantising continuous data is meaningless).
    """
    lo, hi = data_range
    levels = (x - lo) / (hi - lo) * (num_bins - 1)
    k = levels.round()
    if (levels - k).abs().max() > 1e-3 or k.min() < 0 or k.max() > num_bins - 1:
        raise ValueError(
            f"data are not on a {num_bins}-level grid over {tuple(data_range)}: give the right "
            "num_bins, or dequantize=False for continuous data"
        )
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return lo + (k + noise) * (hi - lo) / num_bins


def bits_per_dim(
    model: Model,
    process: SDE,
    x: torch.Tensor,
    data_range: Sequence[float] = (0.0, 1.0),
    model_range: Sequence[float] | None = (-1.0, 1.0),
    dequantize: bool = True,
    num_bins: int = 256,
    generator: torch.Generator | None = None,
    **likelihood_options: object,
) -> BitsPerDimResult:
    """Bits/dim of data ``x`` (in ``data_range``) under the model (trained in ``model_range``).

    Exactly what is computed, with D = dims per example and y = the affine image of the data in
    model range (``model_range=None``: y = x):

    - ``dequantize=True`` (discrete data with ``num_bins`` levels; 8-bit: 256): x is
      dequantised uniformly (:func:`uniform_dequantize`), which makes bits/dim an upper bound on the
      discrete model's code length (Theis et al. 2016) and keeps it non-negative. In
      units where one bin has width 1 the change of variables to y has Jacobian
      a = (model width) / num_bins per dim, so bpd = -(log p(y) + D log a) / (D ln 2)
      = -log p(y) / (D ln 2) + log2(num_bins) - log2(model width). For 8-bit data and model range
      [-1, 1] the offset is 8 - 1 = 7, Score SDE's ``7 - inverse_scaler(-1)``; the log2(256)
      term holds only for 8-bit data, and other bin counts use their own log2(num_bins)
      (digits: 17 levels k/16).
    - ``dequantize=False`` (continuous data): the differential entropy rate in data units,
      bpd = -(log p(y) + D log((model width) / (data width))) / (D ln 2), no bin offset; it can be
      negative.

    ``likelihood_options`` go to :func:`log_likelihood` (eps, rtol, atol, divergence, probe, ...).
    """
    lo, hi = data_range
    mlo, mhi = model_range if model_range is not None else data_range
    if dequantize:
        x = uniform_dequantize(x, data_range, num_bins, generator)
        log_jacobian = math.log((mhi - mlo) / num_bins)
    else:
        log_jacobian = math.log((mhi - mlo) / (hi - lo))
    y = (x - lo) / (hi - lo) * (mhi - mlo) + mlo
    result = log_likelihood(model, process, y, generator=generator, **likelihood_options)
    dim = x[0].numel()
    bpd = -(result.logp + dim * log_jacobian) / (dim * math.log(2))
    return BitsPerDimResult(bpd, result.logp, result.nfe)
