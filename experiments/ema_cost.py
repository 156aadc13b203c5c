"""The cost of one EMA update of the DDPM CIFAR-10 U-Net (35.7M parameters, 304 tensors):
``callbacks.ema.WarmupEMA``'s foreach update against the per-parameter update it replaced
(``avg_fn``: ``int(num_averaged)`` and ``decay * averaged + (1 - decay) * current`` for each
tensor, which on a GPU is one host sync per tensor), both through
``torch.optim.swa_utils.AveragedModel`` as Lightning's ``WeightAveraging`` calls it, side by
side in one process, alternating for ``--rounds`` rounds; the ratio of the medians is reported.
Both give the same weights bit for bit (checked here, and in tests/callbacks/test_ema.py).

Usage: ``python experiments/ema_cost.py [--updates 20] [--rounds 5] [--quick]``. Writes
``experiments/results/ema_cost.json``. Run it on a quiet machine: it is a timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from diffusion_lab.build import compose_config, instantiate
from diffusion_lab.callbacks.ema import WarmupEMA, warmup_ema_decay
from diffusion_lab.run import config_dir

RESULTS = Path(__file__).resolve().parent / "results"
DECAY = 0.9999


def per_parameter(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The update before: one ``int`` of the device counter per tensor."""
    decay = warmup_ema_decay(DECAY, int(n))
    return decay * averaged + (1 - decay) * current


def arms(network: torch.nn.Module) -> dict[str, AveragedModel]:
    return {
        "foreach (WarmupEMA)": AveragedModel(
            network, use_buffers=False, multi_avg_fn=WarmupEMA(DECAY)._average
        ),
        "per parameter (before)": AveragedModel(network, use_buffers=False, avg_fn=per_parameter),
    }


def seconds_per_update(ema: AveragedModel, network: torch.nn.Module, updates: int) -> float:
    start = time.perf_counter()
    for _ in range(updates):
        ema.update_parameters(network)
    return (time.perf_counter() - start) / updates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="unet_small, 3 updates, 2 rounds")
    args = parser.parse_args()
    name = "unet_small" if args.quick else "unet_ddpm_cifar10"
    updates, rounds = (3, 2) if args.quick else (args.updates, args.rounds)
    torch.manual_seed(0)
    cfg = compose_config(config_dir(), ["data=cifar10", f"network={name}"])
    network = instantiate(cfg.network)
    emas = arms(network)
    for ema in emas.values():  # the first update copies; the next ones average
        ema.update_parameters(network)
    times: dict[str, list[float]] = {arm: [] for arm in emas}
    for _ in range(rounds):
        for arm, ema in emas.items():
            times[arm].append(seconds_per_update(ema, network, updates))
    first, second = emas.values()
    same = all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    medians = {arm: statistics.median(t) for arm, t in times.items()}
    result = {
        "network": name,
        "tensors": len(list(network.parameters())),
        "parameters": sum(p.numel() for p in network.parameters()),
        "updates_per_round": updates,
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "seconds_per_update": times,
        "median_seconds_per_update": medians,
        "per_parameter_over_foreach": medians["per parameter (before)"]
        / medians["foreach (WarmupEMA)"],
        "same_weights": same,
    }
    print(json.dumps(result, indent=1))
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "ema_cost.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
