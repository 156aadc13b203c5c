"""Soft Diffusion end to end through ``python -m diffusion_lab.run +experiment=...``: no data on
disk, the offline lines, a tiny CelebA folder in the real layout, and a checkpoint whose fitted
blur levels sample in a fresh folder with no data and no cache."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli
from helpers.formats import write_jpeg

from diffusion_lab.build import load_safely
from diffusion_lab.run import offline_overrides

QUICK = ["trainer=debug", "trainer.max_steps=4", "sampler.steps=6", "method.num_eval_samples=4",
         "final_samples=4", "trainer.enable_progress_bar=false", "sampler.progress=false"]  # fmt: skip


def run(run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return cli.run(
        [sys.executable, "-m", "diffusion_lab.run", *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600, env=env or os.environ.copy(),
    )  # fmt: skip


def write_tiny_celeba(root: Path) -> None:
    """12 JPEGs in CelebA's layout under root/celeba: 8 train, 2 val, 2 test."""
    folder = root / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 13)]
    for i, name in enumerate(names):
        write_jpeg(folder / "img_align_celeba" / name, (178, 218), i)
    splits = [0] * 8 + [1, 1, 2, 2]
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{n} {s}\n" for n, s in zip(names, splits, strict=True))
    )


def test_without_celeba_on_disk_the_experiment_names_the_folder_and_its_offline_line(tmp_path):
    result = run(tmp_path / "run", "+experiment=soft_blur_celeba", f"data.root={tmp_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "diffusion_lab: error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    offline = offline_overrides("soft_blur_celeba")
    assert str(tmp_path / "celeba") in lines[0]
    assert f"+experiment=soft_blur_celeba {offline}" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("experiment", ["soft_blur_celeba", "soft_mask_celeba"])
def test_the_offline_line_trains_samples_and_writes_the_run_folder(tmp_path, experiment):
    overrides = offline_overrides(experiment).split()
    result = run(tmp_path, f"+experiment={experiment}", *overrides, *QUICK,
                 "+trainer.val_check_interval=4")  # a validation at step 4  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", "samples.png", "samples.pt", "final_metrics.json",
                 "metrics.csv", "checkpoints/last.ckpt"):  # fmt: skip
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "final_metrics.json").read_text())
    assert metrics["nfe"] == 6 + 1 and metrics["num_samples"] == 4  # Momentum: 1 NFE a step
    logged = (tmp_path / "metrics.csv").read_text()
    assert "recon/ssim_t0.5" in logged and "recon/psnr_t0.9" in logged


def test_a_tiny_celeba_folder_runs_end_to_end(tmp_path):
    write_tiny_celeba(tmp_path / "data")
    result = run(tmp_path / "run", "+experiment=soft_blur_celeba", f"data.root={tmp_path / 'data'}",
                 "network=ncsnpp_small", "data.batch_size=4", "process/blur_schedule=soft_linear",
                 *QUICK)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    samples = (tmp_path / "run" / "samples.pt").stat().st_size
    assert samples > 0 and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_a_checkpoint_samples_with_its_fitted_levels_without_data_or_cache(tmp_path):
    """Train on a tiny CelebA folder with levels on the Wasserstein path (fitted when training
    starts), then sample from a copy of only the checkpoint and the config, with data.root
    missing and an empty cache: the levels come from the checkpoint."""
    write_tiny_celeba(tmp_path / "data")
    env = {**os.environ, "DIFFUSION_LAB_CACHE": str(tmp_path / "cache")}
    result = run(tmp_path / "run", "+experiment=soft_blur_celeba", f"data.root={tmp_path / 'data'}",
                 "network=ncsnpp_small", "data.batch_size=4", "process.blur_max=6.0",
                 "process.kernel_half_size=8", "process.blur_schedule.num_candidates=24",
                 "process.blur_schedule.num_levels=6", *QUICK, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cached = list((tmp_path / "cache" / "blur_schedules").glob("soft_wasserstein-*.json"))
    assert len(cached) == 1  # computed from the 8 training images, keyed by their hash
    levels = json.loads(cached[0].read_text())["levels"]
    state = load_safely(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    assert state["process.levels"].tolist() == levels
    assert len(levels) == 6 and levels[0] == 0.01 and levels[-1] == 6.0
    assert levels != torch.linspace(0.01, 6.0, 6, dtype=torch.float64).tolist()  # not linear

    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "checkpoints" / "last.ckpt", fresh / "checkpoints")
    shutil.copytree(tmp_path / "run" / ".hydra", fresh / ".hydra")
    shutil.rmtree(tmp_path / "data")
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    sampled = cli.run(
        [sys.executable, "-m", "diffusion_lab.sample", str(fresh), "--num-samples", "2",
         f"data.root={tmp_path / 'missing'}"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "DIFFUSION_LAB_CACHE": str(empty)},
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    samples = torch.load(fresh / "samples_soft_momentum.pt", weights_only=True)
    assert samples.shape == (2, 3, 64, 64) and bool(torch.isfinite(samples).all())
    assert not any(empty.iterdir()) and not (tmp_path / "missing").exists()
