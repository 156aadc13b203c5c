"""How a run stops and how it resumes, end to end through ``python -m diffusion_lab.run`` as a
user runs it (issue 10): NaN samples caught before any metric, a sweep that runs every job and
names the failed ones, Ctrl-C in training and in the final sampling, the stop line last even
with progress bars, a resumed run at a new learning rate, a refused resume that leaves the run
folder as it was. Waits are for events (a checkpoint, a log line), never for a time."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli
from helpers.runs import (
    checkpoint_step,
    error_lines,
    last_line,
    last_logged_step,
    text_of,
    wait_for,
)

# 1437 training digits at batch 64: 23 steps per epoch; a validation every epoch (trainer=debug).
TINY = ["trainer=debug", "network.base_channels=8", "data.batch_size=64",
        "method.num_eval_samples=0", "final_samples=4", "sampler.steps=5"]  # fmt: skip
QUIET = ["sampler.progress=false", "trainer.enable_progress_bar=false"]
BARS = ["sampler.progress=true", "trainer.enable_progress_bar=true"]  # as a user sees a run

# ``python -m diffusion_lab.run`` whose default sampler's samples hold a NaN, as the samples of
# diverged weights do (a real divergence of the samples with a finite loss takes hundreds of
# steps); everything else is the user's path: argv, the checks, Hydra, the run.
NAN_SAMPLES = """
import functools, runpy, sys
import diffusion_lab.samplers.dpm_solver as module
real = module.dpm_solver_pp
@functools.wraps(real)
def nan_samples(*args, **kwargs):
    result = real(*args, **kwargs)
    result.samples[0] = float("nan")
    return result
