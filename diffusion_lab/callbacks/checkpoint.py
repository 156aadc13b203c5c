"""Checkpoints that survive a kill: atomic writes; ``last.ckpt`` at a cadence and on interrupt."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion_lab.errors import ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file, then rename it into place.

    A kill during the write leaves the previous checkpoint intact, never a truncated one.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class LastCheckpoint(L.Callback):
    """``last.ckpt`` at a cadence of epochs, at the end of training, and on Ctrl-C / SIGTERM.

    Cadence checkpoints are written at epoch ends, so ``ckpt_path=last`` resumes them exactly
    (the shuffle stream and RNG are in the checkpoint). Only interrupts are caught: a diverged
    (NaN) run keeps its last good ``last.ckpt``. A checkpoint written on interrupt mid-epoch saves
    the work but resumes at the next epoch (Lightning's loaders are not stateful), so it is not
    bit-exact. Resuming is never automatic: it takes ``ckpt_path=last`` (Lightning #19827).
    """

    def __init__(self, dirpath: str | Path, every_n_epochs: int = 1) -> None:
        if every_n_epochs < 1:
            raise ConfigError(f"checkpoint every_n_epochs must be >= 1, got {every_n_epochs}")
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.last_path, weights_only=False)  # full state, to resume

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Re-set the shuffle sampler's epoch to ``current_epoch``: after a restore from an
        epoch-end checkpoint, Lightning passes ``set_epoch`` a counter one ahead (2.6), which
        would change the permutation and break exact resume."""
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit":
            self._save(trainer)
