"""The FP score embedding loss (Na, Gao, Wan 2024 eq. 24, Alg. 2)."""

from __future__ import annotations

import dataclasses

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.fp_embedding import FPEmbeddingProcess, ImageScoreModel
from diffusion_lab.score_model import ScoreModel
from diffusion_lab.utils import append_dims

TIME_SAMPLING = ("sequential", "uniform")
WEIGHTINGS = ("eq24", "variance")


@dataclasses.dataclass(frozen=True)
class ScoreEmbeddingLoss:
    """E_t 1/(2 g(t)^2) || lambda(t) s_theta(x^n + lambda(t) z, t) + z ||^2 (eq. 24).

    x^n is the embedded image at t = n / N (``FPEmbeddingProcess``) of each example's image, whose
    index the model carries (an :class:`ImageScoreModel`, which the method builds from the
    batch), lambda(t) the base SDE's sigma(t) (the process's ``std``). Times as Alg. 2 visits
    them (``sequential``: training step ``step`` uses n = step mod N + 1 for the whole batch, so
    that each N steps sweep n = 1..N once, and a resumed run continues the sweep where it
    stopped; the method builds each step's loss with :meth:`at_step`), or ``uniform``:
    n ~ U{1..N} per example. ``weighting``: ``eq24`` as printed, 1 / (2 g(t)^2); ``variance``:
    1/2, i.e. the framework's variance-weighted DSM (lambda = sigma^2) on the embedded image.
    With grad m = 0 and f = 0 the table is x^0 itself, and eq. 24 is that DSM divided by g(t)^2,
    example by example (a test). Summed over dimensions, averaged over the batch.
    """

    time_sampling: str = "sequential"
    weighting: str = "eq24"
    step: int = 0

    def __post_init__(self) -> None:
        if self.time_sampling not in TIME_SAMPLING:
            raise ConfigError(
                f"loss.time_sampling must be one of {TIME_SAMPLING}, got {self.time_sampling!r}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"loss.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")

    def at_step(self, step: int) -> ScoreEmbeddingLoss:
        """This loss at training step ``step`` (the level of Alg. 2's sweep)."""
        return dataclasses.replace(self, step=step)

    def times(
        self, process: FPEmbeddingProcess, batch_size: int, device: torch.device | str
    ) -> torch.Tensor:
        """The training times of :attr:`step`: grid times n / N, n in 1..N."""
        levels = process.fixed_table("level_times", device)
        if self.time_sampling == "sequential":
            return levels[self.step % len(levels)].expand(batch_size)
        return levels[torch.randint(len(levels), (batch_size,), device=device)]

    def per_example(
        self, model: ImageScoreModel, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The summand of eq. 24 for each example (B,) of the model's images at times t."""
        process = model.process
        xt = process.perturb(model.index, t, noise)
        sigma = append_dims(process.std(t), noise.ndim)
        dsm = 0.5 * (sigma * model.score(xt, t) + noise).pow(2).flatten(1).sum(1)
        if self.weighting == "variance":
            return dsm
        g = process.sde(noise, t)[1]
        return dsm / g.pow(2)

    def __call__(self, model: ScoreModel, x0: torch.Tensor) -> torch.Tensor:
        if not isinstance(model, ImageScoreModel):
            raise ConfigError(
                "loss=score_embedding needs method=fp_embedding (with process=fp_embedding): "
                "it reads each example's image index from the batch"
            )
        t = self.times(model.process, x0.shape[0], x0.device)
        return self.per_example(model, t, torch.randn_like(x0)).mean()
