"""Toy 2-D data: Gaussian mixtures with exact (noised) scores, and sample-only shapes.

The Gaussian mixtures give the exact score of the data after the forward map
``x_t = alpha * x_0 + sigma * z`` (z ~ N(0, I)): the convolved mixture is a mixture of
``N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)`` with the same weights. Any process whose marginal
is of this form (VE: alpha = 1; VP / sub-VP: alpha = exp(-...)) thus has a closed-form score for tests.

Named sets (all in roughly [-6, 6]^2, so VE sigma_max of about 10 covers them):

- ``gmm8``: 8 equal-weight Gaussians on a circle of radius 4, std 0.5 (neighbours 6 std apart).
- ``two_modes``: NCSN's example (Song & Ermon 2019, sec. 3.2): weight 0.8 at (5, 5), weight 0.2 at
  (-5, -5), std 1. Component 0 is the heavy one.
- ``grid25``: 25 equal-weight Gaussians on the grid {-4, -2, 0, 2, 4}^2, std 0.2.
- sample-only (no closed-form score): ``two_moons`` (scaled by 2, centred, noise 0.1), ``rings``
  (4 concentric circles of radii 1..4, noise 0.08) and ``checkerboard`` (8 side-2 squares in
  [-4, 4]^2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from diffusion_lab.data.base import (
    TensorDataModule,
    check_choice,
    check_int,
    check_split_sizes,
    derive_seed,
    seeded_generator,
)
from diffusion_lab.errors import ConfigError

TensorLike = torch.Tensor | float


class GaussianMixture:
    """A mixture of isotropic Gaussians in D dimensions, with exact noised scores and densities.

    Args:
        means: (K, D) component means.
        stds: per-component isotropic std, a scalar or shape (K,); must be > 0.
        weights: (K,) non-negative mixture weights (normalised here); default uniform.
    """

    def __init__(
        self,
        means: torch.Tensor | Sequence[Sequence[float]],
        stds: torch.Tensor | Sequence[float] | float,
        weights: torch.Tensor | Sequence[float] | None = None,
    ) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be (K, D), got shape {tuple(self.means.shape)}")
        k = self.means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.stds = stds.expand(k).clone() if stds.ndim == 0 else stds
        w = torch.ones(k) if weights is None else torch.as_tensor(weights)
        w = w.to(torch.float64)
        if self.stds.shape != (k,) or w.shape != (k,):
            raise ValueError(f"stds and weights must be scalars or shape ({k},)")
        if (self.stds <= 0).any() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("stds must be > 0 and weights >= 0 with a positive sum")
        self.weights = w / w.sum()

    @property
    def num_components(self) -> int:
        """K."""
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        """D."""
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        """Mixture mean (D,)."""
        return (self.weights[:, None] * self.means).sum(0).float()

    def covariance(self) -> torch.Tensor:
        """Mixture covariance (D, D)."""
        m = self.weights[:, None] * self.means
        second = (self.weights * self.stds**2).sum() * torch.eye(self.dim, dtype=torch.float64)
        second = second + self.means.T @ m
        mu = m.sum(0)
        return (second - torch.outer(mu, mu)).float()

    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples (n, D) float32 and their component indices (n,) int64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp, None] * z
        return x.float(), comp

    def _component_terms(
        self, x: torch.Tensor, alpha: TensorLike, sigma: TensorLike
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log(w_k N(x; alpha mu_k, v_k I)) (B, K), x - alpha mu_k (B, K, D) and v_k (B, K)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (B, {self.dim}), got shape {tuple(x.shape)}")
        dt = torch.float64
        xd = x.to(dt)
        alpha = torch.as_tensor(alpha, dtype=dt, device=x.device).reshape(-1, 1)  # (B or 1, 1)
        sigma = torch.as_tensor(sigma, dtype=dt, device=x.device).reshape(-1, 1)
        means, stds = self.means.to(x.device), self.stds.to(x.device)
        var = alpha**2 * stds**2 + sigma**2  # (B or 1, K)
        diff = xd[:, None, :] - alpha[:, :, None] * means[None]  # (B, K, D)
        sq = (diff**2).sum(-1)  # (B, K)
        logw = self.weights.to(x.device).log()
        terms = logw - 0.5 * self.dim * torch.log(2 * math.pi * var) - 0.5 * sq / var
        return terms, diff, var.expand_as(terms)

    def log_prob(
        self, x: torch.Tensor, alpha: TensorLike = 1.0, sigma: TensorLike = 0.0
    ) -> torch.Tensor:
        """log p_t(x) (B,) of the mixture after ``x_t = alpha x_0 + sigma z`` (default: data)."""
        terms, _, _ = self._component_terms(x, alpha, sigma)
        return torch.logsumexp(terms, dim=1).to(x.dtype)

    def responsibilities(
        self, x: torch.Tensor, alpha: TensorLike = 1.0, sigma: TensorLike = 0.0
    ) -> torch.Tensor:
        """Posterior component probabilities p(k | x_t) (B, K)."""
        terms, _, _ = self._component_terms(x, alpha, sigma)
        return torch.softmax(terms, dim=1).to(x.dtype)

    def score(
        self, x: torch.Tensor, alpha: TensorLike = 1.0, sigma: TensorLike = 0.0
    ) -> torch.Tensor:
        """grad_x log p_t(x) (B, D) = sum_k p(k | x) (alpha mu_k - x) / v_k.

        ``alpha`` and ``sigma`` are scalars or (B,) tensors; computed in float64 with a softmax.
        """
        terms, diff, var = self._component_terms(x, alpha, sigma)
        resp = torch.softmax(terms, dim=1)
        return (-(resp / var)[:, :, None] * diff).sum(1).to(x.dtype)

    def denoised(self, x: torch.Tensor, alpha: TensorLike, sigma: TensorLike) -> torch.Tensor:
        """E[x_0 | x_t = x] (B, D) = sum_k p(k | x) (mu_k + alpha s_k^2 / v_k (x - alpha mu_k)):
        each component's Gaussian posterior mean, finite where alpha = 0 (it is the mixture's
        mean there, p(k | x) = w_k)."""
        terms, diff, var = self._component_terms(x, alpha, sigma)
        resp = torch.softmax(terms, dim=1)
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)
        gain = (self.stds.to(x.device) ** 2 / var)[:, :, None] * alpha
        posterior = self.means.to(x.device)[None] + gain * diff
        return (resp[:, :, None] * posterior).sum(1).to(x.dtype)

    def score_fn(self, process: object) -> ExactModel:
        """The exact ``score(x, t)`` under a process with Gaussian marginals alpha(t) x0 +
        sigma(t) z (``marginal_coefficients``), with the exact ``denoised(x, t)`` as well."""
        return ExactModel(self, process)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, D={self.dim})"


class ExactModel:
    """A mixture's exact model under ``process``: called, the score; ``denoised``, E[x_0 | x_t]
    (which a sampler reads instead of Tweedie's formula, finite where alpha(t) = 0)."""

    def __init__(self, mixture: GaussianMixture, process: object) -> None:
        self.mixture, self.process = mixture, process

    def _coefficients(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        alpha, sigma = self.process.marginal_coefficients(t)  # type: ignore[attr-defined]
        return alpha, sigma

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.mixture.score(x, *self._coefficients(x, t))

    def denoised(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.mixture.denoised(x, *self._coefficients(x, t))


class SampleOnly2D:
    """A 2-D shape we can sample but whose density has no closed form (score / log_prob raise)."""

    def __init__(self, name: str) -> None:
        self.name = check_choice("name", name, tuple(_SAMPLERS))

    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` points (n, 2) float32 and a part index (n,) int64 (moon, ring or square)."""
        return _SAMPLERS[self.name](n, generator)

    def _no_closed_form(self, *args: object, **kwargs: object) -> torch.Tensor:
        exact = ", ".join(MIXTURES)
        raise ConfigError(
            f"toy2d '{self.name}' has no closed-form density or score; "
            f"exact scores exist for data.name in: {exact}"
        )

    score = _no_closed_form
    log_prob = _no_closed_form


def _two_moons(n: int, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    part = torch.randint(0, 2, (n,), generator=g)
    theta = torch.rand(n, generator=g) * math.pi
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    lower = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
    x = torch.where(part[:, None] == 0, upper, lower)
    x = (x - torch.tensor([0.5, 0.25])) * 2 + 0.1 * torch.randn(n, 2, generator=g)
    return x.float(), part


def _rings(n: int, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    part = torch.randint(0, 4, (n,), generator=g)
    theta = torch.rand(n, generator=g) * 2 * math.pi
    radius = (part + 1).float()
    x = radius[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    return (x + 0.08 * torch.randn(n, 2, generator=g)).float(), part


def _checkerboard(n: int, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g).float()
    x2 = x2 + torch.floor(x1) % 2
    x = torch.stack([x1, x2], 1) * 2  # squares of side 2 in [-4, 4]^2
    col = torch.floor(x[:, 0] / 2 + 2).clamp(0, 3)
    row = torch.floor(x[:, 1] / 2 + 2).clamp(0, 3)
    part = (row * 4 + col).long() // 2  # 8 black squares -> 0..7
    return x.float(), part


_SAMPLERS = {"two_moons": _two_moons, "rings": _rings, "checkerboard": _checkerboard}


def _gmm8() -> GaussianMixture:
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return GaussianMixture(4.0 * torch.stack([angles.cos(), angles.sin()], 1), 0.5)


def _two_modes() -> GaussianMixture:
    return GaussianMixture([[5.0, 5.0], [-5.0, -5.0]], 1.0, [0.8, 0.2])


def _grid25() -> GaussianMixture:
    ticks = torch.arange(-4.0, 5.0, 2.0, dtype=torch.float64)
    gx, gy = torch.meshgrid(ticks, ticks, indexing="ij")
    return GaussianMixture(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), 0.2)


MIXTURES = {"gmm8": _gmm8, "two_modes": _two_modes, "grid25": _grid25}
TOY2D_NAMES = (*MIXTURES, *_SAMPLERS)


def make_toy2d(name: str) -> GaussianMixture | SampleOnly2D:
    """The named toy distribution (a :class:`GaussianMixture` where a closed form exists)."""
    check_choice("name", name, TOY2D_NAMES)
    return MIXTURES[name]() if name in MIXTURES else SampleOnly2D(name)


class Toy2DDataModule(TensorDataModule):
    """Points (B, 2) from a named toy distribution; y is the mixture component (or shape part).

    ``distribution`` is the :class:`GaussianMixture` (exact ``score`` / ``log_prob``) or None for
    the sample-only sets; ``source`` always samples. Splits are drawn from independent seeded streams,
    so changing ``n_train`` does not change the test points.
    """

    def __init__(
        self,
        name: str = "gmm8",
        n_train: int = 10000,
        n_val: int = 1000,
        n_test: int = 5000,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        image_size: int | None = None,
        channels: int = 2,
        value_range: Sequence[float] | None = None,
    ) -> None:
        if image_size is not None:
            raise ConfigError(
                f"toy2d has no image_size (set data.image_size=null), got {image_size}"
            )
        if channels != 2:
            raise ConfigError(f"toy2d points are 2-D: data.channels must be 2, got {channels}")
        super().__init__(batch_size, num_workers, seed, None, 2, value_range)
        self.name = name
        self.source = make_toy2d(name)
        self.distribution = self.source if isinstance(self.source, GaussianMixture) else None
        self.num_classes = (
            self.source.num_components
            if isinstance(self.source, GaussianMixture)
            else {"two_moons": 2, "rings": 4, "checkerboard": 8}[name]
        )
        self.sizes = check_split_sizes(n_train, n_val, n_test)

    def load_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each split sampled with its own generator derived from ``seed``."""
        return {
            s: self.source.sample(n, seeded_generator(self.seed, "toy2d", s))
            for s, n in self.sizes.items()
        }

    def reference_samples(self, n: int, split: str = "test") -> torch.Tensor:
        """The first ``n`` points of ``split``; beyond its size, fresh seeded draws."""
        n = check_int("n", n, 1)
        x = super().reference_samples(n, split)
        if len(x) < n:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "reference", split))
            x = torch.cat([x, self.source.sample(n - len(x), g)[0]])
        return x
