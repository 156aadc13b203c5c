"""Flow matching end to end through ``python -m diffusion_lab.run``: the offline line of
+experiment=flow_matching_cifar10 with the default trainer, trained briefly and sampled by its
own sampler (the adaptive RK45 on the probability flow, from t = 1 where alpha = 0)."""

from __future__ import annotations

import csv
import json
import os
import sys

from helpers import cli

from diffusion_lab.run import offline_overrides


def test_the_offline_line_trains_and_samples_with_the_default_trainer(tmp_path):
    overrides = [*offline_overrides("flow_matching_cifar10").split(), "network.base_channels=8",
                 "trainer.max_steps=120", "method.warmup_steps=10", "method.num_eval_samples=0", "final_samples=16",
                 "sampler.progress=false", "trainer.enable_progress_bar=false",
                 "trainer.log_every_n_steps=10"]  # fmt: skip
    result = cli.run(
        [sys.executable, "-m", "diffusion_lab.run", "+experiment=flow_matching_cifar10",
         *overrides, f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "final_metrics.json").read_text())
    assert metrics["num_samples"] == 16 and metrics["nfe"] > 0
    with open(tmp_path / "metrics.csv") as f:
        losses = [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss"]
    # the flow-matching loss of an untrained network is E||z - x0||^2 per pixel (about 1.7 on
    # digits in [-1, 1]); training lowers it
    assert len(losses) >= 5 and sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
