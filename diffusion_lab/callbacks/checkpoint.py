"""Checkpoints that survive a kill: atomic writes, and ``last.ckpt`` written on interrupt."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO


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


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C or SIGTERM, save ``last.ckpt`` so that no work is lost.

    Only interrupts are caught: a diverged (NaN) run keeps its last good ``last.ckpt``. A checkpoint
    written mid-epoch resumes at the next epoch (Lightning's loaders are not stateful); the
    cadence checkpoints, written at epoch ends, resume exactly.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit":
            self.dirpath.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(self.dirpath / "last.ckpt")
