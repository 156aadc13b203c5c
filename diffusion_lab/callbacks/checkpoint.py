"""Checkpoints that survive a kill: atomic writes; ``last.ckpt`` at a cadence and on interrupt."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion_lab.callbacks.ema import WarmupEMA
from diffusion_lab.errors import CheckpointError, ConfigError, DiffusionLabError

# weights, their EMA copy and Adam's two moments
COPIES_IN_A_CHECKPOINT = 4


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file, then rename it into place.

    A kill during the write leaves the previous checkpoint intact, never a truncated one; a
    failed write (e.g. a full disk) removes the temporary file and stops with one line.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
            tmp.unlink(missing_ok=True)
            kept = "the previous one is kept" if path.is_file() else "none was written before"
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(
                f"cannot write checkpoint {path} ({reason}); {kept}: free disk space in "
                f"{path.parent} (or set hydra.run.dir elsewhere) and resume with "
                f"hydra.run.dir={path.parent.parent} ckpt_path=last"
            ) from None


class LastCheckpoint(L.Callback):
    """``last.ckpt`` at a cadence of epochs, at the end of training, and on Ctrl-C / SIGTERM.

    Cadence checkpoints are written at epoch ends, so ``ckpt_path=last`` resumes them exactly
    (the shuffle stream and RNG are in the checkpoint). On Ctrl-C / SIGTERM and on an unexpected
    exception in training or validation (a sampler raising, say), ``last.ckpt`` is written with
    the weights of the last completed optimizer step (the EMA weights a validation swapped in
    are put back first); such a mid-epoch checkpoint saves the work but resumes at the next
    epoch (Lightning's loaders are not stateful), so it is not bit-exact. A diverged (NaN) run
    keeps its last good epoch-end ``last.ckpt``: the weights of the step before the NaN may
    already be ruined. A failed write or another project error writes nothing more. Before
    training, the folder must have room for a checkpoint. Resuming is never automatic: it takes
    ``ckpt_path=last`` (Lightning #19827).
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

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop before training when the folder cannot hold a checkpoint (estimated as the
        parameters x their bytes x weights, EMA and Adam's two moments)."""
        need = COPIES_IN_A_CHECKPOINT * sum(
            p.numel() * p.element_size() for p in pl_module.parameters()
        )
        folder = next(p for p in (self.dirpath, *self.dirpath.parents) if p.exists())
        free = shutil.disk_usage(folder).free
        if free < need:
            raise CheckpointError(
                f"{folder} has {free / 2**20:.1f} MiB free but a checkpoint needs about "
                f"{need / 2**20:.1f} MiB: free disk space or set hydra.run.dir elsewhere"
            )

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
        if trainer.state.fn != "fit" or isinstance(exception, DiffusionLabError):
            return
        for callback in trainer.callbacks:
            if isinstance(callback, WarmupEMA):
                callback.restore_training_weights(pl_module)
        self._save(trainer)