module.dpm_solver_pp = nan_samples
sys.argv[0] = "diffusion_lab.run"
runpy.run_module("diffusion_lab.run", run_name="__main__", alter_sys=True)
"""


def env() -> dict[str, str]:
    """The test's environment, unbuffered as on a terminal (the bars' lines and the stop
    line arrive in the order they are written)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(*args: str, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m diffusion_lab.run args``, stdout and stderr in one stream as on a terminal."""
    return cli.run([sys.executable, "-m", "diffusion_lab.run", *args], env={**env(), **extra_env},
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                   timeout=timeout)  # fmt: skip


@pytest.fixture
def start():
    """``start(run_dir, *overrides)``: a run in the background, its stdout and stderr going to
    files to be polled; a run still alive when the test ends (a failed wait) is killed."""
    started: list[cli.Popen] = []

    def start_run(run_dir: Path, *overrides: str, **extra_env: str) -> tuple[cli.Popen, Path, Path]:
        out, err = run_dir.parent / f"{run_dir.name}.out", run_dir.parent / f"{run_dir.name}.err"
        command = [sys.executable, "-m", "diffusion_lab.run", *overrides,
                   f"hydra.run.dir={run_dir}"]  # fmt: skip
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = cli.Popen(command, stdout=stdout, stderr=stderr, env={**env(), **extra_env})
        started.append(process)
        return process, out, err

    yield start_run
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def assert_one_stop_line_last(output: str, start_: str) -> str:
    """Exactly one stop line, and it is the last line, on its own (no bar glued before it)."""
    lines = error_lines(output)
    assert len(lines) == 1, output[-3000:]
    assert last_line(output) == lines[0] and lines[0].startswith(start_), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return lines[0]


@pytest.mark.parametrize("where", ["validation", "final"])
def test_nan_samples_stop_before_any_metric_with_one_line_and_the_checkpoint_kept(tmp_path, where):
    """Samples with a NaN at the validation of step 46 (epoch 2) or in the final sampling: exit
    2 with one line, the last one even with the bars on, naming the step; no metric computed
    (FID's solver crashed the process on them, exit 139); the last checkpoint kept."""
    if where == "validation":
        overrides = ["method.num_eval_samples=4", "trainer.check_val_every_n_epoch=2",
                     "trainer.max_steps=60"]  # fmt: skip
    else:
        overrides = ["trainer.max_steps=5"]
    result = cli.run(
        [sys.executable, "-c", NAN_SAMPLES, *TINY, *BARS, *overrides, f"hydra.run.dir={tmp_path}"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-3000:]
    line = assert_one_stop_line_last(result.stdout, "diffusion_lab: error:")
    assert "NaN or infinite, so no metric was computed" in line
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    if where == "validation":
        assert "samples drawn at the validation of step 46" in line
        assert f"{ckpt}: resume with hydra.run.dir={tmp_path} ckpt_path=last" in line
        assert checkpoint_step(ckpt) == 23  # the epoch-end checkpoint before the validation
    else:
        assert "final samples (step 5)" in line and f"checkpoint kept at {ckpt}" in line
        assert checkpoint_step(ckpt) == 5
        assert not (tmp_path / "samples.pt").exists()
    assert not (tmp_path / "final_metrics.json").exists()
    assert not (tmp_path / "error.log").exists()


def test_a_sweep_runs_every_job_and_names_the_failed_one_last(tmp_path):
    """``-m optimizer.lr=1e3,2e-3``: job 0 diverges (NaN loss at step 3), job 1 still runs and
    finishes; the sweep exits 2 and its last line names job 0, its override, folder and reason."""
    result = run("-m", *TINY, *BARS, "trainer.max_steps=5", "optimizer.lr=1e3,2e-3",
                 f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert result.returncode == 2, result.stdout[-3000:]
    line = assert_one_stop_line_last(result.stdout, "diffusion_lab: error: sweep job 0")
    assert f"(optimizer.lr=1000.0) failed, folder {tmp_path / '0'}: loss is nan at step" in line
    assert (tmp_path / "1" / "final_metrics.json").is_file()  # the job after the failed one ran
    assert not (tmp_path / "0" / "final_metrics.json").exists()


def test_the_stop_line_is_the_last_line_with_the_progress_bars_on(tmp_path):
    """A NaN loss at step 3 with Lightning's bar drawing on stdout: the line starts on its own
    line and nothing redraws after it (it used to be glued to the bar, the bar redrawn below)."""
    result = run(*TINY, *BARS, "optimizer.lr=1e3", "trainer.max_steps=50",
                 f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert result.returncode == 2, result.stdout[-3000:]
    assert_one_stop_line_last(result.stdout, "diffusion_lab: error: loss is nan at step")
    assert "Epoch 0" in result.stdout  # the bar was drawn


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "Ctrl-C"),
                                              (signal.SIGTERM, 143, "SIGTERM")])  # fmt: skip
def test_an_interrupt_in_training_says_how_to_resume(tmp_path, start, sig, code, name):
    """Ctrl-C (or SIGTERM) once the first epoch-end checkpoint exists: exit 130 (143) with one
    last line naming the step, the checkpoint written on the interrupt and the command that
    resumes with the run's overrides; that command runs."""
    run_dir = tmp_path / "run"
    overrides = [*TINY, *BARS, "trainer.max_steps=100000"]
    process, out, err = start(run_dir, *overrides)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    wait_for(lambda: checkpoint_step(ckpt), "the first epoch-end checkpoint", process)
    process.send_signal(sig)
    assert process.wait(timeout=300) == code, text_of(err)[-3000:]
    line = assert_one_stop_line_last(text_of(out) + text_of(err), "diffusion_lab: interrupted:")
    step = checkpoint_step(ckpt)
    assert step >= 23  # written on the interrupt, at or after the epoch end
    assert f"interrupted ({name}) at step {step}: checkpoint kept at {ckpt}; resume with " in line
    command = shlex.split(line.split("resume with ", 1)[1])
    assert command[:5] == ["python", "-m", "diffusion_lab.run", f"hydra.run.dir={run_dir}",
                           "ckpt_path=last"]  # fmt: skip
    assert command[5:] == overrides
    command[command.index("trainer.max_steps=100000")] = f"trainer.max_steps={step + 2}"
    resumed = cli.run([sys.executable, *command[1:]], capture_output=True, text=True,
                      timeout=600, env=env())  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint_step(ckpt) == step + 2


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "Ctrl-C"),
                                              (signal.SIGTERM, 143, "SIGTERM")])  # fmt: skip
