"""Reliability end to end on the DEFAULT trainer and network (trainer=cpu, unet_small): exact
resume after a kill at an epoch end and mid-epoch, and the loggers' rows kept (issue 9)."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# The reproduction: 12 steps per epoch (1437 digits, batch 128), no validation (every 40).
DEFAULT = ["trainer=cpu", "trainer.max_steps=36", "seed=123", "final_samples=16",
           "sampler.steps=5", "sampler.progress=false", "trainer.enable_progress_bar=false"]  # fmt: skip


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "diffusion_lab.run", *DEFAULT, *overrides,
            f"hydra.run.dir={run_dir}"]  # fmt: skip


def run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, *overrides), capture_output=True, text=True,
                          timeout=600, env=os.environ.copy())  # fmt: skip


def kill_after_first_checkpoint(run_dir: Path, delay: float) -> int:
    """SIGKILL a run ``delay`` seconds after its first last.ckpt appears; its step."""
    process = subprocess.Popen(command(run_dir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return torch.load(ckpt, weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def logged_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row["train/loss"]]


@pytest.mark.parametrize("where, delay", [("epoch end", 0.0), ("mid-epoch", 1.5)])
def test_resume_on_the_default_config_is_exact(uninterrupted, tmp_path, where, delay):
    """Killed at once after the step-12 epoch-end checkpoint, or a few steps later (resumed from
    that checkpoint): final weights (EMA and raw), samples and Lightning's metrics.csv equal those
    of the uninterrupted run. Before the fix the weights differed by up to 0.004."""
    killed_at = kill_after_first_checkpoint(tmp_path, delay)
    assert killed_at in (12, 24), where
    result = run(tmp_path, "ckpt_path=last")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)
    reference = torch.load(uninterrupted / "checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == reference["global_step"] == 36
    for key in ("state_dict", "current_model_state"):
        assert resumed[key].keys() == reference[key].keys()
        for name in reference[key]:
            assert torch.equal(resumed[key][name], reference[key][name]), (key, name)
    samples = torch.load(tmp_path / "samples.pt", weights_only=True)
    assert torch.equal(samples, torch.load(uninterrupted / "samples.pt", weights_only=True))
    assert logged_steps(tmp_path) == logged_steps(uninterrupted)  # rows before the kill kept
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
