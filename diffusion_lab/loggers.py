"""Loggers of the project: Lightning's CSV and W&B loggers, made to keep their rows and their run
across a resume."""

from __future__ import annotations

import csv
import secrets
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.build import resolve_checkpoint


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger``; when ``resume_from`` is set (the run's ``ckpt_path``), the rows
    of ``metrics.csv`` logged before the resumed step are kept rather than deleted.

    Lightning's writer deletes an existing ``metrics.csv`` when it opens the folder, so a resumed
    run lost every row before the kill. The rows logged before the checkpoint's step
    are read first and written back ahead of the new ones; those the killed run logged after
    its checkpoint are dropped, since the resumed run logs those steps again. ``resume_from``
    is a checkpoint path or ``last`` (``<save_dir>/checkpoints/last.ckpt``).
    """

    def __init__(self, *args: Any, resume_from: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kept: list[dict[str, str]] | None = None
        path = Path(self.log_dir) / "metrics.csv"
        if resume_from is not None and path.is_file():
            checkpoint = resolve_checkpoint(resume_from, self.save_dir)
            step = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
            rows = csv.DictReader(path.open(newline=""))
            self._kept = [row for row in rows if int(row["step"]) < step["global_step"]]

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._kept is not None:
            self._write_back(self._kept)
        super().log_metrics(metrics, step)

    @rank_zero_only
    def save(self) -> None:
        if self._kept is not None:
            self._write_back(self._kept)
        super().save()

    def _write_back(self, rows: list[dict[str, str]]) -> None:
        """Queue the kept rows ahead of the new ones (once)."""
        self._kept = None
        self.experiment.metrics[:0] = rows


#: The file in a run folder that holds its W&B run id.
WANDB_ID_FILE = "wandb_run_id"


def kept_run_id(run_dir: Path) -> str:
    """The W&B run id of ``run_dir``: made once (8 hex characters, as W&B's own) and kept in the
    folder, so every start in that folder (a resume, a requeued job, each DDP rank) names the
    same W&B run; a new folder is a new run."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


class ResumableWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` with the run folder's kept run id and ``resume="allow"``: a
    resumed run continues its W&B run (its curves go on from the checkpoint's step) instead of
    starting a new one."""

    def __init__(self, save_dir: str, **kwargs: Any) -> None:
        run_id = kept_run_id(Path(save_dir))
        super().__init__(save_dir=save_dir, id=run_id, resume="allow", **kwargs)
