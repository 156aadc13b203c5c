"""The score-matching experiments run end to end with the default trainer (a few steps each)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import cli

RUNS = {
    "implicit, toy2d": ["+experiment=score_matching_toy2d", "loss=ism"],
    "sliced energy model, toy2d": [
        "+experiment=score_matching_toy2d",
        "loss=ssm",
        "network=mlp_energy",
        "method.parameterization=energy_over_sigma",
    ],  # fmt: skip
    "sliced NCSN, digits": ["+experiment=ncsn_ssm_digits"],
}


@pytest.mark.parametrize("name", RUNS)
def test_the_experiment_trains_samples_and_scores(name, tmp_path):
    command = [sys.executable, "-m", "diffusion_lab.run", *RUNS[name], f"hydra.run.dir={tmp_path}",
               "trainer.max_steps=6", "trainer.check_val_every_n_epoch=1000", "final_samples=16",
               "sampler.n_steps_each=2", "trainer.enable_progress_bar=false"]  # fmt: skip
    done = cli.run(command, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "final_metrics.json").read_text())
    assert metrics["num_samples"] == 16
    assert (Path(tmp_path) / "checkpoints" / "last.ckpt").is_file()
