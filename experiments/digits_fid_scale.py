"""The scale of fid_digits: real-vs-real and noise-vs-real at the default run's sample sizes.

The default run scores 256 generated digits against the 180 held-out test digits. Here the same
protocol scores 256 real training digits (an ideal generator that memorised nothing new) and 256
uniform-noise images, and the coverage the classifier gives each. The spread of real-vs-real over
``draws`` independent subsets of training digits is the metric's own sampling noise at this size:
two models whose fid_digits differ by less than it are not told apart.
Usage: ``python experiments/digits_fid_scale.py``; writes experiments/results/digits_fid_scale.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusion_lab.data.digits import DigitsDataModule
from diffusion_lab.metrics.evaluator import SampleEvaluator

RESULTS = Path(__file__).resolve().parent / "results"


def main(num_samples: int = 256, seed: int = 0, draws: int = 10) -> dict:
    datamodule = DigitsDataModule(seed=seed)
    evaluator = SampleEvaluator(["fid_digits", "kid_digits", "class_coverage"])
    train_x, _ = datamodule.tensors("train")
    generator = torch.Generator().manual_seed(seed)
    real = train_x[torch.randperm(len(train_x), generator=generator)[:num_samples]]
    noise = torch.rand(real.shape, generator=generator)
    spread = [
        evaluator(train_x[torch.randperm(len(train_x), generator=generator)[:num_samples]],
                  datamodule)["fid_digits"]
        for _ in range(draws)
    ]  # fmt: skip
    spread_t = torch.tensor(spread)
    results = {
        "protocol": f"{num_samples} images vs the {len(datamodule.tensors('test')[0])} test digits",
        "real_vs_real": evaluator(real, datamodule),
        "noise_vs_real": evaluator(noise, datamodule),
        "real_vs_real_spread": {
            "draws": draws,
            "fid_digits": spread,
            "mean": spread_t.mean().item(),
            "std": spread_t.std().item(),
            "min": spread_t.min().item(),
            "max": spread_t.max().item(),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "digits_fid_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
