"""What every LightningModule of the project shares: range maps, optimiser, checkpoints, guard."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from diffusion_lab.errors import ConfigError, TrainingDivergedError

log = logging.getLogger("diffusion_lab")


class TrainingModule(L.LightningModule):
    """Base of the methods: a subclass sets ``self.model``, whose ``network`` is trained.

    Data arrive in ``data_range`` (DataModules yield [0, 1] images) and are mapped affinely to
    ``model_range`` (DDPM trains on [-1, 1]); ``None`` for both leaves them as they are (2-D
    points). Optimiser: the given partial with a linear learning-rate warm-up over
    ``warmup_steps``; a resumed run trains at its own configured learning rate, not the
    checkpoint's (:meth:`apply_configured_learning_rates`). Checkpoints keep the global RNG
    states, so that resuming is exact; each DDP rank draws its own noise (:meth:`seed_this_rank`).
    Only primitives are saved as hyper-parameters (``run_config``), so checkpoints load with
    ``weights_only=True``.
    """

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        data_range: Sequence[float] | None,
        model_range: Sequence[float] | None,
        warmup_steps: int,
        run_config: dict | None,
    ) -> None:
        super().__init__()
        if warmup_steps < 0:
            raise ConfigError(f"method.warmup_steps must be >= 0, got {warmup_steps}")
        if (data_range is None) != (model_range is None):
            raise ConfigError("give both data_range and model_range, or neither (for raw points)")
        self.save_hyperparameters({"run_config": run_config or {}})
        self.optimizer_factory = optimizer
        self.data_range = tuple(data_range) if data_range is not None else None
        self.model_range = tuple(model_range) if model_range is not None else None
        self.warmup_steps = warmup_steps
        self.configured_lrs: list[float] = []  # per param group, set by configure_optimizers
        # (step, loss) of the first non-finite loss on the loss's device, step -1 while none
        self._divergence: torch.Tensor | None = None

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

    def check_finite(self, loss: torch.Tensor) -> None:
        """Note the first NaN or infinite loss (its step and value) on the loss's device, with
        no host sync: every ``trainer.log_every_n_steps`` steps, before a checkpoint is written,
        before validation samples are drawn and when training ends, :meth:`stop_if_diverged`
        reads it (one sync) and stops the run naming that step. Reading it every step made the
        host wait for the device at every step."""
        loss = loss.detach().float()  # float32 holds every step number up to 2**24 exactly
        if self._divergence is None or self._divergence.device != loss.device:
            self._divergence = loss.new_tensor([-1.0, 0.0])
        step = loss.new_full((), float(self.global_step))
        first = ~torch.isfinite(loss) & (self._divergence[0] < 0)
        self._divergence = torch.where(first, torch.stack([step, loss]), self._divergence)
        trainer = self._trainer
        if trainer is not None and (self.global_step + 1) % trainer.log_every_n_steps == 0:
            self.stop_if_diverged()

    def stop_if_diverged(self) -> None:
        """Raise :class:`TrainingDivergedError` naming the first step whose loss was NaN or
        infinite, if any (``run.py`` adds the path of the last checkpoint, which only it
        knows)."""
        if self._divergence is None:
            return
        step, value = self._divergence.tolist()
        if step >= 0:
            raise TrainingDivergedError(
                f"loss is {value} at step {int(step)}: lower the learning rate "
                "(optimizer.lr) or check the data; resume from the last good checkpoint with "
                "ckpt_path=last and the lower optimizer.lr (a resumed run trains at its own)"
            )

    def on_train_end(self) -> None:
        self.stop_if_diverged()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """Skip a batch past the end of the epoch (-1 ends the epoch), which Lightning 2.6 draws
        when it resumes from a checkpoint written at an epoch end where no validation was due
        (``trainer=cpu`` validates every 40 epochs). With ``max_steps`` set, its fit loop always
        restarts "on epoch end" and its epoch loop, waiting for a validation that never comes,
        fetches one more batch (index ``num_training_batches``, from the next epoch's
        permutation) and trains on it: the batch was trained twice, every later epoch shifted by
        one step and the noise stream by one draw, so the resumed weights differed.
        Lightning still steps the LR scheduler for the skipped batch: see the warm-up below.
        With a validation due, Lightning skips that batch itself, which is why a tiny config
        with validation every epoch resumed exactly."""
        if batch_idx >= self.trainer.num_training_batches:
            return -1
        return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the global RNG states (noise and time draws: the CPU generator's, and every
        CUDA device's once CUDA is in use), so resuming is exact. A diverged run stops here
        instead: its weights are not written over the last good checkpoint."""
        self.stop_if_diverged()
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        if torch.cuda.is_initialized():
            checkpoint["cuda_rng_states"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
        cuda_states = checkpoint.get("cuda_rng_states")
        if cuda_states and torch.cuda.is_available():
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
            else:  # another machine: the CPU stream is exact, the device streams are new
                log.info(
                    "the checkpoint kept %d CUDA noise streams, this machine has %d: new ones",
                    len(cuda_states),
                    torch.cuda.device_count(),
                )

    def on_train_start(self) -> None:
        """Lightning has restored the optimiser, scheduler and RNG of a resumed run by now."""
        self.seed_this_rank()
        self.apply_configured_learning_rates()

    def seed_this_rank(self) -> None:
        """Give each DDP rank its own noise stream. Every rank starts from the run's seed (so
        all build the same initial weights) and would otherwise draw the same t and z for its
        own part of the data. One draw of that shared stream, mixed with the rank by numpy's
        SeedSequence, seeds each rank; a single process keeps its stream untouched."""
        if self.trainer.world_size == 1:
            return
        shared = int(torch.randint(2**62, (1,)))
        mixed = np.random.SeedSequence([shared, self.trainer.global_rank]).generate_state(2)
        torch.manual_seed(int(mixed[0]) << 32 | int(mixed[1]))

    def apply_configured_learning_rates(self) -> None:
        """Give a resumed run the learning rate of its config: the restored optimiser and
        scheduler state keep the checkpoint's (``initial_lr``, ``lr``, ``base_lrs``), so
        ``optimizer.lr=1e-4`` after a divergence at 1e3 was ignored. Where a param group's base
        rate differs from the configured one, the base rates take the configured value and the
        current rate keeps its place in the schedule (the warm-up factor); Adam's moments are
        kept. One info line says so; an unchanged rate changes nothing (exact resume)."""
        changed = []
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            groups = scheduler.optimizer.param_groups
            for k, (group, wanted) in enumerate(zip(groups, self.configured_lrs)):
                base = group.get("initial_lr", group["lr"])
                if base == wanted:
                    continue
                group["lr"] = group["lr"] * wanted / base if base else wanted
                group["initial_lr"] = scheduler.base_lrs[k] = wanted
                changed.append((k, base, wanted))
            if changed:
                scheduler._last_lr = [group["lr"] for group in groups]
        if changed and self.trainer.is_global_zero:
            log.info(
                "learning rate from this run's config, not the checkpoint's: %s (Adam's moments "
                "kept)",
                ", ".join(f"param group {k}: {new:g} (was {old:g})" for k, old, new in changed),
            )

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(self.model.network.parameters())
        self.configured_lrs = [group["lr"] for group in optimizer.param_groups]
        warmup = self.warmup_steps

        def warmup_factor(_: int) -> float:
            """(k + 1) / warmup at optimizer step k, read from the trainer's optimizer-step count,
            not from the scheduler's own counter: Lightning also steps the scheduler for the
            batch that :meth:`on_train_batch_start` skips on resume, which put the resumed
            learning rate one step ahead."""
            return 1.0 if warmup == 0 else min(1.0, (self.global_step + 1) / warmup)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
