"""FP score embedding as a method (Na, Gao, Wan 2024, Alg. 2): per-image tables, eq. 24."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.methods.base import DiffusionMethod
from diffusion_lab.metrics import image_quality
from diffusion_lab.processes.fp_embedding import FPEmbeddingProcess


class ScoreEmbeddingMethod(DiffusionMethod):
    """A ``DiffusionMethod`` over an ``FPEmbeddingProcess``, trained with eq. 24.

    The process embeds the training images when the run starts (``process.fit``, timed: its
    seconds are :attr:`precompute_seconds`, which ``TimeToTarget`` adds to the training time).
    Each training step tells the process which image each example is (its own time interval
    when ``separate_intervals``) and gives the loss the step number (Alg. 2 sweeps n = 1..N in
    order). Sample b belongs to image b mod K.
    """

    def check_parts(self) -> None:
        if not isinstance(self.process, FPEmbeddingProcess):
            raise ConfigError("method=fp_embedding needs process=fp_embedding")
        if self.dequantize:
            raise ConfigError(
                "method.dequantize must be false for the FP embedding: the tables are per image"
            )

    @property
    def precompute_seconds(self) -> float:
        """Seconds the embedding took to compute (also when it was read from the cache)."""
        seconds = self.process.precompute_seconds
        return float(seconds) if seconds.numel() else 0.0

    def batch_loss(self, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Eq. 24 with each example's image (interval) and the step number (Alg. 2; the
        trainer's global step unless given)."""
        with self.process.intervals(self.process.image_index(x)):
            return self.loss_fn(self.model, x, step=self.global_step if step is None else step)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        """Eq. 24 on the embedded images (the only ones the method serves), once per validation."""
        if batch_idx > 0:
            return None
        loss = self.batch_loss(self.process.images)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True)
        return loss

    def sample_metrics(self, samples: torch.Tensor, datamodule: Any = None) -> dict[str, float]:
        """SSIM (windowed, and the paper's global one of eq. 26-29), PSNR and MSE of each sample
        against its own embedded image (data range), whatever the DataModule's held-out split."""
        own = self.process.images[self.process.sample_images(len(samples))]
        targets = self.to_data_range(own).to(samples)
        names = ("ssim", "global_ssim", "psnr", "mse")
        return {name: getattr(image_quality, name)(samples, targets) for name in names}

    @torch.no_grad()
    def generate(
        self, num_samples: int, sample_shape: Sequence[int] | None = None, **sampler_options: Any
    ) -> tuple[torch.Tensor, int]:
        """Samples of the images in turn (sample b: image b mod K), each in its interval."""
        with self.process.intervals(self.process.sample_images(num_samples).to(self.device)):
            return super().generate(num_samples, sample_shape, **sampler_options)
