"""Does one reflow step straighten the flow? (Liu et al. 2023, sec. 2.2: 2-rectified flow.)

Per data set (toy2d's 8-Gaussian ring, the embedded digits) two runs of equal training steps:

- ``flow``: flow matching on the data for 2 S steps (``+experiment=flow_matching_cifar10``
  with the data set's offline network), the fair baseline;
- ``reflow``: the same for S steps, then P pairs (z, x) drawn by its probability flow (RK45) with
  its EMA weights, and S more steps on the pairs (``+experiment=rectified_flow_reflow``).

Both then draw the same samples (the same prior draws) with Euler at 1, 2, 4 and 8 steps and
with RK45 (``sampler=ode``), each scored by the data set's metric (toy2d: sliced Wasserstein
SW_2 to held-out data; digits: fid_digits and the digits classifier's confident fraction),
and the straightness is measured directly: the mean distance between each one-step Euler
sample and the RK45 sample from the same z (0 for perfectly straight paths).

Usage: ``python experiments/reflow_straightness.py [--data toy2d digits] [--quick]``
(``--quick``: S = 150 steps, 256 pairs, 64 samples). Writes
``experiments/results/reflow_straightness.json`` and ``.png`` (``_quick`` suffixes); run
folders go to ``experiments/results/reflow_runs/`` (ignored by git) and are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusion_lab.sample import load_run

RESULTS = Path(__file__).resolve().parent / "results"
#: (overrides, S, pairs, samples) per data set: the default run's optimiser on both runs.
SETTINGS = {
    "toy2d": (["data=toy2d", "network=mlp", "method.model_range=null", "final_samples=0"],
              3000, 10_000, 2000),
    "digits": (["data=digits", "network=unet_small", "final_samples=0"], 2000, 4096, 256),
}  # fmt: skip
COMMON = ["optimizer.lr=2e-3", "method.warmup_steps=100", "method.num_eval_samples=0",
          "trainer.enable_progress_bar=false"]  # fmt: skip
EULER_STEPS = (1, 2, 4, 8)


def train(folder: Path, experiment: str, overrides: list[str]) -> float:
    """One run into ``folder`` (reused when its checkpoint exists); its seconds (0 if reused)."""
    if (folder / "checkpoints" / "last.ckpt").is_file():
        return 0.0
    command = [sys.executable, "-m", "diffusion_lab.run", f"+experiment={experiment}",
               f"hydra.run.dir={folder}", *COMMON, *overrides]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{experiment} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def draw(folder: Path, sampler: list[str], num_samples: int) -> tuple[torch.Tensor, dict]:
    """``num_samples`` samples of the run with ``sampler`` overrides, and their metrics."""
    _, method, datamodule = load_run(folder, [*sampler, "sampler.progress=false"])
    datamodule.setup("fit")
    samples, nfe = method.generate(num_samples, datamodule.data_shape)
    metrics = method.sample_metrics(samples, datamodule)
    keep = ("sliced_wasserstein", "fid_digits", "coverage_confident_fraction")
    return samples, {"nfe": nfe, **{k: float(v) for k, v in metrics.items() if k in keep}}


def study(name: str, quick: bool, root: Path) -> dict:
    overrides, steps, pairs, num_samples = SETTINGS[name]
    if quick:
        steps, pairs, num_samples = 150, 256, 64
    folders = {"flow": root / f"{name}_flow", "reflow": root / f"{name}_reflow"}
    seconds = {
        "flow": train(folders["flow"], "flow_matching_cifar10",
                      [*overrides, f"trainer.max_steps={2 * steps}"]),
        "reflow": train(folders["reflow"], "rectified_flow_reflow",
                        [*overrides, f"trainer.max_steps={2 * steps}",
                         f"method.reflow_step={steps}", f"method.num_pairs={pairs}"]),
    }  # fmt: skip
    runs = {}
    for run, folder in folders.items():
        reference, ode = draw(folder, ["sampler=ode"], num_samples)
        rows = {"ode": ode}
        for n in EULER_STEPS:
            samples, metrics = draw(folder, ["sampler=euler", f"sampler.steps={n}"], num_samples)
            if n == 1:
                deviation = (samples - reference).flatten(1).norm(dim=1).mean()
                metrics["one_step_deviation"] = float(deviation)
            rows[f"euler_{n}"] = metrics
        runs[run] = {"train_seconds": seconds[run], "samplers": rows}
        print(name, run, json.dumps(rows), flush=True)
    return {"steps_each_stage": steps, "pairs": pairs, "num_samples": num_samples, "runs": runs}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        metric = "sliced_wasserstein" if name == "toy2d" else "fid_digits"
        for run, record in result["runs"].items():
            rows = record["samplers"]
            ax.plot(EULER_STEPS, [rows[f"euler_{n}"][metric] for n in EULER_STEPS], "o-",
                    label=f"{run} (Euler)")  # fmt: skip
            ax.axhline(rows["ode"][metric], ls="--", lw=0.8, color=ax.lines[-1].get_color(),
                       label=f"{run} (RK45, {rows['ode']['nfe']} NFE)")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("Euler steps (NFE)")
        ax.set_ylabel(metric)
        ax.set_title(f"{name}: {result['steps_each_stage']} + {result['steps_each_stage']} steps")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    root = RESULTS / f"reflow_runs{suffix}"
    results = {name: study(name, args.quick, root) for name in args.data}
    out = RESULTS / f"reflow_straightness{suffix}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / f"reflow_straightness{suffix}.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
