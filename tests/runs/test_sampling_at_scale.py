"""``python -m diffusion_lab.sample`` at scale: ``--devices 2`` (DDP, gloo on CPU, started as a
user starts it) draws the images ``--devices 1`` draws, bit for bit, and both write the
evaluators' .npz of them; a bad ``--devices`` is one line; the final samples of a run are drawn
on its training device."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import cli
from hypothesis import given
from hypothesis import strategies as st

from diffusion_lab import sample
from diffusion_lab.methods.base import DiffusionMethod
from diffusion_lab.networks.unet import UNet
from diffusion_lab.processes.sde import VPSDE
from diffusion_lab.run import final_evaluation

# data.metrics=[]: no evaluator, so no digits classifier to train in a fresh cache
SMALL = ["trainer=debug", "method.num_eval_samples=0", "final_samples=0", "sampler.progress=false",
         "trainer.enable_progress_bar=false", "network.base_channels=8", "data.metrics=[]"]  # fmt: skip
QUICK = ["--num-samples", "5", "sampler.steps=3", "sampler.progress=false"]


def entry(module: str, *args: str) -> subprocess.CompletedProcess:
    return cli.run([sys.executable, "-m", f"diffusion_lab.{module}", *args],
                   capture_output=True, text=True, timeout=300, env=os.environ.copy())  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A digits run folder with checkpoints/last.ckpt after 2 steps."""
    run_dir = tmp_path_factory.mktemp("trained")
    result = entry("run", *SMALL, "trainer.max_steps=2", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def uint8_of(samples: torch.Tensor) -> np.ndarray:
    """Samples in [0, 1] as the documented uint8 (N, H, W, C), computed apart in numpy."""
    unit = samples.numpy().astype(np.float64)
    return np.rint(np.clip(unit * 255, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)


def test_two_devices_draw_the_images_of_one_and_write_them_as_npz(trained, tmp_path, capsys):
    """One device in this process (the command's own main; one import less), two as a user
    starts them: Lightning runs the command again for rank 1."""
    sample.main([str(trained), *QUICK, "--devices", "1"])
    report = json.loads(capsys.readouterr().out)  # stdout holds the report alone
    single = torch.load(trained / "samples_dpm_solver_pp.pt", weights_only=True)
    assert report["npz"] == str(trained / "samples_dpm_solver_pp.npz")
    with np.load(report["npz"]) as npz:
        images = npz["arr_0"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8  # digits are grey: C = 1
    assert np.array_equal(images, uint8_of(single))
    assert len({image.tobytes() for image in images}) == 5  # five different images

    two = entry("sample", str(trained), *QUICK, "--devices", "2", "--batch-size", "2",
                "--npz", str(tmp_path / "two.npz"))  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "distributed_backend=gloo" in two.stderr and "MEMBER: 2/2" in two.stderr
    assert json.loads(two.stdout)["num_samples"] == 5
    sharded = torch.load(trained / "samples_dpm_solver_pp.pt", weights_only=True)
    assert torch.equal(sharded, single)  # batches 0, 2 on rank 0 and 1 on rank 1, gathered
    with np.load(tmp_path / "two.npz") as npz:
        assert np.array_equal(npz["arr_0"], images)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--devices", "0"], "argument --devices: must be a positive integer, got 0"),
        (["--devices", str(available_cores() + 1)],
         f"--devices {available_cores() + 1} but this machine has {available_cores()} CPU cores: "
         f"use --devices 1 to {available_cores()}"),
        (["--accelerator", "tpu"], "argument --accelerator: invalid choice: 'tpu'"),
    ],
)  # fmt: skip
def test_a_bad_devices_is_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        sample.main([str(tmp_path), "--accelerator", "cpu", *argv])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffusion_lab: error:") and message in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_a_gpu_without_one_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main([str(tmp_path), "--accelerator", "gpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--accelerator gpu but no GPU is visible" in lines[0]


def test_the_final_samples_are_drawn_on_the_training_device(tmp_path):
    """After fit Lightning leaves the model on the CPU; final_evaluation moves it back to the
    strategy's device first (here the meta device stands in for a GPU)."""
    network = UNet(1, 8, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                   attn_resolutions=(), dropout=0.0)  # fmt: skip
    method = DiffusionMethod(network, VPSDE(), None, None, None, "eps", (0.0, 1.0), (-1.0, 1.0))
    method._trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("meta")), global_step=0
    )
    seen = []

    def generate(num_samples):
        seen.append(method.device)
        return torch.full((num_samples, 1, 8, 8), 0.5), 3

    method.generate = generate
    results = final_evaluation(method, None, 4, tmp_path)
    assert seen == [torch.device("meta")]
    assert results == {"nfe": 3.0, "num_samples": 4.0}
    assert torch.equal(torch.load(tmp_path / "samples.pt"), torch.full((4, 1, 8, 8), 0.5))


@given(
    saved=st.lists(st.sampled_from(["sampler=pc", "sampler.snr=0.17", "+sampler.x=1", "seed=3",
                                    "process=ve", "samplers=2", "~sampler.eps"])),
    new=st.lists(st.sampled_from(["sampler=heun", "sampler.steps=4", "seed=5"])),
)  # fmt: skip
def test_a_new_sampler_replaces_the_recorded_one_with_its_settings(saved, new):
    merged = sample.run_overrides(saved, new)
    assert merged[len(merged) - len(new) :] == new
    kept = merged[: len(merged) - len(new)]
    if "sampler=heun" in new:
        assert kept == [o for o in saved if o in ("seed=3", "process=ve", "samplers=2")]
    else:
        assert kept == saved
