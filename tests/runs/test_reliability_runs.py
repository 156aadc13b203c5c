"""Reliability end to end on the DEFAULT trainer and network (trainer=cpu, unet_small): exact
resume after a kill at an epoch end and mid-epoch, and the loggers' rows kept (issue 9)."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli
from helpers.runs import checkpoint_step, last_logged_step, wait_for

# The reproduction: 12 steps per epoch (1437 digits, batch 128), no validation (every 40);
# a logged row at every step, the event a mid-epoch kill waits for (logging changes no weight).
DEFAULT = ["trainer=cpu", "trainer.max_steps=36", "seed=123", "final_samples=16",
           "sampler.steps=5", "sampler.progress=false", "trainer.enable_progress_bar=false",
           "trainer.log_every_n_steps=1"]  # fmt: skip


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "diffusion_lab.run", *DEFAULT, *overrides,
            f"hydra.run.dir={run_dir}"]  # fmt: skip


def run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return cli.run(command(run_dir, *overrides), capture_output=True, text=True,
                   timeout=600, env=os.environ.copy())  # fmt: skip


def kill_at(run_dir: Path, where: str) -> int:
    """SIGKILL a run at once after its first epoch-end last.ckpt (step 12) is written ("epoch
    end"), or once logs/metrics.csv shows a step past it ("mid-epoch"); the step of the
    checkpoint the kill left. Waits for those events, not for a time (a loaded machine)."""
    process = cli.Popen(command(run_dir), stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)  # fmt: skip
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    wait_for(lambda: checkpoint_step(ckpt), "the first epoch-end checkpoint", process)
    if where == "mid-epoch":
        wait_for(lambda: last_logged_step(run_dir) > 12, "a logged step past step 12", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return checkpoint_step(ckpt)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def logged_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row["train/loss"]]


@pytest.mark.parametrize("where", ["epoch end", "mid-epoch"])
def test_resume_on_the_default_config_is_exact(uninterrupted, tmp_path, where):
    """Killed at once after the step-12 epoch-end checkpoint, or a few steps later (resumed from
    that checkpoint): final weights (EMA and raw), samples and Lightning's metrics.csv equal those
    of the uninterrupted run. Before the fix the weights differed by up to 0.004."""
    killed_at = kill_at(tmp_path, where)
    assert killed_at == 12, where
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


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """Disk full during torch.save: the temporary file is removed, last.ckpt kept, one error."""
    from diffusion_lab.callbacks.checkpoint import AtomicCheckpointIO
    from diffusion_lab.errors import CheckpointError

    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    io.save_checkpoint({"global_step": 1}, path)

    def full_disk(obj, f, *args, **kwargs):  # half the file written, then the disk is full
        (path.parent / ".last.ckpt.tmp").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as caught:
        io.save_checkpoint({"global_step": 2}, path)
    message = str(caught.value)
    assert "No space left" in message and "previous one is kept" in message
    assert "ckpt_path=last" in message and "\n" not in message
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_no_room_for_a_checkpoint_stops_before_training(tmp_path, monkeypatch):
    from collections import namedtuple

    from diffusion_lab.callbacks.checkpoint import LastCheckpoint
    from diffusion_lab.errors import CheckpointError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    network = torch.nn.Linear(100, 100)  # 10,100 float32: about 0.15 MiB with EMA and Adam
    with pytest.raises(CheckpointError, match="MiB free but a checkpoint needs about 0.2 MiB"):
        LastCheckpoint(tmp_path / "checkpoints").on_fit_start(None, network)


def test_a_sampler_raising_mid_validation_saves_the_last_step_and_says_how_to_resume(tmp_path):
    """The validation at the end of epoch 2 runs a sampler that raises (scipy refuses the ODE
    solver's name, which no check before training reads): last.ckpt holds step 24 (the raw
    weights, EMA swapped back), and one line names it and the resume command."""
    result = run(tmp_path, "trainer.max_steps=36", "trainer.check_val_every_n_epoch=2",
                 "+trainer.limit_val_batches=1", "method.num_eval_samples=4", "sampler=ode",
                 "sampler.steps=null", "sampler.method=NoSuchSolver")  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "diffusion_lab: error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"hydra.run.dir={tmp_path} ckpt_path=last" in lines[0]
    assert (tmp_path / "error.log").is_file()
    checkpoint = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 24
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
