"""FP score embedding end to end through ``python -m diffusion_lab.run +experiment=fp_embed_*``:
every experiment's offline line, and the paper's image-folder layout on tiny PNGs."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli
from PIL import Image

from diffusion_lab.run import offline_overrides

EXPERIMENTS = ["fp_embed_cifar10_single", "fp_embed_celeba_single", "fp_embed_cifar10_multi",
               "fp_embed_imagenet_multi", "fp_embed_celeba_generate"]  # fmt: skip
QUICK = ["trainer=debug", "trainer.max_steps=4", "++trainer.val_check_interval=4",
         "method.num_eval_samples=3", "final_samples=3", "trainer.enable_progress_bar=false",
         "sampler.progress=false", "sampler.rtol=1e-3", "sampler.atol=1e-3",
         "data.n_copies=8", "data.batch_size=4"]  # fmt: skip


def run(run_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIFFUSION_LAB_CACHE": str(cache)}
    return cli.run(
        [sys.executable, "-m", "diffusion_lab.run", *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def check_run_folder(run_dir: Path) -> str:
    for name in ("config.yaml", "samples.png", "final_metrics.json", "metrics.csv",
                 "checkpoints/last.ckpt"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    return (run_dir / "metrics.csv").read_text()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_offline_line_embeds_trains_and_denoises(tmp_path, experiment):
    overrides = offline_overrides(experiment).split()
    size = ["data.image_size=16"] if "data=single_image" in overrides else [
        "data.source.image_size=16"]  # fmt: skip
    result = run(tmp_path / "run", tmp_path / "cache", f"+experiment={experiment}", *overrides,
                 *QUICK, *size)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    logged = check_run_folder(tmp_path / "run")
    for column in ("metrics/ssim", "metrics/global_ssim", "metrics/mse", "time/train_seconds"):
        assert column in logged, column
    assert list((tmp_path / "cache" / "fp_embeddings").glob("*.pt"))  # the embedding, cached


def write_png(path: Path, seed: int, size=(40, 48)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_the_papers_image_folder_layout_runs_end_to_end(tmp_path):
    folder = tmp_path / "fp_paper_images"
    for i in range(6):
        write_png(folder / f"celeba_{i}.png", i)
        write_png(folder / f"imagenet_{i}.png", 10 + i)
    result = run(tmp_path / "run", tmp_path / "cache", "+experiment=fp_embed_celeba_generate",
                 f"data.root={folder}", "data.image_size=16", "network=unet_small",
                 *QUICK)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    check_run_folder(tmp_path / "run")
    # Sampling from the checkpoint (three images, each in its own interval) draws the run's own
    # final samples: same weights, seed, prior and labels (sample b: image b mod 3).
    env = {**os.environ, "DIFFUSION_LAB_CACHE": str(tmp_path / "cache")}
    sampled = cli.run(
        [sys.executable, "-m", "diffusion_lab.sample", str(tmp_path / "run"), "--num-samples", "3"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    final = torch.load(tmp_path / "run" / "samples.pt")
    assert torch.equal(torch.load(tmp_path / "run" / "samples_probability_flow.pt"), final)
