"""End to end through `python -m diffusion_lab.run`: run folder, resume after a kill, DDP, errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli
from helpers.runs import checkpoint_step, wait_for

TINY = [
    "trainer=debug",
    "network.base_channels=8",
    "data.batch_size=64",  # 1437 training digits: 23 steps per epoch
    "method.num_eval_samples=0",
    "final_samples=16",
    "sampler.steps=5",
    "sampler.progress=false",
    "trainer.enable_progress_bar=false",
]


def run(run_dir: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return cli.run(
        [sys.executable, "-m", "diffusion_lab.run", *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=timeout, env=os.environ.copy(),
    )  # fmt: skip


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run(run_dir, *TINY, "trainer.max_steps=69")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_run_folder_contents(uninterrupted):
    for name in ("config.yaml", "samples.png", "samples.pt", "final_metrics.json", "metrics.csv",
                 "curves.png", "checkpoints/last.ckpt"):  # fmt: skip
        assert (uninterrupted / name).is_file(), name
    metrics = json.loads((uninterrupted / "final_metrics.json").read_text())
    assert {"fid_digits", "kid_digits", "coverage_confident_fraction", "nfe"} <= set(metrics)
    assert metrics["nfe"] == 5 and metrics["num_samples"] == 16


def test_checkpoint_loads_with_weights_only(uninterrupted):
    checkpoint = torch.load(uninterrupted / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 69
    assert checkpoint["hyper_parameters"]["run_config"]["seed"] == 0


def test_resume_after_kill_matches_uninterrupted(uninterrupted, tmp_path):
    """SIGKILL a run once its first epoch-end last.ckpt exists, resume with ckpt_path=last: the
    weights (EMA and raw) and the final samples equal those of the uninterrupted run."""
    command = [sys.executable, "-m", "diffusion_lab.run", *TINY, "trainer.max_steps=100000",
               f"hydra.run.dir={tmp_path}"]  # fmt: skip
    process = cli.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    wait_for(lambda: checkpoint_step(ckpt), "the first epoch-end checkpoint", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = checkpoint_step(ckpt)
    assert 0 < killed_at < 69
    result = run(tmp_path, *TINY, "trainer.max_steps=69", "ckpt_path=last")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, reference = weights(ckpt), weights(uninterrupted / "checkpoints/last.ckpt")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    same_samples = torch.load(tmp_path / "samples.pt", weights_only=True)
    assert torch.equal(same_samples, torch.load(uninterrupted / "samples.pt", weights_only=True))


def test_resume_must_be_asked_for_and_must_exist(tmp_path):
    result = run(tmp_path, *TINY, "ckpt_path=last")
    assert result.returncode != 0
    assert "last.ckpt not found" in result.stderr and "Traceback" not in result.stderr


def test_unknown_config_key_stops_with_one_clear_message(tmp_path):
    result = run(tmp_path, "trainer=debug", "network.no_such_key=3")
    assert result.returncode != 0
    assert "no_such_key" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.warmup_steps=-1", "warmup_steps must be >= 0"),
        ("optimizer.lr=-1", "optimizer.lr must be >= 0.0, got -1"),
        ("data.batch_size=0", "batch_size"),
        ("process.num_steps=1", "num_steps"),
        ("data=cifar10", "data=digits"),
        (
            "sampler=annealed_langevin",
            "annealed_langevin needs a process that keeps noise at t = 0",
        ),
        ("sampler.steps=1001", "steps must lie in [1, 1000]"),
    ],
)
def test_bad_values_stop_before_training_with_one_line(tmp_path, override, message):
    result = run(tmp_path, "trainer=debug", override, f"data.root={tmp_path}/missing"
                 if override == "data=cifar10" else "seed=0")  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if "diffusion_lab: error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_ddp_with_two_cpu_processes(tmp_path):
    """Lightning's DDP (gloo) with 2 processes, relaunched from the command line."""
    result = run(tmp_path, *TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.max_steps=6", "trainer.check_val_every_n_epoch=1",
                 "+trainer.limit_val_batches=1", timeout=400)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6
    assert (tmp_path / "samples.png").is_file()


