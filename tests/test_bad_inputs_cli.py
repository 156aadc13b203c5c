"""Bad input through the command lines as a user types them (``python -m diffusion_lab.run``,
``.sample``, ``.evaluate``): one ``diffusion_lab: error:`` line, exit code 2, no traceback, no
code of a data file run, no memory exhausted, no temporary file left behind."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

from test_data_formats import Payload, write_cifar

from diffusion_lab.data import formats

QUICK = ["trainer=debug", "network.base_channels=8", "method.num_eval_samples=0",
         "final_samples=4", "sampler.steps=5", "sampler.progress=false",
         "trainer.enable_progress_bar=false"]  # fmt: skip


def command(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m diffusion_lab.<module> ARGS`` as a user runs it."""
    return subprocess.run(
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
