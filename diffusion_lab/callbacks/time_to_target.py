"""The training time at which a metric first reaches a target (time-to-SSIM, FP paper Tables 1-3)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import lightning as L


class TimeToTarget(L.Callback):
    """Record the training wall-clock time (validation and sampling excluded) and step at which
    ``metric`` first reaches each of ``targets`` (``mode="max"``: >= target; ``"min"``: <=).

    A method's one-time precomputation before training (``pl_module.precompute_seconds``: the
    FP score embedding's solve, Na et al. sec. 4.1 "we add the time it takes to solve the sparse
    systems") is counted in. Logged at every validation as ``time/train_seconds`` (the curves of
    a metric against training time, Fig. 5) and, once reached, ``time_to/{metric}_{target}``
    (seconds); kept in ``self.reached``.
    """

    def __init__(self, metric: str, targets: Sequence[float], mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"TimeToTarget mode must be 'max' or 'min', got {mode!r}")
        self.metric, self.targets, self.mode = metric, list(targets), mode
        self.train_seconds = 0.0
        self.reached: dict[float, tuple[float, int]] = {}
        self._epoch_start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._epoch_start is not None:
            self.train_seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = None

    def seconds(self, pl_module: L.LightningModule) -> float:
        """Training seconds so far, the method's precomputation included."""
        return self.train_seconds + float(getattr(pl_module, "precompute_seconds", 0.0))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the training time first, so that every epoch-end reader (the curves) has it."""
        if not trainer.sanity_checking:
            pl_module.log("time/train_seconds", self.seconds(pl_module))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        seconds = self.seconds(pl_module)
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            return
        for target in self.targets:
            hit = value >= target if self.mode == "max" else value <= target
            if target not in self.reached and bool(hit):
                self.reached[target] = (seconds, trainer.global_step)
                pl_module.log(f"time_to/{self.metric}_{target}", seconds)

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "reached": dict(self.reached)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_seconds = state_dict["train_seconds"]
        self.reached = dict(state_dict["reached"])