@pytest.mark.parametrize("logger, folder", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_other_loggers_run_offline(tmp_path, logger, folder):
    """W&B needs no account (offline mode when not logged in) and never prompts."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # the project decides
    result = cli.run(
        [sys.executable, "-m", "diffusion_lab.run", *TINY, f"logger={logger}",
         "trainer.max_steps=3", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / folder).is_dir()
    assert (tmp_path / "logs" / "metrics.csv").is_file()


def test_multirun_sweep_with_the_basic_launcher(tmp_path):
    result = cli.run(
        [sys.executable, "-m", "diffusion_lab.run", "-m", *TINY, "trainer.max_steps=2",
         "sampler.steps=2,3", f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    nfes = sorted(json.loads((tmp_path / str(k) / "final_metrics.json").read_text())["nfe"]
                  for k in (0, 1))  # fmt: skip
    assert nfes == [2, 3]


def test_a_dead_ddp_rank_is_named_by_the_survivor(tmp_path):
    """SIGKILL rank 1 of a 2-process DDP run once training started: rank 0 ends with one line
    naming rank 1 and its pid, and the last checkpoint survives."""
    command = [sys.executable, "-m", "diffusion_lab.run", *TINY, "trainer=ddp",
               "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=2000",
               f"hydra.run.dir={tmp_path}"]  # fmt: skip
    process = cli.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True, env=os.environ.copy())  # fmt: skip
    ckpt, registry = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "ranks"

    def rank_1_training() -> list[Path]:
        ranks = list(registry.glob("*/1.pid"))
        return ranks if ranks and ckpt.is_file() else []

    ranks = wait_for(rank_1_training, "rank 1's pid file and a checkpoint", process, poll=0.1)
    pid = int(ranks[0].read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "diffusion_lab: error:" in line]
    assert len(errors) == 1, stderr[-3000:]
    assert f"rank 1 of 2 (pid {pid}) died or was killed" in errors[0]
    assert "ckpt_path=last" in errors[0]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] > 0


@pytest.mark.gpu
def test_a_gpu_run_trains_samples_there_and_keeps_its_cuda_noise_stream(tmp_path):
    """trainer=gpu: training, the final samples and ``sample --accelerator gpu`` run on CUDA;
    the checkpoint keeps the CUDA RNG states."""
    gpu = [override for override in TINY if not override.startswith("trainer=")]
    result = run(tmp_path, "trainer=gpu", *gpu, "trainer.max_steps=3",
                 "trainer.check_val_every_n_epoch=1")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3 and checkpoint["cuda_rng_states"]
    sampled = cli.run(
        [sys.executable, "-m", "diffusion_lab.sample", str(tmp_path), "--num-samples", "4",
         "--accelerator", "gpu"],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert json.loads(sampled.stdout)["num_samples"] == 4


def test_every_task_of_one_srun_step_writes_to_one_folder(tmp_path, monkeypatch):
    """Inside a SLURM job step (``srun``: SLURM_JOB_ID and SLURM_STEP_ID set) the default run
    folder is outputs/slurm-<job>.<step>, the same for every task srun starts (each composes
    its own config, and the clock named the folder: tasks a second apart got two); outside
    srun it is the launch time."""
    from diffusion_lab.run import run_stamp

    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "3"}
    done = cli.run([sys.executable, "-m", "diffusion_lab.run", *TINY, "trainer.max_steps=2"],
                   capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["slurm-4242.3"]
    assert (tmp_path / "outputs" / "slurm-4242.3" / "checkpoints" / "last.ckpt").is_file()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)  # salloc's shell: no step
    day, time_of_day = run_stamp().split("/")
    assert len(day) == len("2026-12-04") and len(time_of_day) == len("19-02-50")
