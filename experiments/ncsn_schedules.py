"""NCSN noise schedules on digits (Spagnoletti et al. 2024, sec. 7; issue 4 item 6).

One NCSN model (RefineNet, DSM with lambda = sigma^2, L = 10 levels to sigma_L = 0.01) per schedule
(geometric, linear, cosine, squared cosine, sigmoid) and per sigma_1: small (1.0, NCSN's MNIST setup
and the paper's main one) and large (4.815, the NCSNv2 Technique 1 value for 8x8 digits in [0, 1]:
the largest pairwise distance of the training set, ``python -m diffusion_lab.noise_levels``).
The paper's large sigma_1 = 30 comes with many levels; at L = 10 and CPU scale we keep L fixed so
that only sigma_1 changes, and take sigma_1 from Technique 1 rather than 30 (for 8x8 digits no two
images are further apart than 4.8, so a larger sigma_1 only adds levels of pure noise).

Each model is trained by ``python -m diffusion_lab.run +experiment=ncsn_mnist data=digits
network=refinenet_small ...`` into ``experiments/results/ncsn_runs/NAME_sigmaX``, then sampled with
annealed Langevin (T steps per level, from U[0, 1]^D as NCSN does, no final denoising step):
eps = 2e-5 for sigma_1 = 1 (the paper's / NCSN's value) and Technique 4's eps for the geometric ratio
of the large-sigma_1 levels. Quality: fid_digits against held-out digits and the per-class coverage
of the digits classifier (Fig. 13-14 analogue). Also plots the five sigma curves (Fig. 1 analogue).

Usage: ``python experiments/ncsn_schedules.py [--quick] [--sweep-check]``; the README's table
came from ``--steps 1500 --samples 256 --steps-each 100 --sweep-check``. ``--sweep-check`` also
runs the command-line multirun sweep over the five schedules and records its exit status.
Writes ``experiments/results/ncsn_schedules.json``, ``ncsn_schedules_sigmas.png``,
``ncsn_schedules_coverage.png`` and ``ncsn_schedules_samples.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from diffusion_lab.schedules import sigma_schedule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "ncsn_runs"
SCHEDULES = ["geometric", "linear", "cosine", "squared_cosine", "sigmoid"]
SIGMA_MIN, LEVELS = 0.01, 10
SIGMA_SMALL, SIGMA_LARGE = 1.0, 4.815  # the large one: Technique 1 for 8x8 digits (ve_ncsnv2.yaml)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_name(schedule: str, sigma_max: float) -> str:
    return f"{schedule}_sigma{sigma_max:g}"


def sampler_settings(sigma_max: float, n_steps_each: int) -> dict:
    """T steps per level; eps = 2e-5 at sigma_1 = 1 (NCSN), Technique 4 for the large sigma_1."""
    if sigma_max == SIGMA_SMALL:
        return {"n_steps_each": n_steps_each, "step_lr": 2e-5, "denoise": False, "eps_rule": "NCSN"}
    from diffusion_lab.schedules.ncsnv2 import langevin_step_size

    gamma = (sigma_max / SIGMA_MIN) ** (1 / (LEVELS - 1))
    eps = langevin_step_size(n_steps_each, gamma, SIGMA_MIN)
    return {
        "n_steps_each": n_steps_each,
        "step_lr": eps,
        "denoise": False,
        "eps_rule": f"Technique 4 (gamma={gamma:.3f})",
    }


def train(schedule: str, sigma_max: float, max_steps: int) -> float:
    run_dir = RUNS / run_name(schedule, sigma_max)
    start = time.time()
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        command = [sys.executable, "-m", "diffusion_lab.run", "+experiment=ncsn_mnist",
                   "data=digits", "network=refinenet_small", f"schedule={schedule}",
                   f"process.sigma_max={sigma_max}", f"trainer.max_steps={max_steps}",
                   "final_samples=0", "method.num_eval_samples=0",
                   "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]  # fmt: skip
        subprocess.run(command, check=True, env=ENV, stdout=subprocess.DEVNULL)
    return time.time() - start


def evaluate(schedule: str, sigma_max: float, n: int, n_steps_each: int, seed: int = 0) -> dict:
    """Samples, fid_digits and class coverage of one trained run (in this process)."""
    from diffusion_lab.metrics.coverage import class_coverage
    from diffusion_lab.metrics.fid import compute_fid
    from diffusion_lab.sample import load_run
    from diffusion_lab.samplers.annealed_langevin import annealed_langevin

    torch.set_num_threads(1)
    run_dir = RUNS / run_name(schedule, sigma_max)
    _, method, datamodule = load_run(run_dir, [])
    method.eval()
    settings = sampler_settings(sigma_max, n_steps_each)
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand((n, *datamodule.data_shape), generator=generator)  # NCSN: start in U[0, 1]^D
    start = time.time()
    with torch.no_grad():
        result = annealed_langevin(
            method.score_fn(), method.process, x0, generator=generator, progress=False,
            n_steps_each=settings["n_steps_each"], step_lr=settings["step_lr"],
            denoise=settings["denoise"],
        )  # fmt: skip
    samples = method.to_data_range(result.samples).clamp(0, 1)
    sample_seconds = time.time() - start
    reference = datamodule.reference_samples(10000)
    fid = compute_fid(samples, reference)["fid_digits"]
    coverage = class_coverage(samples)
    torch.save(samples[:10], run_dir / "grid_samples.pt")
    return {
        "fid_digits": fid,
        "n_samples": n,
        "n_reference": len(reference),
        "nfe": result.nfe,
        "sampler": settings,
        "sample_seconds": sample_seconds,
        "coverage": coverage,
    }


def job(schedule: str, sigma_max: float, max_steps: int, n: int, n_steps_each: int) -> dict:
    train_seconds = train(schedule, sigma_max, max_steps)
    command = [sys.executable, __file__, "--eval-one", schedule, str(sigma_max), str(n),
               str(n_steps_each)]  # fmt: skip
    out = subprocess.run(command, check=True, env=ENV, capture_output=True, text=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    record.update(sigma_max=sigma_max, sigma_min=SIGMA_MIN, levels=LEVELS)
    record.update(training_steps=max_steps, train_seconds=train_seconds)
    cov = record["coverage"]
    print(f"{run_name(schedule, sigma_max):28s} fid_digits={record['fid_digits']:7.2f} "
          f"confident={cov['confident_fraction']:.2f} classes={cov['classes_present']} "
          f"train {train_seconds:.0f}s", flush=True)  # fmt: skip
    return record


def sweep_check() -> dict:
    command = [sys.executable, "-m", "diffusion_lab.run", "-m", "+experiment=ncsn_mnist",
               "data=digits", "network=refinenet_small", "trainer=debug",
               "schedule=geometric,linear,cosine,squared_cosine,sigmoid",
               "trainer.max_steps=20", "hydra.sweep.dir=/tmp/ncsn_sweep"]  # fmt: skip
    start = time.time()
    proc = subprocess.run(command, env=ENV, capture_output=True, text=True)
    runs = sorted(p.name for p in Path("/tmp/ncsn_sweep").glob("*") if p.is_dir())
    return {"command": " ".join(command[1:]), "returncode": proc.returncode, "runs": runs,
            "seconds": time.time() - start}  # fmt: skip


def plot_sigmas(path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sigma_max in zip(axes, [SIGMA_SMALL, SIGMA_LARGE]):
        for name in SCHEDULES:
            sigmas = sigma_schedule(name, sigma_max, SIGMA_MIN, LEVELS)
            ax.plot(range(1, LEVELS + 1), sigmas.numpy(), marker="o", label=name)
        ax.set(yscale="log", xlabel="level i", ylabel="sigma_i",
               title=f"sigma_1 = {sigma_max:g}, sigma_L = {SIGMA_MIN}, L = {LEVELS}")  # fmt: skip
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_coverage(results: dict, path: Path) -> None:
    sigmas = [SIGMA_SMALL, SIGMA_LARGE]
    fig, axes = plt.subplots(len(sigmas), len(SCHEDULES), figsize=(16, 5.5), squeeze=False)
    for row, sigma_max in enumerate(sigmas):
        for col, name in enumerate(SCHEDULES):
            ax = axes[row][col]
            record = results["runs"].get(run_name(name, sigma_max))
            if record is None:
                ax.set_axis_off()
                ax.set_title(f"{name}, sigma_1={sigma_max:g}: not run", fontsize=8)
                continue
            cov = record["coverage"]
            ax.bar(range(10), cov["counts_all"], color="lightgray", label="argmax")
            ax.bar(range(10), cov["counts"], color="tab:blue", label="p >= 0.9")
            ax.set_xticks(range(10))
            ax.set_title(f"{name}, sigma_1={sigma_max:g}\nFID {record['fid_digits']:.1f}, "
                         f"conf {cov['confident_fraction']:.0%}, "
                         f"{cov['classes_present']}/10", fontsize=8)  # fmt: skip
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(path: Path) -> None:
    sigmas = [SIGMA_SMALL, SIGMA_LARGE]
    fig, axes = plt.subplots(len(SCHEDULES), len(sigmas), figsize=(10, 7), squeeze=False)
    for row, name in enumerate(SCHEDULES):
        for col, sigma_max in enumerate(sigmas):
            ax = axes[row][col]
            ax.set_axis_off()
            grid = RUNS / run_name(name, sigma_max) / "grid_samples.pt"
            ax.set_title(f"{name}, sigma_1 = {sigma_max:g}", fontsize=8)
            if not grid.is_file():
                continue
            x = torch.load(grid)[:, 0]  # (10, H, W)
            ax.imshow(torch.cat(list(x), dim=1).numpy(), cmap="gray", vmin=0, vmax=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--eval-one":
        name, sigma_max, n, steps_each = sys.argv[2], float(sys.argv[3]), *map(int, sys.argv[4:6])
        print(json.dumps(evaluate(name, sigma_max, n, steps_each)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU budget: ~25 min for 10 models")
    parser.add_argument("--steps", type=int, help="training steps (default 200 quick, 3000 full)")
    parser.add_argument("--samples", type=int, help="samples per model (256 quick, 1000 full)")
    parser.add_argument("--steps-each", type=int, help="Langevin steps T per level (10 quick, 100)")
    parser.add_argument("--sweep-check", action="store_true", help="also run the CLI multirun")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    args = parser.parse_args()
    max_steps = args.steps or (200 if args.quick else 3000)
    n = args.samples or (256 if args.quick else 1000)
    steps_each = args.steps_each or (10 if args.quick else 100)  # T = 100: the paper's setting
    start = time.time()
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_sigmas(RESULTS / "ncsn_schedules_sigmas.png")
    tasks = [(s, sig) for sig in [SIGMA_SMALL, SIGMA_LARGE] for s in SCHEDULES]  # small first
    results: dict = {"quick": args.quick, "levels": LEVELS, "sigma_min": SIGMA_MIN,
                     "sigma_small": SIGMA_SMALL, "sigma_large": SIGMA_LARGE,
                     "sigmas": {f"{s}_sigma{sig:g}":
                                sigma_schedule(s, sig, SIGMA_MIN, LEVELS).tolist()
                                for s, sig in tasks},
                     "runs": {}}  # fmt: skip

    def save() -> None:
        results["seconds"] = time.time() - start
        (RESULTS / "ncsn_schedules.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_coverage(results, RESULTS / "ncsn_schedules_coverage.png")
        plot_samples(RESULTS / "ncsn_schedules_samples.png")

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            run_name(s, sig): pool.submit(job, s, sig, max_steps, n, steps_each) for s, sig in tasks
        }
        for key, future in futures.items():
            try:
                results["runs"][key] = future.result()
            except Exception as error:  # record and go on: partial results beat none
                results.setdefault("failed", {})[key] = repr(error)
            save()
    fids = {k: v["fid_digits"] for k, v in results["runs"].items()}
    for sig in [SIGMA_SMALL, SIGMA_LARGE]:
        ranked = sorted((fids[k], k) for k in fids if k.endswith(f"_sigma{sig:g}"))
        results[f"ranking_sigma{sig:g}"] = [k for _, k in ranked]
    if args.sweep_check:
        results["sweep_check"] = sweep_check()
    save()
    print(f"wrote {RESULTS / 'ncsn_schedules.json'} in {results['seconds']:.0f} s")
    if not math.isfinite(results["seconds"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
