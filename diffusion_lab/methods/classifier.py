"""Training a time-dependent classifier p_t(y | x(t)) for class-conditional sampling.

Khungurn sec. 7.4.1: from a labelled example (x(0), y), draw t ~ U(eps, 1) and x(t) ~ p_t(x(t) |
x(0)) = N(alpha(t) x(0), sigma(t)^2 I) by the forward process, and minimise the cross-entropy of y
given (x(t), t): a mixture of cross-entropies over time (Song et al. 2021 App. I.1). The trained
classifier drives ``samplers.guidance.guided_score``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.config_types import OpenUnitFloat
from diffusion_lab.methods.training import TrainingModule
from diffusion_lab.processes.base import ForwardProcess
from diffusion_lab.utils import batch_time


class TimeDependentClassifier(nn.Module):
    """A classifier network plus the process that says what its time input means.

    ``forward(x, t) -> logits``, the network called as ``network(x, process.noise_label(t))``
    (as ``ScoreModel`` calls a score network), so that it pairs with a score model of the same
    process; a ``classifier(x, t)`` callable for ``guided_score``.
    """

    def __init__(self, network: nn.Module, process: ForwardProcess) -> None:
        super().__init__()
        self.network = network
        self.process = process

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = batch_time(t, x)
        return self.network(x, self.process.noise_label(t).to(x.dtype))


class NoisyClassifierMethod(TrainingModule):
    """Cross-entropy training of a noisy classifier on x(t) = alpha(t) x0 + sigma(t) z.

    Same construction and base (``TrainingModule``) as ``DiffusionMethod`` (``build.build_method``
    builds both): data map from ``data_range`` to ``model_range`` (that of the score model it
    will guide); the optimiser partial with a linear warm-up over ``warmup_steps``. It has no
    sampler or loss part (``build_method`` builds only what a constructor declares), and its
    metrics are its own (``train/acc``, ``val/acc`` over t ~ U(eps, 1), and ``val/acc_low_noise``
    at t = eps). Set ``final_samples: 0`` in the run config, as the experiment
    ``noisy_classifier_digits`` does, since there is nothing to sample.

    Validation draws its times and noise from a generator seeded by ``sample_seed`` and the batch
    index: the metrics are comparable between validations and the global RNG (training's stream,
    saved in checkpoints for exact resumes) is left alone.
    """

    def __init__(
        self,
        network: nn.Module,
        process: ForwardProcess,
        optimizer: Callable[..., torch.optim.Optimizer],
        data_range: Sequence[float] | None = (0.0, 1.0),
        model_range: Sequence[float] | None = (-1.0, 1.0),
        eps: OpenUnitFloat = 1e-5,
        warmup_steps: int = 0,
        sample_seed: int = 0,
        run_config: dict | None = None,
    ) -> None:
        super().__init__(optimizer, data_range, model_range, warmup_steps, run_config)
        self.model = TimeDependentClassifier(network, process)
        self.process = process
        self.eps = eps
        self.sample_seed = sample_seed

    def classifier_fn(self) -> TimeDependentClassifier:
        """The ``classifier(x, t) -> logits`` callable (x in model range) for ``guided_score``."""
        return self.model

    def noisy_loss(
        self,
        batch: Any,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy and accuracy on x(t), t ~ U(eps, 1) unless given."""
        x0, labels = batch
        x0 = self.to_model_range(x0)
        n = x0.shape[0]
        if t is None:
            u = torch.rand(n, generator=generator, device=x0.device, dtype=x0.dtype)
            t = self.eps + (1.0 - self.eps) * u
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        logits = self.model(self.process.sample_marginal(x0, t, noise), t)
        loss = F.cross_entropy(logits, labels)
        return loss, (logits.argmax(1) == labels).float().mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, acc = self.noisy_loss(batch)
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/acc", acc, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        device = batch[0].device
        generator = torch.Generator(device=device).manual_seed(self.sample_seed + batch_idx)
        loss, acc = self.noisy_loss(batch, generator)
        low_t = torch.full((batch[0].shape[0],), self.eps, device=device)
        _, acc_low = self.noisy_loss(batch, generator, low_t)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True)
        self.log("val/acc", acc, on_epoch=True, sync_dist=True, prog_bar=True)
        self.log("val/acc_low_noise", acc_low, on_epoch=True, sync_dist=True)
        return loss
