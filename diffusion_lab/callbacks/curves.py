"""Metric curves: every logged scalar as CSV and as PNG plots in the run folder."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch


class MetricCurves(L.Callback):
    """Keep (step, value) of every scalar metric after each validation; write CSV and PNG.

    Files: ``metrics.csv`` (long format: step, name, value) and ``curves.png`` (one panel per
    metric). Training loss is taken every ``train_every_n_steps`` steps.
    """

    def __init__(self, dirpath: str | Path, train_every_n_steps: int = 10) -> None:
        self.dirpath = Path(dirpath)
        self.train_every_n_steps = train_every_n_steps
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        # (step, loss tensor) not yet read back: reading each at once waited for the device
        self.pending_losses: list[tuple[int, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (
            trainer.global_step % self.train_every_n_steps == 0
            and "train/loss" in trainer.callback_metrics
        ):
            loss = trainer.callback_metrics["train/loss"].detach()
            self.pending_losses.append((trainer.global_step, loss))

    def read_pending_losses(self) -> None:
        """Move the kept training losses into the history: one read-back for all of them."""
        if not self.pending_losses:
            return
        steps = [step for step, _ in self.pending_losses]
        values = torch.stack([loss.float() for _, loss in self.pending_losses]).tolist()
        self.history["train/loss"].extend(zip(steps, values, strict=True))
        self.pending_losses = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.read_pending_losses()
        for name, value in trainer.callback_metrics.items():
            if name != "train/loss" and value.numel() == 1:
                self.history[name].append((trainer.global_step, float(value)))
        if trainer.is_global_zero:
            self.write()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.read_pending_losses()
        if trainer.is_global_zero:
            self.write()

    def state_dict(self) -> dict:
        self.read_pending_losses()
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = defaultdict(
            list, {k: [tuple(p) for p in v] for k, v in state_dict["history"].items()}
        )

    def write(self) -> None:
        """Write ``metrics.csv`` and ``curves.png``."""
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with open(self.dirpath / "metrics.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "name", "value"])
            for name, points in sorted(self.history.items()):
                writer.writerows((step, name, value) for step, value in points)
        plot_curves(self.history, self.dirpath / "curves.png")


def plot_curves(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """One small panel per metric against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in sorted(history) if history[n]]
    if not names:
        return
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = zip(*history[name])
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        if name.endswith("loss") and min(values) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
