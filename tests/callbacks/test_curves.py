"""Metric curves (diffusion_lab.callbacks.curves): the training loss is kept every
train_every_n_steps steps without a host sync, read back at validation, saved and written."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import torch
from helpers.syncs import count_host_syncs

from diffusion_lab.callbacks.curves import MetricCurves


def fake_trainer(step: int, metrics: dict) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, callback_metrics=metrics, sanity_checking=False,
                           is_global_zero=True)  # fmt: skip


def test_the_training_loss_is_kept_without_a_host_sync_and_read_at_validation(
    tmp_path, monkeypatch
):
    """It was read back (float) every 10th step: a host sync each time on a GPU."""
    curves = MetricCurves(tmp_path, train_every_n_steps=10)
    losses = {step: torch.tensor(1.0 / (step + 1)) for step in range(31)}
    syncs = count_host_syncs(monkeypatch)
    for step in range(31):
        curves.on_train_batch_end(fake_trainer(step, {"train/loss": losses[step]}), None, None,
                                  None, step)  # fmt: skip
    assert syncs == []
    monkeypatch.undo()
    validated = {"train/loss": losses[30], "val/loss": torch.tensor(0.25)}
    curves.on_validation_epoch_end(fake_trainer(30, validated), None)
    expected = [(step, float(losses[step])) for step in (0, 10, 20, 30)]
    assert curves.history["train/loss"] == expected
    assert curves.history["val/loss"] == [(30, 0.25)]
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = [(int(r["step"]), float(r["value"])) for r in rows if r["name"] == "train/loss"]
    assert train == expected
    assert (tmp_path / "curves.png").is_file()


def test_the_history_survives_a_checkpoint_with_losses_not_yet_read(tmp_path):
    curves = MetricCurves(tmp_path, train_every_n_steps=1)
    for step in range(3):
        curves.on_train_batch_end(fake_trainer(step, {"train/loss": torch.tensor(float(step))}),
                                  None, None, None, step)  # fmt: skip
    restored = MetricCurves(tmp_path)
    restored.load_state_dict(curves.state_dict())
    assert restored.history["train/loss"] == [(0, 0.0), (1, 1.0), (2, 2.0)]
