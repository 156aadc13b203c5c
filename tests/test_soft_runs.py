"""Soft Diffusion end to end through ``python -m diffusion_lab.run +experiment=...``: no data on
disk, the offline lines, and a tiny CelebA folder in the real layout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_formats import write_jpeg

from diffusion_lab.run import offline_overrides

QUICK = ["trainer=debug", "trainer.max_steps=4", "sampler.steps=6", "method.num_eval_samples=4",
         "final_samples=4", "trainer.enable_progress_bar=false", "sampler.progress=false"]  # fmt: skip


def run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffusion_lab.run", *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )  # fmt: skip


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
    folder = tmp_path / "data" / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 13)]
    for i, name in enumerate(names):
        write_jpeg(folder / "img_align_celeba" / name, (178, 218), i)
    splits = [0] * 8 + [1, 1, 2, 2]
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{n} {s}\n" for n, s in zip(names, splits, strict=True))
    )
    result = run(tmp_path / "run", "+experiment=soft_blur_celeba", f"data.root={tmp_path / 'data'}",
                 "network=ncsnpp_small", "data.batch_size=4", "blur_schedule=soft_linear",
                 *QUICK)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    samples = (tmp_path / "run" / "samples.pt").stat().st_size
    assert samples > 0 and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
