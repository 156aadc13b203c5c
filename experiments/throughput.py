"""Training throughput against the reference (issue 21 item 5): a training step (forward,
backward, Adam) of ``unet_ddpm_cifar10`` against diffusers' ``UNet2DModel`` of the same config
(google/ddpm-cifar10-32's, with the preset's dropout), both holding the same weights (diffusers'
random ones converted into ours by ``networks/from_diffusers.py``; their outputs are compared
first), at batch 32 on 32x32, side by side in one process, alternating for ``--rounds`` rounds;
the ratio of the medians is reported. Then the data pipeline's images per second, with
``num_workers`` 0 and 2, for the loaders a CIFAR-10 / ImageNet run uses, on files written here
in the real formats: CIFAR-10's pickled batches (held in memory as uint8), an ImageNet class
folder of 500x375 JPEGs (decoded and resized for every batch) and an image folder of PNGs
(decoded once at setup). "Never the bottleneck": a loader's images per second against the
training step's.

Usage: ``python experiments/throughput.py [--batch 32] [--steps 3] [--rounds 5] [--quick]``.
Writes ``experiments/results/throughput.json``. Run it on a quiet machine: it is a timing.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_lab.build import compose_config
from diffusion_lab.data import formats
from diffusion_lab.data.images import ImageFolderDataModule
from diffusion_lab.data.real import CIFAR10DataModule, ImageNetDataModule
from diffusion_lab.networks.from_diffusers import unet_kwargs, unet_state_dict
from diffusion_lab.networks.unet import UNet
from diffusion_lab.run import config_dir

RESULTS = Path(__file__).resolve().parent / "results"
# google/ddpm-cifar10-32's config.json (the fields that differ from diffusers' defaults)
DDPM_CIFAR10 = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def networks() -> dict[str, tuple[torch.nn.Module, Callable]]:
    """Ours (the preset's architecture and dropout) and diffusers', with the same weights; each
    with its call ``(x, t) -> eps``."""
    import diffusers

    preset = compose_config(config_dir(), ["data=cifar10", "network=unet_ddpm_cifar10"]).network
    config = {**DDPM_CIFAR10, "dropout": float(preset.dropout)}
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel.from_config(config)
    kwargs = unet_kwargs(config)
    shape = ("base_channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout")
    assert {f: kwargs[f] for f in shape} == {f: preset[f] for f in shape}, "not the preset"
    ours = UNet(**kwargs)
    ours.load_state_dict(unet_state_dict(theirs.state_dict(), kwargs))
    return {
        "ours (unet_ddpm_cifar10)": (ours, lambda x, t: ours(x, t.float())),
        "diffusers UNet2DModel": (theirs, lambda x, t: theirs(x, t).sample),
    }


@torch.no_grad()
def relative_difference(arms: dict[str, tuple[torch.nn.Module, Callable]]) -> float:
    """max |ours - theirs| / max |theirs| on random inputs, in eval mode (no dropout)."""
    (ours, ours_fn), (theirs, theirs_fn) = arms.values()
    ours.eval(), theirs.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 500, 999])
    reference = theirs_fn(x, t)
    return float((ours_fn(x, t) - reference).abs().max() / reference.abs().max())


def seconds_per_step(module: torch.nn.Module, call: Callable, optimizer: torch.optim.Optimizer,
                     batch: int, steps: int, seed: int) -> float:  # fmt: skip
    """The mean time of ``steps`` training steps: eps-prediction loss, backward, Adam."""
    module.train()
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        x = torch.randn(batch, 3, 32, 32, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(batch, 3, 32, 32, generator=g)
        loss = F.mse_loss(call(x, t), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def training_steps(batch: int, steps: int, rounds: int) -> dict:
    arms = networks()
    difference = relative_difference(arms)
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=2e-4) for name, (m, _) in arms.items()}
    for name, (module, call) in arms.items():  # warm-up: allocations, Adam's state
        seconds_per_step(module, call, optimizers[name], batch, 1, seed=0)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(rounds):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))
        for name in order:
            module, call = arms[name]
            times[name].append(seconds_per_step(module, call, optimizers[name], batch, steps, r))
    medians = {name: statistics.median(t) for name, t in times.items()}
    ours, theirs = medians.values()
    return {
        "parameters": {n: sum(p.numel() for p in m.parameters()) for n, (m, _) in arms.items()},
        "relative_output_difference": difference,
        "batch": batch,
        "steps_per_round": steps,
        "rounds": rounds,
        "seconds_per_step": times,
        "median_seconds_per_step": medians,
        "ours_over_diffusers": ours / theirs,
        "training_images_per_second": batch / ours,
    }


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field with grain: JPEG-compresses and decodes like a photograph
    (pure noise would be far slower to decode than any photo)."""
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8))


def write_data(root: Path, n: int) -> None:
    """CIFAR-10's batches (n images each), an ImageNet layout (n JPEGs in 10 classes per
    split) and a folder of n PNGs."""
    rng = np.random.default_rng(0)
    cifar = root / "cifar" / formats.CIFAR10_DIR
    cifar.mkdir(parents=True)
    for name in formats.CIFAR10_TRAIN + formats.CIFAR10_TEST:
        entry = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}  # fmt: skip
        (cifar / name).write_bytes(pickle.dumps(entry, protocol=2))
    for split in ("train", "val"):
        for i in range(n):
            path = root / "imagenet" / split / f"n{i % 10:08d}" / f"{split}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo_like(rng, 500, 375).save(path, quality=90)
    (root / "folder").mkdir()
    for i in range(n):
        photo_like(rng, 178, 218).save(root / "folder" / f"{i:06d}.png")


def images_per_second(data, batches: int) -> float:
    """Images per second over ``batches`` training batches, after the first (workers start)."""
    data.setup()
    loader = iter(data.train_dataloader())
    next(loader)
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        seen += len(next(loader)[0])
    return seen / (time.perf_counter() - start)


def loaders(root: Path, batch: int, batches: int) -> dict[str, dict[str, float]]:
    sets = {
        "CIFAR-10 batches (uint8 in memory)": lambda w: CIFAR10DataModule(
            root=str(root / "cifar"), batch_size=batch, num_workers=w),
        "ImageNet JPEG folders (decoded per batch)": lambda w: ImageNetDataModule(
            root=str(root / "imagenet"), image_size=32, batch_size=batch, num_workers=w),
        "image folder of PNGs (decoded at setup)": lambda w: ImageFolderDataModule(
            root=str(root / "folder"), image_size=32, batch_size=batch, num_workers=w),
    }  # fmt: skip
    return {name: {f"num_workers={w}": images_per_second(make(w), batches) for w in (0, 2)}
            for name, make in sets.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=400, help="files per data set")
    parser.add_argument("--quick", action="store_true", help="batch 2, 1 step, 2 rounds, 40 files")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps, args.rounds, args.images = 2, 1, 2, 40
    steps = training_steps(args.batch, args.steps, args.rounds)
    batches = max(2, args.images // args.batch - 2)
    with tempfile.TemporaryDirectory() as folder:
        write_data(Path(folder), args.images)
        data = loaders(Path(folder), args.batch, batches)
    slowest = min(min(rates.values()) for rates in data.values())
    result = {
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "training_step": steps,
        "loader_images_per_second": data,
        "slowest_loader_over_training": slowest / steps["training_images_per_second"],
    }
    print(json.dumps(result, indent=1))
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "throughput.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