def test_an_interrupt_in_the_final_sampling_keeps_the_checkpoint_and_says_how_to_sample(
    tmp_path, start, sig, code, name
):
    """Ctrl-C (SIGTERM) once the final sampling has started (its log line): exit 130 (143), one
    last line naming the checkpoint and the command that samples; no samples.pt, no
    final_metrics.json."""
    run_dir = tmp_path / "run"
    process, out, err = start(run_dir, *TINY, *BARS, "trainer.max_steps=3",
                              "final_samples=2000", "sampler.steps=1000")  # fmt: skip
    wait_for(lambda: "final sampling: 2000 samples" in text_of(out), "the final sampling", process)
    process.send_signal(sig)
    assert process.wait(timeout=300) == code, text_of(err)[-3000:]
    line = assert_one_stop_line_last(text_of(out) + text_of(err), "diffusion_lab: interrupted:")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert f"({name}) during the final sampling: checkpoint kept at {ckpt}" in line
    assert f"sample with python -m diffusion_lab.sample {run_dir} --num-samples 2000" in line
    assert checkpoint_step(ckpt) == 3
    assert not (run_dir / "samples.pt").exists() and not (run_dir / "final_metrics.json").exists()


def test_a_resumed_run_trains_at_its_own_learning_rate(tmp_path):
    """Trained at 2e-3, resumed with optimizer.lr=1e-4 (the advice after a divergence): the
    optimiser and scheduler of the final checkpoint hold 1e-4, and a line says so."""
    first = run(*TINY, *QUIET, "method.warmup_steps=0", "trainer.max_steps=23",
                f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:]
    resumed = run(*TINY, *QUIET, "method.warmup_steps=0", "trainer.max_steps=26",
                  "ckpt_path=last", "optimizer.lr=1e-4", f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "param group 0: 0.0001 (was 0.002)" in resumed.stdout
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 26
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == group["initial_lr"] == 1e-4
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == [1e-4]


def test_a_refused_resume_leaves_the_run_folder_as_it_was(tmp_path):
    """``ckpt_path=last network.base_channels=16`` on a run trained at 8 is refused (exit 2)
    and rewrites nothing: Hydra's record and config.yaml are byte-identical, and
    ``python -m diffusion_lab.sample RUN`` still works without the old width; an accepted
    resume then records its own overrides."""
    first = run(*TINY, *QUIET, "trainer.max_steps=3", f"hydra.run.dir={tmp_path}")
    assert first.returncode == 0, first.stdout[-3000:]
    record = ["config.yaml", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"]
    before = {name: (tmp_path / name).read_bytes() for name in record}
    refused = run(*TINY, *QUIET, "trainer.max_steps=6", "ckpt_path=last",
                  "network.base_channels=16", f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert refused.returncode == 2, refused.stdout[-3000:]
    assert "does not fit this run" in assert_one_stop_line_last(refused.stdout, "diffusion_lab:")
    assert {name: (tmp_path / name).read_bytes() for name in record} == before
    sampled = cli.run(
        [sys.executable, "-m", "diffusion_lab.sample", str(tmp_path), "--num-samples", "2"],
        capture_output=True, text=True, timeout=600, env=env(),
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert json.loads(sampled.stdout)["num_samples"] == 2
    accepted = run(*TINY, *QUIET, "trainer.max_steps=4", "ckpt_path=last",
                   f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert accepted.returncode == 0, accepted.stdout[-3000:]
    assert "ckpt_path=last" in (tmp_path / ".hydra" / "overrides.yaml").read_text()
    assert "output_subdir: .hydra" in (tmp_path / ".hydra" / "hydra.yaml").read_text()


def test_a_bar_that_ctrl_c_stopped_in_its_constructor_does_not_hide_the_stop_line():
    """tqdm registers a bar before its ``__init__`` runs; Ctrl-C in between left a bar without
    ``disable``, and closing the bars before the stop line raised AttributeError (exit 1)."""
    from tqdm import tqdm

    from diffusion_lab.stops import close_progress_bars

    half_built = tqdm.__new__(tqdm)
    try:
        assert close_progress_bars() is False
    finally:
        tqdm._instances.discard(half_built)
        half_built.disable = True  # so that its __del__ has nothing to close


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "Ctrl-C"),
                                              (signal.SIGTERM, 143, "SIGTERM")])  # fmt: skip
def test_an_interrupt_while_sampling_a_run_folder_is_one_line(tmp_path, sig, code, name):
    """Ctrl-C (SIGTERM) once ``python -m diffusion_lab.sample`` draws (Lightning's predict
    loop, which catches it and exited 1): exit 130 (143), one last line, nothing written."""
    run_dir = tmp_path / "run"
    trained = run(*TINY, *QUIET, "trainer.max_steps=2", "final_samples=0",
                  f"hydra.run.dir={run_dir}")  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-3000:]
    err = tmp_path / "sample.err"
    with open(tmp_path / "sample.out", "w") as stdout, open(err, "w") as stderr:
        process = cli.Popen(
            [sys.executable, "-m", "diffusion_lab.sample", str(run_dir), "--num-samples", "2000",
             "sampler.steps=1000", "sampler.progress=true"],
            stdout=stdout, stderr=stderr, env=env(),
        )  # fmt: skip
    try:
        wait_for(lambda: "dpm_solver++:" in text_of(err), "the sampler's bar", process)
        process.send_signal(sig)
        assert process.wait(timeout=300) == code, text_of(err)[-3000:]
    finally:
        process.kill()
    line = assert_one_stop_line_last(text_of(err), "diffusion_lab: interrupted:")
    assert f"interrupted ({name}) while sampling: nothing was written" in line
    assert not list(run_dir.glob("samples_*"))


def test_a_requeued_slurm_job_resumes_from_its_checkpoint_without_a_command(tmp_path):
    """SLURM requeues a preempted (or timed-out) job with its first overrides, ckpt_path=null
    included: it retrained from step 0 in the same folder. With SLURM_RESTART_COUNT > 0 it
    resumes from last.ckpt (Lightning restores the loops), and the CSV rows before the
    checkpoint are kept (a training row every 5 steps)."""
    first = run(*TINY, *QUIET, "trainer.max_steps=12", f"hydra.run.dir={tmp_path}")
    assert first.returncode == 0, first.stdout[-3000:]
    requeued = cli.run(
        [sys.executable, "-m", "diffusion_lab.run", *TINY, *QUIET, "trainer.max_steps=14",
         f"hydra.run.dir={tmp_path}"],
        env={**env(), "SLURM_RESTART_COUNT": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=600,
    )  # fmt: skip
    assert requeued.returncode == 0, requeued.stdout[-3000:]
    assert "SLURM requeued this job (restart 1): resuming from last.ckpt" in requeued.stdout
    assert "Restored all states from the checkpoint" in requeued.stdout
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 14
    with open(tmp_path / "logs" / "metrics.csv", newline="") as rows:
        steps = sorted({int(row["step"]) for row in csv.DictReader(rows)})
    assert steps[0] < 12 and steps[-1] >= 12


def test_slurms_requeue_signal_checkpoints_requeues_and_the_requeued_job_resumes_there(
    tmp_path, start
):
    """Under SLURM (its environment, faked, and an ``scontrol`` that records its calls),
    SIGUSR1, the signal ``sbatch --signal`` sends before the time limit, makes Lightning write
    hpc_ckpt_1.ckpt and run ``scontrol requeue JOB`` while training goes on. Killed then (as
    SLURM ends a job whose grace time ran out), the job SLURM starts again (SLURM_RESTART_COUNT
    = 1, its first overrides, ckpt_path=null) resumes from that checkpoint, the latest, not
    from the epoch end's last.ckpt."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # fmt: skip
    run_dir = tmp_path / "run"
    process, out, err = start(run_dir, *TINY, *QUIET, "trainer.max_steps=100000", **slurm)
    last, hpc = run_dir / "checkpoints" / "last.ckpt", run_dir / "hpc_ckpt_1.ckpt"
    wait_for(lambda: checkpoint_step(last), "the first epoch-end checkpoint", process)
    wait_for(lambda: last_logged_step(run_dir) > checkpoint_step(last), "a later step", process)
    process.send_signal(signal.SIGUSR1)
    wait_for(lambda: checkpoint_step(hpc), "Lightning's hpc checkpoint", process)
    wait_for(lambda: "requeue 4242" in text_of(calls), "scontrol requeue 4242", process)
    process.kill()
    process.wait(timeout=60)
    step = checkpoint_step(hpc)
    assert step > checkpoint_step(last), text_of(err)[-3000:]
    requeued = run(*TINY, *QUIET, f"trainer.max_steps={step + 2}", f"hydra.run.dir={run_dir}",
                   **slurm, SLURM_RESTART_COUNT="1")  # fmt: skip
    assert requeued.returncode == 0, requeued.stdout[-3000:]
    assert "SLURM requeued this job (restart 1): resuming from hpc_ckpt_1.ckpt" in requeued.stdout
    assert checkpoint_step(last) == step + 2
