"""Issue 9's bad inputs that live in files, the disk or the environment, end to end through
``python -m diffusion_lab.run`` (or its entry point in-process where the fault is simulated):
one line, exit code 2, training not started where the check belongs before it, no checkpoint
lost or left half-written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli
from helpers.formats import write_jpeg

QUICK = ["trainer=debug", "network.base_channels=8", "method.num_eval_samples=0",
         "final_samples=4", "sampler.steps=5", "sampler.progress=false",
         "trainer.enable_progress_bar=false"]  # fmt: skip


def run(run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return cli.run(
        [sys.executable, "-m", "diffusion_lab.run", *QUICK, *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600, env=env or os.environ.copy(),
    )  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "diffusion_lab: error:" in line]


def test_one_corrupt_jpeg_among_40_celeba_images_stops_at_setup(tmp_path):
    folder = tmp_path / "data" / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 41)]
    for i, name in enumerate(names):
        write_jpeg(folder / "img_align_celeba" / name, (178, 218), i)
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{n} {0 if i < 30 else 1 + i % 2}\n" for i, n in enumerate(names))
    )
    bad = folder / "img_align_celeba" / names[17]
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated, as an interrupted copy leaves it
    result = run(tmp_path / "run", "data=celeba", f"data.root={tmp_path / 'data'}")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert str(bad) in lines[0] and "data.on_bad_file=skip" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped at setup, not at step 2


def test_a_fresh_home_says_it_trains_the_digits_classifier_once_and_caches_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DIFFUSION_LAB_CACHE"}
    env["HOME"] = str(tmp_path / "home")  # an empty home, as on a fresh cluster account
    first = run(tmp_path / "first", "trainer.max_steps=2", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    cache = tmp_path / "home" / ".cache" / "diffusion_lab"
    said = first.stdout + first.stderr
    assert "training the digits classifier" in said and str(cache) in said
    assert list(cache.glob("digits_classifier*.pt"))
    second = run(tmp_path / "second", "trainer.max_steps=2", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "training the digits classifier" not in second.stdout + second.stderr


def _main(monkeypatch, run_dir: Path, *overrides: str) -> None:
    """``python -m diffusion_lab.run`` in this process (to simulate a fault with monkeypatch)."""
    from diffusion_lab import run as entry

    argv = ["diffusion_lab.run", *QUICK, *overrides, f"hydra.run.dir={run_dir}"]
    monkeypatch.setattr(sys, "argv", argv)
    entry.main()


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one_and_says_so(
    tmp_path, monkeypatch, capsys
):
    """The second epoch-end write fails half-way with ENOSPC: exit 2 with one line, the first
    last.ckpt intact, no temporary file left filling the disk."""
    real_save, writes = torch.save, []

    def save(obj, f, *args, **kwargs):
        writes.append(isinstance(obj, dict) and "state_dict" in obj)  # a checkpoint
        if (
            sum(writes) == 2 and writes[-1]
        ):  # Lightning serialises to memory, then writes the temporary file
            (tmp_path / "checkpoints" / ".last.ckpt.tmp").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as exit_:
        _main(monkeypatch, tmp_path, "trainer.max_steps=60", "data.batch_size=128")
    assert exit_.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "No space left" in lines[0], lines
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 12


def test_no_room_for_a_checkpoint_stops_the_run_before_training(tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**9, 10**9 - 10**4, 10**4))
    with pytest.raises(SystemExit) as exit_:
        _main(monkeypatch, tmp_path, "trainer.max_steps=20")
    assert exit_.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "MiB free" in lines[0], lines
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
