"""Classifier-free guidance on digits (Ho & Salimans 2022): the asked class against diversity.

One conditional model is trained (``+experiment=cfg_digits``: the default run's DDPM with a class
embedding and label dropout 0.1), then 256 samples (sample i for class i mod 10) are drawn from
its EMA weights at each guidance scale w of uncond + w (cond - uncond), the same seeds at every
w. Recorded per w: the digits classifier's accuracy on the asked class (argmax = the class),
the fraction classified with confidence >= 0.9, and fid_digits against the 180 held-out test
digits (the real digits' own fid_digits at 256 samples is 152.6 +- 19.2: ``digits_fid_scale.py``).

Usage: ``python experiments/cfg_digits.py [--scales 0 1 2 4] [--seed 0] [--quick]``
(``--quick``: 200 training steps, 64 samples). Writes ``experiments/results/cfg_digits.json``
and ``cfg_digits.png`` (``_quick`` suffixes for ``--quick``); the run folder goes to
``experiments/results/cfg_digits_runs/`` (ignored by git) and is reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusion_lab.metrics.digits_classifier import get_digits_classifier
from diffusion_lab.sample import load_run

RESULTS = Path(__file__).resolve().parent / "results"


def train(folder: Path, seed: int, quick: bool) -> float:
    """Train the conditional model into ``folder`` (reused when its checkpoint exists);
    returns the seconds it took (0 when reused)."""
    if (folder / "checkpoints" / "last.ckpt").is_file():
        return 0.0
    extra = ["trainer.max_steps=200"] if quick else []
    command = [sys.executable, "-m", "diffusion_lab.run", "+experiment=cfg_digits",
               f"hydra.run.dir={folder}", f"seed={seed}", "final_samples=0",
               "trainer.enable_progress_bar=false", *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"training failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def score_scale(folder: Path, scale: float, num_samples: int) -> dict[str, float]:
    """Draw ``num_samples`` at guidance scale ``scale`` and score them."""
    overrides = [f"method.guidance_scale={scale}", "sampler.progress=false"]
    _, method, datamodule = load_run(folder, overrides)
    datamodule.setup("fit")
    samples, nfe = method.generate(num_samples, datamodule.data_shape)
    asked = torch.arange(num_samples) % method.num_classes
    with torch.no_grad():
        probs = get_digits_classifier()(samples.float()).softmax(dim=1)
    top, label = probs.max(dim=1)
    metrics = method.sample_metrics(samples, datamodule)
    return {
        "guidance_scale": scale,
        "class_accuracy": float((label == asked).float().mean()),
        "confident_fraction": float((top >= 0.9).float().mean()),
        "confident_and_right": float(((top >= 0.9) & (label == asked)).float().mean()),
        "fid_digits": float(metrics.get("fid_digits", float("nan"))),
        "nfe": float(nfe),
    }


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy on the asked class and fid_digits against the guidance scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["guidance_scale"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(scales, [r["class_accuracy"] for r in rows], "o-", label="argmax = asked class")
    left.plot(scales, [r["confident_and_right"] for r in rows], "s--", label="... with p >= 0.9")
    left.set_xlabel("guidance scale w")
    left.set_ylabel("fraction of samples")
    left.legend()
    right.plot(scales, [r["fid_digits"] for r in rows], "o-", color="C3")
    right.set_xlabel("guidance scale w")
    right.set_ylabel("fid_digits (lower: closer to real)")
    fig.suptitle("Classifier-free guidance on digits (256 samples, 10 classes)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    folder = RESULTS / "cfg_digits_runs" / f"seed{args.seed}{suffix}"
    seconds = train(folder, args.seed, args.quick)
    num_samples = 64 if args.quick else 256
    rows = [score_scale(folder, scale, num_samples) for scale in args.scales]
    for row in rows:
        print(json.dumps(row))
    record = {"seed": args.seed, "num_samples": num_samples, "train_seconds": seconds,
              "quick": args.quick, "rows": rows}  # fmt: skip
    (RESULTS / f"cfg_digits{suffix}.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(rows, RESULTS / f"cfg_digits{suffix}.png")


if __name__ == "__main__":
    main()
