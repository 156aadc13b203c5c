"""Soft Diffusion ablations at CPU scale on 16x16 digits (Daras et al. 2022, sec. 4-5, App. F;
issue 10 item 7).

Models, each trained for the same budget from ``+experiment=soft_blur_celeba`` with its offline
overrides (``data=digits data.image_size=16 network=ncsnpp_small process.blur_max=6.0``; NCSN++
conditioned on t, residual to the clean image) and a CPU schedule common to all (Adam 1e-3 after
100 warm-up steps, EMA 0.999, batch 128, 600 steps), one per seed:

- ``soft``: Soft Score Matching (eq. 12), blur levels on the shortest Wasserstein path (sec. 3.3);
- ``cold``: the Cold Diffusion loss (the same without C_t, sec. 3.1) instead;
- ``mse``: the MSE-matched blur schedule of App. F.1.2 (eq. 45) instead;
- ``ve``: the VE SDE (``+experiment=sde_ve_cifar10`` offline: the same NCSN++ with Fourier features
  of log sigma, sigma 0.01 -> 10, continuous DSM), the paper's baseline at equal NFE.

Sampling (128 samples a setting, the EMA weights): ``soft`` with the Momentum Sampler (Alg. 2), the
Naive Sampler (Alg. 1) and the probability-flow Momentum Sampler (eq. 44) at 280 steps, and with
its two fitted priors (mean colour, blurred data); ``cold`` and ``mse`` with Momentum at 280; the
NFE curve of ``soft`` (Momentum) against ``ve`` (reverse-diffusion predictor, no corrector) at
10-280 steps. Scores: fid_digits against the 180 test digits, the digits classifier's class
coverage, and the mean pairwise distance of the samples (diversity; real digits' for scale).
Mean and standard deviation over the seeds.

Usage: ``python experiments/soft_ablations.py [--quick]`` (``--quick``: one seed, 60 training
steps, 32 samples, a smoke test of the pipeline, minutes); the README's table comes from the
defaults. Writes ``experiments/results/soft_ablations.json`` and ``soft_ablations.png``; the
trained runs go to ``experiments/results/soft_runs/`` (not tracked).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "soft_runs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SOFT = ["+experiment=soft_blur_celeba", "data=digits", "data.image_size=16",
        "network=ncsnpp_small", "process.blur_max=6.0"]  # fmt: skip
VE = ["+experiment=sde_ve_cifar10", "data=digits", "data.image_size=16", "network=ncsnpp_small",
      "process.sigma_max=10"]  # fmt: skip
CPU_SCHEDULE = ["optimizer.lr=1e-3", "method.warmup_steps=100", "callbacks.ema.decay=0.999",
                "data.batch_size=128", "trainer=cpu", "final_samples=0",
                "method.num_eval_samples=0", "trainer.enable_progress_bar=false"]  # fmt: skip
MODELS = {
    "soft": SOFT,
    "cold": [*SOFT, "loss=cold"],
    "mse": [*SOFT, "process/blur_schedule=soft_mse_matched"],
    "ve": VE,
}
NFE_STEPS = [10, 35, 70, 140, 280]


def train(model: str, seed: int, steps: int) -> float:
    """Train one model into RUNS/<model>_seed<seed>: reused when its checkpoint has ``steps``
    steps, resumed (exactly: the framework's guarantee) when it has fewer."""
    run_dir = RUNS / f"{model}_seed{seed}"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    done = torch.load(ckpt, weights_only=True, mmap=True)["global_step"] if ckpt.is_file() else 0
    if done > steps:
        raise SystemExit(f"{run_dir} holds {done} steps, more than --steps {steps}: delete it")
    start = time.time()
    if done < steps:
        command = [sys.executable, "-m", "diffusion_lab.run", *MODELS[model], *CPU_SCHEDULE,
                   f"trainer.max_steps={steps}", f"seed={seed}", f"hydra.run.dir={run_dir}",
                   *(["ckpt_path=last"] if done else [])]  # fmt: skip
        subprocess.run(command, check=True, env=ENV, stdout=subprocess.DEVNULL)
    return time.time() - start


def diversity(samples: torch.Tensor) -> float:
    """Mean pairwise Euclidean distance of the samples (flattened)."""
    return float(torch.pdist(samples.flatten(1).double()).mean())


def settings(model: str) -> dict[str, tuple[str, int, str]]:
    """name -> (sampler, steps, prior) for one model."""
    if model == "soft":
        out = {
            "momentum": ("soft_momentum", 280, "mean_colour"),
            "naive": ("soft_naive", 280, "mean_colour"),
            "pf_momentum": ("soft_pf_momentum", 280, "mean_colour"),
            "prior_blurred_data": ("soft_momentum", 280, "blurred_data"),
        }
        out.update({f"nfe_{s}": ("soft_momentum", s, "mean_colour") for s in NFE_STEPS[:-1]})
        return out
    if model == "ve":
        return {f"nfe_{s}": ("reverse_diffusion", s, "") for s in NFE_STEPS}
    return {"momentum": ("soft_momentum", 280, "mean_colour")}


def evaluate(model: str, seed: int, n: int) -> dict:
    """Every sampling setting of one trained run, in this process."""
    from diffusion_lab.metrics.coverage import class_coverage
    from diffusion_lab.metrics.fid import compute_fid
    from diffusion_lab.sample import load_run
    from diffusion_lab.samplers import pc, soft

    torch.set_num_threads(1)
    _, method, datamodule = load_run(RUNS / f"{model}_seed{seed}", [])
    reference = datamodule.reference_samples(10000)
    samplers = {
        "soft_momentum": soft.soft_momentum,
        "soft_naive": soft.soft_naive,
        "soft_pf_momentum": soft.soft_pf_momentum,
        "reverse_diffusion": pc.reverse_diffusion,
    }
    records = {}
    for name, (sampler, steps, prior) in settings(model).items():
        if prior:
            method.process.prior = prior
        method.sampler = functools.partial(samplers[sampler], steps=steps, progress=False)
        start = time.time()
        samples, nfe = method.generate(n, sample_shape=datamodule.data_shape)
        coverage = class_coverage(samples)
        records[name] = {
            "fid_digits": compute_fid(samples, reference)["fid_digits"],
            "confident": coverage["confident_fraction"],
            "classes": coverage["classes_present"],
            "diversity": diversity(samples),
            "nfe": nfe,
            "seconds": time.time() - start,
        }
        torch.save(samples[:32], RUNS / f"{model}_seed{seed}" / f"samples_{name}.pt")
    records["_reference"] = {"diversity": diversity(reference[:n]), "n_reference": len(reference)}
    return records


def job(model: str, seed: int, steps: int, n: int) -> dict:
    seconds = train(model, seed, steps)
    command = [
        sys.executable,
        __file__,
        "--runs",
        str(RUNS),
        "--eval-one",
        model,
        str(seed),
        str(n),
    ]
    out = subprocess.run(command, check=True, env=ENV, capture_output=True, text=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    print(f"{model} seed {seed}: trained {seconds:.0f} s; "
          + ", ".join(f"{k} {v['fid_digits']:.1f}" for k, v in record.items() if "fid_digits" in v),
          flush=True)  # fmt: skip
    return {"model": model, "seed": seed, "train_seconds": seconds, "settings": record}


def summarise(jobs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """model/setting -> metric -> mean and std over the seeds."""
    table: dict[str, dict[str, list[float]]] = {}
    for record in jobs:
        for name, values in record["settings"].items():
            if name.startswith("_"):
                continue
            row = table.setdefault(f"{record['model']}/{name}", {})
            for metric in ("fid_digits", "confident", "classes", "diversity", "nfe"):
                row.setdefault(metric, []).append(float(values[metric]))
    return {
        key: {
            metric: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
            for metric, v in row.items()
        }
        for key, row in table.items()
    }


def plot(summary: dict, path: Path) -> None:
    """Left: the ablations' fid_digits (mean and std over seeds); right: fid_digits against NFE."""
    bars = ["soft/momentum", "soft/naive", "soft/pf_momentum", "cold/momentum", "mse/momentum",
            "soft/prior_blurred_data"]  # fmt: skip
    bars = [b for b in bars if b in summary]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    means = [summary[b]["fid_digits"]["mean"] for b in bars]
    stds = [summary[b]["fid_digits"]["std"] for b in bars]
    left.bar(range(len(bars)), means, yerr=stds, capsize=4)
    left.set_xticks(range(len(bars)), [b.replace("/", "\n") for b in bars], fontsize=8)
    left.set_ylabel("fid_digits (lower is better)")
    left.set_title("ablations, 280 steps")
    for model, label, key in (("soft", "Soft Diffusion, Momentum", "momentum"),
                              ("ve", "VE SDE, reverse diffusion", None)):  # fmt: skip
        points = []
        for steps in NFE_STEPS:
            name = f"{model}/nfe_{steps}" if key is None or steps != 280 else f"{model}/{key}"
            if name in summary:
                points.append((summary[name]["nfe"]["mean"], summary[name]["fid_digits"]))
        if points:
            right.errorbar([p[0] for p in points], [p[1]["mean"] for p in points],
                           yerr=[p[1]["std"] for p in points], marker="o", label=label)  # fmt: skip
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("NFE")
    right.set_ylabel("fid_digits")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 60 steps, 32 samples")
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--jobs", type=int, default=2, help="models trained at a time")
    parser.add_argument("--eval-one", nargs=3, metavar=("MODEL", "SEED", "N"))
    parser.add_argument("--runs", type=Path, default=None, help="folder of the trained runs")
    args = parser.parse_args()
    global RUNS
    if args.quick:
        args.steps, args.seeds, args.samples = 60, [0], 32
        RUNS = RESULTS / "soft_runs_quick"
    RUNS = args.runs or RUNS
    if args.eval_one:
        model, seed, n = args.eval_one
        print(json.dumps(evaluate(model, int(seed), int(n))))
        return
    RUNS.mkdir(parents=True, exist_ok=True)
    start = time.time()
    tasks = [(m, s) for s in args.seeds for m in MODELS]
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = list(pool.map(lambda t: job(*t, args.steps, args.samples), tasks))
    summary = summarise(jobs)
    out = {
        "command": " ".join(sys.argv),
        "training_steps": args.steps,
        "seeds": args.seeds,
        "samples": args.samples,
        "models": {m: MODELS[m] + CPU_SCHEDULE for m in MODELS},
        "summary": summary,
        "jobs": jobs,
        "wall_seconds": time.time() - start,
    }
    name = "soft_ablations_quick" if args.quick else "soft_ablations"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(summary, RESULTS / f"{name}.png")
    for key, row in sorted(summary.items()):
        fid, conf, div = row["fid_digits"], row["confident"], row["diversity"]
        print(f"{key:28s} fid_digits {fid['mean']:8.1f} +- {fid['std']:6.1f}  "
              f"confident {conf['mean']:.2f}  diversity {div['mean']:.2f}  "
              f"nfe {row['nfe']['mean']:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
