"""Draw a method's samples on one device or many: Lightning's predict loop hands out the sample
batches by their global number (DDP with K processes: rank r draws batches r, r + K, ...), each
batch draws its samples from their own seeded streams (``DiffusionMethod.draw``), and rank 0
gathers them in batch order, so ``--devices K`` gives the samples ``--devices 1`` gives."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from contextlib import redirect_stdout
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from diffusion_lab.errors import ConfigError
from diffusion_lab.gathering import gather_on_rank_zero
from diffusion_lab.methods.base import DiffusionMethod
from diffusion_lab.stops import loop_interrupts_named

ACCELERATORS = ("auto", "cpu", "gpu")
#: One batch's result: (its number, its samples on the CPU, its NFE).
Drawn = tuple[int, torch.Tensor, int]


def available_devices(accelerator: str) -> int:
    """How many devices of a resolved accelerator (``cpu`` or ``gpu``) this process may use:
    visible GPUs, or the CPU cores it may run on (one process each)."""
    if accelerator == "gpu":
        return torch.cuda.device_count()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def check_devices(accelerator: str, devices: int) -> str:
    """The accelerator ``auto`` stands for here (``gpu`` when CUDA is visible, else ``cpu``),
    after checking that ``devices`` of it exist; a ConfigError line otherwise."""
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError(
            "--accelerator gpu but no GPU is visible (torch.cuda.is_available() is false): use "
            "--accelerator cpu or auto"
        )
    available = available_devices(accelerator)
    if devices > available:
        what = "GPUs (CUDA devices)" if accelerator == "gpu" else "CPU cores"
        raise ConfigError(
            f"--devices {devices} but this machine has {available} {what}: use --devices 1 to "
            f"{available}"
        )
    return accelerator


class BatchNumbers(Dataset):
    """Item k is the number k of a sample batch (the predict loop's sampler shards them)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, number: int) -> int:
        return number


class BatchDrawer(L.LightningModule):
    """A predict step that draws sample batch number k of ``batches`` with ``method`` (a
    submodule: Lightning moves it to the device) and returns it on the CPU."""

    def __init__(
        self, method: DiffusionMethod, batches: list[range], sample_shape: Sequence[int]
    ) -> None:
        super().__init__()
        self.method = method
        self.batches = batches
        self.sample_shape = tuple(sample_shape)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> Drawn:
        number = int(batch)
        samples, nfe = self.method.draw(self.batches[number], self.sample_shape)
        return number, samples.cpu(), nfe


def draw_on_devices(
    method: DiffusionMethod,
    num_samples: int,
    sample_shape: Sequence[int],
    batch_size: int | None,
    accelerator: str,
    devices: int,
    root_dir: Path,
    precision: str = "32-true",
) -> tuple[torch.Tensor, int] | None:
    """``num_samples`` samples of ``method`` in batches of ``batch_size`` (its
    ``sample_batch_size`` when None) on ``devices`` of ``accelerator`` (``check_devices``'
    answer); returns (samples in data range, the most NFE a batch took) on rank 0, None on the
    other ranks. With ``devices`` > 1 Lightning starts the other ranks (DDP: gloo on CPUs, NCCL
    on GPUs) by running this command again. ``precision``: the run's, when it is a ``-mixed``
    one (the batches drawn under its autocast); any other draws as the weights are."""
    batches = method.sample_batches(num_samples, batch_size)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        precision=precision if precision.endswith("-mixed") else None,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        inference_mode=False,  # generate's no_grad; an energy model takes its own gradients
        default_root_dir=root_dir,
    )
    loader = DataLoader(BatchNumbers(len(batches)), batch_size=1)
    stopped = "while sampling: nothing was written; run the command again"
    with warnings.catch_warnings(), redirect_stdout(sys.stderr):  # stdout: the caller's report
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        with loop_interrupts_named(trainer, stopped):
            drawn = trainer.predict(BatchDrawer(method, batches, sample_shape), loader)
    gathered = gather_on_rank_zero(drawn)
    if gathered is None:
        return None
    gathered.sort(key=lambda item: item[0])
    samples = torch.cat([samples for _, samples, _ in gathered])
    return samples, max(nfe for _, _, nfe in gathered)
