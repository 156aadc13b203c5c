"""The FP score embedding loss (Na, Gao, Wan 2024 eq. 24, Alg. 2)."""

from __future__ import annotations

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.losses.dsm import DenoisingScoreMatching
from diffusion_lab.processes.fp_embedding import FPEmbeddingProcess
from diffusion_lab.score_model import ScoreModel

TIME_SAMPLING = ("sequential", "uniform")
WEIGHTINGS = ("eq24", "variance")


class ScoreEmbeddingLoss:
    """E_t 1/(2 g(t)^2) || lambda(t) s_theta(x^n + lambda(t) z, t) + z ||^2 (eq. 24).

    x^n is the embedded image at t = n / N (``FPEmbeddingProcess``), lambda(t) the base SDE's
    sigma(t) (the process's ``std``). Times as Alg. 2 visits them (``sequential``: training step
    k uses n = k mod N + 1 for the whole batch, so that each N steps sweep n = 1..N once, and a
    resumed run continues the sweep where it stopped), or ``uniform``: n ~ U{1..N} per example.
    ``weighting``: ``eq24`` as printed, 1 / (2 g(t)^2); ``variance``: 1/2, i.e. the framework's
    variance-weighted DSM (lambda = sigma^2) on the embedded image. With grad m = 0 and f = 0 the
    table is x^0 itself, and eq. 24 is that DSM divided by g(t)^2, example by example (a test).
    Summed over dimensions, averaged over the batch.
    """

    def __init__(self, time_sampling: str = "sequential", weighting: str = "eq24") -> None:
        if time_sampling not in TIME_SAMPLING:
            raise ConfigError(
                f"loss.time_sampling must be one of {TIME_SAMPLING}, got {time_sampling!r}"
            )
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"loss.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.time_sampling = time_sampling
        self.weighting = weighting

    def times(
        self, process: FPEmbeddingProcess, batch_size: int, step: int, device
    ) -> torch.Tensor:
        """The training times of one step: grid times n / N, n in 1..N."""
        levels = process.level_times().to(device)
        if self.time_sampling == "sequential":
            return levels[step % len(levels)].expand(batch_size)
        return levels[torch.randint(len(levels), (batch_size,), device=device)]

    def per_example(
        self, model: ScoreModel, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The summand of eq. 24 for each example (B,)."""
        dsm = DenoisingScoreMatching.variance_weighted(model, x0, t, noise)
        if self.weighting == "variance":
            return dsm
        g = model.process.sde(x0, t)[1]
        return dsm / g.pow(2)

    def __call__(self, model: ScoreModel, x0: torch.Tensor, step: int = 0) -> torch.Tensor:
        if not isinstance(model.process, FPEmbeddingProcess):
            raise ConfigError("loss=score_embedding needs process=fp_embedding")
        t = self.times(model.process, x0.shape[0], step, x0.device)
        return self.per_example(model, x0, t, torch.randn_like(x0)).mean()
