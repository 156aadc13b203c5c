"""Gaussian blur: the separable and FFT implementations side by side (issue 10, item 1).

Soft Diffusion's CelebA-64 blur (Daras et al. App. D): 64x64 images, kernel half size 80 (161
taps, larger than the image: ``GaussianBlur`` crops it to half size 63 exactly, since further
taps only ever meet the zero padding), batch 128, 3 channels, one std per example drawn from
[0.01, 23]. Every method runs on the same input in one process, interleaved, with ``--repeats``
timed calls each after a warm-up; the median is reported, and the ratio of each to the fastest.
The methods must agree (the max difference is reported too). The fastest is
``operators.DEFAULT_BLUR_METHOD``.

Usage: ``python experiments/blur_benchmark.py [--repeats 15] [--device cpu] [--threads N]``.
Writes ``experiments/results/blur_benchmark.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from diffusion_lab.operators import BLUR_METHODS, DEFAULT_BLUR_METHOD, GaussianBlur

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--half-size", type=int, default=80)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--out", type=Path, default=RESULTS / "blur_benchmark.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    std = (0.01 + (23.0 - 0.01) * torch.rand(args.batch, generator=g)).to(device)
    ops = {name: GaussianBlur(std, args.half_size, name) for name in BLUR_METHODS}

    def run(name: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        ops[name].apply(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    outputs = {name: op.apply(x) for name, op in ops.items()}  # warm-up, and agreement
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(args.repeats):
        for name in ops:  # interleaved, so that a load change hits every method alike
            times[name].append(run(name))
    median = {name: statistics.median(v) for name, v in times.items()}
    fastest = min(median, key=median.get)
    reference = outputs["separable_conv"]
    result = {
        "setting": {
            "batch": args.batch,
            "channels": 3,
            "image_size": args.size,
            "kernel_half_size": args.half_size,
            "kernel_taps": 2 * args.half_size + 1,
            "effective_half_size": min(args.half_size, args.size - 1),
            "std_range": [0.01, 23.0],
            "dtype": "float32",
            "repeats": args.repeats,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },  # fmt: skip
        "median_seconds": median,
        "all_seconds": times,
        "ratio_to_fastest": {name: m / median[fastest] for name, m in median.items()},
        "fft_over_separable": median["fft"] / median["separable"],
        "fastest": fastest,
        "default_method": DEFAULT_BLUR_METHOD,
        "max_abs_difference_to_separable_conv": {
            name: float((out - reference).abs().max()) for name, out in outputs.items()
        },
    }
    for name in ops:
        print(
            f"{name:15s} median {1e3 * median[name]:8.1f} ms  "
            f"x{result['ratio_to_fastest'][name]:.2f} of the fastest"
        )
    print(f"fastest: {fastest}; default: {DEFAULT_BLUR_METHOD}; "
          f"fft / separable = {result['fft_over_separable']:.2f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
