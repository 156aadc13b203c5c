"""Score matching without denoising: implicit (Hyvarinen 2005) and sliced (Song, Garg, Shi and
Ermon, UAI 2019 / 2020) score matching, per noise level.

Hyvarinen's Theorem 1 (Khungurn sec. 2, eq. 1-2): for x ~ p and any smooth s,

    J(s) = 1/2 E || s(x) - grad log p(x) ||^2 = E[ tr(grad_x s(x)) + 1/2 || s(x) ||^2 ] + C,
    C = 1/2 E || grad log p(x) ||^2,

so the Fisher divergence is minimised without the data's score. (Spagnoletti et al. eq. 1 drops
the 1/2 and eq. 2 prints Tr(grad^2 p) for tr(grad^2 log p) with the constant E||grad log p||^2;
with Khungurn's 1/2 the identity is the one above, which the tests check on a Gaussian.)

Sliced score matching replaces the trace by random projections v with E[v v^T] = I:

    SSM:    E_v [ v^T grad_x (v^T s) + 1/2 (v^T s)^2 ],
    SSM-VR: E_v [ v^T grad_x (v^T s) ] + 1/2 || s ||^2   (the variance-reduced form),

both unbiased for J - C; SSM-VR is implicit score matching with Hutchinson's trace estimator
(one vector-Jacobian product per projection instead of D). The reference code normalises v to
unit length, which scales the loss by 1 / D; here E[v v^T] = I keeps it the Fisher divergence.

Noise levels. With ``perturb`` the objective is taken at x_t = alpha x0 + sigma z, the
process's marginal at a time t drawn as the other losses draw it (``levels``, ``uniform`` or
``fixed``), so it matches the score of p_t: the noisy variant of Spagnoletti et al. eq. 7, which
stays equivalent to DSM (their eq. 9; the equivalence is with p_t, and breaks for the data
itself as sigma -> 0 when the data lie on a manifold, their sec. 3.1.1). By Stein's lemma
E[z . s(x_t)] = sigma E[tr grad s], so for every s

    1/2 E || sigma s(x_t) + z ||^2 = sigma^2 E[ tr grad s + 1/2 || s ||^2 ] + D / 2:

with ``weighting="variance"`` (lambda = sigma^2) and the levels of a VE process, this is NCSN's
objective (Khungurn sec. 5.1) with DSM's noise target replaced by the trace; tested. Without
``perturb`` the clean data are matched at ``fixed_time`` (plain score matching, which needs a
density on the whole space).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from diffusion_lab.config_types import NonNegativeFloat, PositiveInt
from diffusion_lab.errors import ConfigError
from diffusion_lab.jacobian_trace import PROBES, exact_trace, hutchinson_trace, make_probe
from diffusion_lab.losses.base import check_time_sampling, sample_times
from diffusion_lab.score_model import ScoreModel

WEIGHTINGS = ("variance", "none")
TRACES = ("exact", "hutchinson")


@dataclass
class ScoreMatchingObjective(abc.ABC):
    """What implicit and sliced score matching share: the time, the input, the weight.

    Per example the objective (:meth:`per_example`) is taken at x = x_t (``perturb``) or x0,
    weighted by sigma(t)^2 (``"variance"``) or 1 (``"none"``), averaged over the batch. Its
    derivatives in x are taken under ``enable_grad`` and ``inference_mode(False)``, so the loss
    also works in Lightning's validation loop.
    """

    time_sampling: str = "levels"
    eps: NonNegativeFloat = 1e-5
    fixed_time: float | None = None
    perturb: bool = True
    weighting: str = "variance"

    def __post_init__(self) -> None:
        """Stop at build time, not at the first step."""
        check_time_sampling(self.time_sampling, self.fixed_time)
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(
                f"unknown score-matching weighting {self.weighting!r}: use one of {WEIGHTINGS}"
            )

    @abc.abstractmethod
    def per_example(self, model: ScoreModel, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The unweighted objective at x (which requires grad) and t, shape (B,)."""

    def weighted(self, model: ScoreModel, x0: torch.Tensor) -> torch.Tensor:
        """lambda(t) times the objective per example (B,), at fresh times and noise."""
        process = model.process
        with torch.inference_mode(False), torch.enable_grad():
            x0 = x0.detach().clone()
            t = sample_times(
                process, x0, self.time_sampling, self.eps, None,
                self.fixed_time,
            )  # fmt: skip
            x = process.sample_marginal(x0, t, torch.randn_like(x0)) if self.perturb else x0
            value = self.per_example(model, x.detach().requires_grad_(True), t)
            if self.weighting == "variance":
                value = process.std(t).to(value.dtype) ** 2 * value
        return value

    def __call__(self, model: ScoreModel, x0: torch.Tensor) -> torch.Tensor:
        return self.weighted(model, x0).mean()


def half_squared_norm(s: torch.Tensor) -> torch.Tensor:
    """1/2 || s ||^2 per example (B,)."""
    return 0.5 * s.pow(2).flatten(1).sum(1)


@dataclass
class ImplicitScoreMatching(ScoreMatchingObjective):
    """Hyvarinen's objective tr(grad_x s) + 1/2 ||s||^2 (Khungurn eq. 2; Spagnoletti et al. eq. 2).

    ``trace="exact"``: D vector-Jacobian products (small D: toy data); ``"hutchinson"``: the mean
    of ``num_probes`` estimates e^T (grad_x s) e with ``probe`` vectors (for images; this is
    sliced score matching's variance-reduced form).
    """

    trace: str = "exact"
    probe: str = "rademacher"
    num_probes: PositiveInt = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trace not in TRACES:
            raise ConfigError(f"unknown trace {self.trace!r}: use one of {TRACES}")
        if self.probe not in PROBES:
            raise ConfigError(f"unknown probe {self.probe!r}: use one of {PROBES}")

    def per_example(self, model: ScoreModel, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = model.score(x, t)
        if self.trace == "exact":
            trace = exact_trace(s, x, create_graph=True)
        else:
            estimates = [hutchinson_trace(s, x, make_probe(x, self.probe), create_graph=True)
                         for _ in range(self.num_probes)]  # fmt: skip
            trace = torch.stack(estimates).mean(0)
        return trace + half_squared_norm(s)


@dataclass
class SlicedScoreMatching(ScoreMatchingObjective):
    """Sliced score matching over ``num_projections`` projections v (``projection``:
    Gaussian, as the reference code, or Rademacher, the config's default, whose trace estimate
    has no variance from the Jacobian's diagonal): v^T grad(v^T s) + 1/2 (v^T s)^2, or with
    ``variance_reduced`` 1/2 ||s||^2 in place of 1/2 (v^T s)^2 (SSM-VR). One vector-Jacobian
    product per projection, whatever D."""

    num_projections: PositiveInt = 1
    projection: str = "rademacher"
    variance_reduced: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projection not in PROBES:
            raise ConfigError(f"unknown projection {self.projection!r}: use one of {PROBES}")

    def per_example(self, model: ScoreModel, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = model.score(x, t)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for _ in range(self.num_projections):
            v = make_probe(x, self.projection)
            total = total + hutchinson_trace(s, x, v, create_graph=True)
            if not self.variance_reduced:
                total = total + 0.5 * (s * v).flatten(1).sum(1).pow(2)
        total = total / self.num_projections
        return total + half_squared_norm(s) if self.variance_reduced else total
