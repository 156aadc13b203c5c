"""Bad input through the command lines as a user types them (``python -m diffusion_lab.run``,
``.sample``, ``.evaluate``): one ``diffusion_lab: error:`` line, exit code 2, no traceback, no
code of a data file run, no memory exhausted, no temporary file left behind."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli
from helpers.formats import Payload, write_cifar

from diffusion_lab.data import formats

QUICK = ["trainer=debug", "network.base_channels=8", "method.num_eval_samples=0",
         "final_samples=4", "sampler.steps=5", "sampler.progress=false",
         "trainer.enable_progress_bar=false"]  # fmt: skip


def command(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m diffusion_lab.<module> ARGS`` as a user runs it."""
    return cli.run(
        [sys.executable, "-m", f"diffusion_lab.{module}", *args],
        capture_output=True, text=True, timeout=timeout, env=os.environ.copy(),
    )  # fmt: skip


def run(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return command("run", *QUICK, *overrides, f"hydra.run.dir={run_dir}", timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``diffusion_lab: error:`` line of a run that stopped on bad input."""
    lines = [line for line in result.stderr.splitlines() if "diffusion_lab: error:" in line]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- data files
def test_a_forked_run_answers_as_a_fresh_interpreter_does(tmp_path):
    """The suite forks its runs from a preloaded server (helpers.cli); a fresh ``python -m``
    and the fork give the same exit code and the same stderr lines from the run itself, and
    the fork sees its own environment (TMPDIR) and working directory."""
    args = [sys.executable, "-m", "diffusion_lab.run", "trainer.max_steps=-3"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    real = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    forked = cli.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert real.returncode == forked.returncode == 2, real.stderr[-2000:] + forked.stderr[-2000:]
    assert one_error_line(real) == one_error_line(forked)
    assert real.stderr.splitlines()[-1] == forked.stderr.splitlines()[-1]
    probe = "import os, sys, tempfile; print(os.getcwd(), tempfile.gettempdir(), sys.argv[1:])"
    seen = cli.run([sys.executable, "-c", probe, "a", "b"], capture_output=True, text=True,
                   env=env, cwd=tmp_path)  # fmt: skip
    assert seen.stdout.split("\n")[0] == f"{tmp_path} {tmp_path} ['a', 'b']"


def test_a_crafted_cifar10_batch_stops_the_run_and_its_code_never_runs(tmp_path):
    write_cifar(tmp_path / "data")
    marker = tmp_path / "marker"
    batch = tmp_path / "data" / formats.CIFAR10_DIR / "data_batch_1"
    batch.write_bytes(pickle.dumps(Payload(os.system, f"touch {marker}"), protocol=2))
    result = run(tmp_path / "run", "data=cifar10", f"data.root={tmp_path / 'data'}")
    line = one_error_line(result)
    assert str(batch) in line and "posix.system" in line, line
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- memory
def test_an_fp_embedding_too_large_for_memory_stops_before_the_solve(tmp_path):
    """The offline line at data.image_size=1000 (the default n_copies=1000): its U-Net's middle
    attention alone would take 16 x 250 GB at the first step, after minutes of FP solve; the
    estimate stops it at the start, in seconds, with one line."""
    import time

    from diffusion_lab.run import offline_overrides

    offline = offline_overrides("fp_embed_cifar10_single").split()
    start = time.monotonic()
    result = command("run", "+experiment=fp_embed_cifar10_single", *offline,
                     "data.image_size=1000", f"hydra.run.dir={tmp_path}",
                     "trainer.enable_progress_bar=false")  # fmt: skip
    took = time.monotonic() - start
    line = one_error_line(result)
    assert "needs about" in line and "TiB of memory" in line and "available" in line, line
    assert "data.image_size (now 1000)" in line and "data.batch_size" in line, line
    assert "FP solve: iterations" not in result.stdout + result.stderr  # stopped before it
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert took < 120, took  # about 15 s here, nearly all of it the start-up


# ----------------------------------------------------------------------------- sample, evaluate
@pytest.mark.parametrize("value", ["-3", "0"])
def test_sample_takes_only_a_positive_number_of_samples(tmp_path, value):
    line = one_error_line(command("sample", str(tmp_path), "--num-samples", value))
    assert "--num-samples" in line and "positive integer" in line, line


@pytest.mark.parametrize("module", ["sample", "evaluate"])
def test_a_missing_run_folder_is_named_as_missing(tmp_path, module):
    missing = tmp_path / "no_such_run"
    line = one_error_line(command(module, str(missing)))
    assert f"no such run folder {missing}" in line and "train" not in line, line


@pytest.mark.parametrize("module", ["sample", "evaluate"])
def test_a_run_folder_without_its_results_says_train_the_run_first(tmp_path, module):
    (tmp_path / "config.yaml").write_text("seed: 0\n")  # the run started, but wrote nothing yet
    line = one_error_line(command(module, str(tmp_path)))
    expected = "last.ckpt" if module == "sample" else "samples.pt"
    assert expected in line and "train the run first" in line, line


# ----------------------------------------------------------------------------- checkpoint files
def test_the_checkpoint_writer_keeps_its_temporary_beside_the_target(tmp_path, monkeypatch):
    """torch.save writes ``.last.ckpt.<pid>.tmp`` in the checkpoints folder, then it is renamed:
    nothing goes through the system temp folder (where a kill would leave it)."""
    import tempfile

    import torch

    from diffusion_lab.callbacks.checkpoint import AtomicCheckpointIO

    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    real_save, written = torch.save, []

    def save(obj, f, *args, **kwargs):
        written.append(Path(getattr(f, "name", f)))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    assert written == [path.parent / f".last.ckpt.{os.getpid()}.tmp"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert not list(system_tmp.iterdir())
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))


def test_a_run_removes_the_temporaries_of_killed_writers_and_keeps_a_live_ones(tmp_path):
    """Temporaries of a dead writer and the earlier versions' pid-less form, left in a run
    folder by a kill, are removed when a run starts there again (``on_fit_start``, the same for a
    fresh run and ``ckpt_path=last``); a live writer's stays; what the earlier versions left in
    the system temp folder is named, never deleted."""
    import torch

    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    dead = subprocess.Popen(["true"])  # a pid that is gone
    dead.wait()
    stale = [checkpoints / f".last.ckpt.{dead.pid}.tmp", checkpoints / ".last.ckpt.tmp"]
    live = checkpoints / f".last.ckpt.{os.getpid()}.tmp"  # this test process: alive
    for path in (*stale, live):
        path.write_bytes(b"half a checkpoint")
    legacy = system_tmp / "tmpab12cd34"  # what the old writer's tempfile.mkstemp() left
    torch.save({"pytorch-lightning_version": "2.6.6", "hyper_parameters": {"run_config": {}}},
               legacy)  # fmt: skip
    result = cli.run(
        [sys.executable, "-m", "diffusion_lab.run", *QUICK, "trainer.max_steps=2", "data.metrics=[]",
         "final_samples=0", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(system_tmp)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(["last.ckpt", live.name])
    assert legacy.exists() and f"rm {legacy}" in result.stdout + result.stderr
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2
