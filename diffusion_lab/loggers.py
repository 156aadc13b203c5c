"""Loggers of the project: Lightning's CSV logger, made to keep its rows across a resume."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger``; when ``resume_from`` is set (the run's ``ckpt_path``), the rows
    of ``metrics.csv`` logged before the resumed step are kept rather than deleted.

    Lightning's writer deletes an existing ``metrics.csv`` when it opens the folder, so a resumed
    run lost every row before the kill (issue 9). The earlier rows are read first and written
    back before the first new row, less those at or after the first step the resumed run logs
    (the killed run's steps past its checkpoint, which the resumed run logs again).
    """

    def __init__(self, *args: Any, resume_from: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kept: list[dict[str, str]] | None = None
        if resume_from is not None:
            path = Path(self.log_dir) / "metrics.csv"
            self._kept = list(csv.DictReader(path.open(newline=""))) if path.is_file() else []

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._kept is not None and step is not None:
            self._write_back([row for row in self._kept if int(row["step"]) < step])
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
