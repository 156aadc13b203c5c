"""The LightningModule every method family shares: training, EMA sampling, metrics, guards."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from diffusion_lab.callbacks.checkpoint import LastCheckpoint
from diffusion_lab.errors import ConfigError, TrainingDivergedError
from diffusion_lab.processes.base import ForwardProcess
from diffusion_lab.samplers.base import SampleResult
from diffusion_lab.score_model import ScoreModel

Loss = Callable[[ScoreModel, torch.Tensor], torch.Tensor]
Sampler = Callable[..., SampleResult]
Evaluator = Callable[[torch.Tensor, Any], dict[str, float]]


class DiffusionMethod(L.LightningModule):
    """A process, a network (through its parameterisation), a loss and a sampler.

    Data arrive in ``data_range`` (DataModules yield [0, 1] images) and are mapped affinely to
    ``model_range`` (DDPM trains on [-1, 1]); ``None`` leaves them as they are (2-D points).
    Optimiser: the given partial (Adam by default) with a linear learning-rate warm-up over
    ``warmup_steps`` (Ho et al. App. B: 5000 steps); gradient clipping is the Trainer's
    ``gradient_clip_val``. ``dequantize`` adds uniform noise within each 8-bit bin to the training
    data, x 255/256 + U/256 (NCSN's released code; PITFALLS). Sampling starts from the process's
    prior (``process.prior_sampling``: NCSN's U[0, 1]^D is the VE process's ``prior: uniform``)
    and the sampler receives the model itself (``ScoreModel``: a score callable with
    ``denoised``). A process that estimates something from the training data (``process.fit``)
    is fitted once at the start of a fresh run and restored from checkpoints otherwise. At each
    validation the EMA weights (swapped in by the EMA callback) draw ``num_eval_samples``
    samples, which ``evaluator`` scores against held-out data.
    """

    def __init__(
        self,
        network: nn.Module,
        process: ForwardProcess,
        loss: Loss,
        sampler: Sampler,
        optimizer: Callable[..., torch.optim.Optimizer],
        parameterization: str = "eps",
        data_range: Sequence[float] | None = (0.0, 1.0),
        model_range: Sequence[float] | None = (-1.0, 1.0),
        warmup_steps: int = 0,
        num_eval_samples: int = 256,
        sample_seed: int = 0,
        dequantize: bool = False,
        evaluator: Evaluator | None = None,
        run_config: dict | None = None,
    ) -> None:
        super().__init__()
        if warmup_steps < 0:
            raise ConfigError(f"method.warmup_steps must be >= 0, got {warmup_steps}")
        if num_eval_samples < 0:
            raise ConfigError(f"method.num_eval_samples must be >= 0, got {num_eval_samples}")
        if (data_range is None) != (model_range is None):
            raise ConfigError("give both data_range and model_range, or neither (for raw points)")
        # Only primitives are saved, so checkpoints load with weights_only=True (DESIGN.md).
        self.save_hyperparameters({"run_config": run_config or {}})
        self.model = ScoreModel(network, process, parameterization)
        self.process = process
        self.loss_fn = loss
        self.sampler = sampler
        self.optimizer_factory = optimizer
        self.data_range = tuple(data_range) if data_range is not None else None
        self.model_range = tuple(model_range) if model_range is not None else None
        self.warmup_steps = warmup_steps
        self.num_eval_samples = num_eval_samples
        self.sample_seed = sample_seed
        self.dequantize = dequantize
        self.evaluator = evaluator
        self.last_samples: torch.Tensor | None = None
        self.last_nfe: int | None = None

    # ------------------------------------------------------------------ ranges
    def to_model_range(self, x: torch.Tensor) -> torch.Tensor:
        """Map data from ``data_range`` to ``model_range``."""
        if self.data_range is None:
            return x
        (lo, hi), (mlo, mhi) = self.data_range, self.model_range
        return (x - lo) / (hi - lo) * (mhi - mlo) + mlo

    def to_data_range(self, x: torch.Tensor) -> torch.Tensor:
        """Map model outputs back to ``data_range``, clamped to it."""
        if self.data_range is None:
            return x
        (lo, hi), (mlo, mhi) = self.data_range, self.model_range
        return ((x - mlo) / (mhi - mlo) * (hi - lo) + lo).clamp(lo, hi)

    # ---------------------------------------------------------------- training
    def score_fn(self) -> ScoreModel:
        """The learned model in model range, for any sampler: ``score(x, t)`` when called, and
        ``denoised(x, t)``."""
        return self.model

    def on_fit_start(self) -> None:
        """Fit the process to the training data on a fresh run (a resumed one restored it)."""
        if self.process.needs_fit and self.trainer.ckpt_path is None:
            dataset = self.trainer.datamodule.dataset("train")
            items = [dataset[i] for i in range(len(dataset))]
            x = torch.stack(
                [item[0] if isinstance(item, (list, tuple)) else item for item in items]
            )
            self.process.fit(self.to_model_range(x).to(self.device))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if self.dequantize:
            x = x * 255 / 256 + torch.rand_like(x) / 256
        x = self.to_model_range(x)
        loss = self.loss_fn(self.model, x)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"loss is {loss.item()} at step {self.global_step}: lower the learning rate or "
                f"check the data; resume from the last good checkpoint "
                f"({self._last_checkpoint_hint()}) with ckpt_path=last"
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _last_checkpoint_hint(self) -> str:
        paths = [cb.last_path for cb in self.trainer.callbacks if isinstance(cb, LastCheckpoint)]
        existing = [str(p) for p in paths if p.is_file()]
        return existing[0] if existing else "none written yet"

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self.to_model_range(batch[0] if isinstance(batch, (list, tuple)) else batch)
        loss = self.loss_fn(self.model, x)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        if self.num_eval_samples == 0 or self.trainer.sanity_checking:
            return
        samples, nfe = self.generate(self.num_eval_samples)
        self.last_samples, self.last_nfe = samples, nfe
        self.log("sample/nfe", float(nfe), rank_zero_only=True)
        if self.evaluator is not None:
            for name, value in self.evaluator(samples, self.trainer.datamodule).items():
                self.log(f"metrics/{name}", value, rank_zero_only=True)

    @torch.no_grad()
    def generate(
        self, num_samples: int, sample_shape: Sequence[int] | None = None, **sampler_options: Any
    ) -> tuple[torch.Tensor, int]:
        """Draw samples in data range with the current weights; returns (samples, NFE).

        Seeded by ``sample_seed``: the same weights give the same samples on the same device.
        """
        shape = (num_samples, *(sample_shape or self.sample_shape()))
        generator = torch.Generator(device=self.device).manual_seed(self.sample_seed)
        x_init = self.process.prior_sampling(shape, generator=generator, device=self.device)
        was_training = self.training
        self.eval()
        result = self.sampler(
            self.model, self.process, x_init, generator=generator, **sampler_options
        )
        self.train(was_training)
        return self.to_data_range(result.samples), result.nfe

    def sample_shape(self) -> tuple[int, ...]:
        """(C, H, W) or (D,) of one example, from the attached DataModule."""
        datamodule = self.trainer.datamodule
        if datamodule.image_size is None:
            return (datamodule.channels,)
        return (datamodule.channels, datamodule.image_size, datamodule.image_size)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the global RNG state (noise and time draws), so resuming is exact."""
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(self.model.network.parameters())
        warmup = self.warmup_steps

        def warmup_factor(step: int) -> float:
            return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
