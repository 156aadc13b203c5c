"""Sample quality against the number of score evaluations (NFE) for every sampler.

Two settings (Score SDE issue, item 8):

- ``toy2d``: the 8-Gaussian mixture ``gmm8`` driven by its exact score under each process, so the
  only error is the sampler's; quality is the sliced Wasserstein distance SW_2 to exact samples,
  shown against the floor SW_2(exact, exact) of two independent draws of the same size.
- ``digits``: a DDPM (VP, epsilon) model trained by ``python -m diffusion_lab.run`` (``--run-dir``;
  without it one is trained first); quality is fid_digits of the samples against held-out digits.

Usage: ``python experiments/sampler_nfe.py [--quick] [--run-dir DIR] [--skip-digits]``.
Writes ``experiments/results/sampler_nfe.json`` and ``sampler_nfe.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from diffusion_lab.data.toy2d import make_toy2d  # noqa: E402
from diffusion_lab.metrics.sliced_wasserstein import sliced_wasserstein  # noqa: E402
from diffusion_lab.processes.sde import SDE, VESDE, VPSDE  # noqa: E402
from diffusion_lab.samplers.ancestral import ancestral  # noqa: E402
from diffusion_lab.samplers.annealed_langevin import annealed_langevin  # noqa: E402
from diffusion_lab.samplers.ddim import ddim  # noqa: E402
from diffusion_lab.samplers.ode import probability_flow  # noqa: E402
from diffusion_lab.samplers.pc import (  # noqa: E402
    euler_maruyama,
    predictor_corrector,
    reverse_diffusion,
)

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = [10, 20, 50, 100, 200, 500, 1000]
QUICK_STEPS = [10, 50, 200]
TOLERANCES = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
QUICK_TOLERANCES = [1e-1, 1e-3]
LANGEVIN_STEPS_EACH = [1, 2, 5, 10, 20]
QUICK_LANGEVIN_STEPS_EACH = [1, 5]


def sampler_grid(quick: bool) -> dict[str, tuple[Callable, str, list[dict]]]:
    """Name -> (sampler, process kind, list of option sets), one option set per NFE budget."""
    steps = QUICK_STEPS if quick else STEPS
    tolerances = QUICK_TOLERANCES if quick else TOLERANCES
    langevin = QUICK_LANGEVIN_STEPS_EACH if quick else LANGEVIN_STEPS_EACH
    return {
        "ancestral": (ancestral, "vp", [{"steps": s} for s in steps]),
        "DDIM (eta=0)": (ddim, "vp", [{"steps": s} for s in steps]),
        "Euler-Maruyama": (euler_maruyama, "vp", [{"steps": s} for s in steps]),
        "reverse diffusion": (reverse_diffusion, "vp", [{"steps": s} for s in steps]),
        "PC (rev. diff. + Langevin)": (
            predictor_corrector, "vp", [{"steps": max(1, s // 2), "snr": 0.16} for s in steps]
        ),
        "probability flow (RK45)": (
            probability_flow, "vp", [{"rtol": tol, "atol": tol} for tol in tolerances]
        ),
        "annealed Langevin (L=10)": (
            annealed_langevin, "ve_ncsn", [{"n_steps_each": t, "step_lr": 5e-4} for t in langevin]
        ),
    }  # fmt: skip


def make_process(kind: str, sigma_max: float) -> SDE:
    """The process a sampler runs on: DDPM's VP chain, or NCSN's L = 10 geometric levels from
    sigma_max = 10 down to 0.05. Annealed Langevin uses step_lr 5e-4: alpha_i / sigma_i^2 =
    step_lr / sigma_L^2 = 0.2 at every level, NCSN's own ratio (2e-5 / 0.01^2)."""
    if kind == "vp":
        return VPSDE()
    return VESDE(sigma_min=0.05, sigma_max=sigma_max, num_steps=10)


def toy_study(quick: bool, n: int, seed: int = 0) -> dict:
    """SW_2 against NFE with the exact score of gmm8."""
    mixture = make_toy2d("gmm8")
    exact, _ = mixture.sample(n, torch.Generator().manual_seed(seed + 1))
    floors = []
    for k in range(5):  # the Monte-Carlo floor: exact vs independent exact draws of the same size
        other, _ = mixture.sample(n, torch.Generator().manual_seed(seed + 10 + k))
        floors.append(
            sliced_wasserstein(exact, other, generator=torch.Generator().manual_seed(seed))
        )
    floor = sum(floors) / len(floors)
    curves = {}
    for name, (sampler, kind, option_sets) in sampler_grid(quick).items():
        process = make_process(kind, sigma_max=10.0)
        points = []
        for options in option_sets:
            generator = torch.Generator().manual_seed(seed)
            result = sampler(
                mixture.score_fn(process), process, (n, 2), generator=generator, progress=False,
                **options,
            )  # fmt: skip
            distance = sliced_wasserstein(
                result.samples, exact, generator=torch.Generator().manual_seed(seed)
            )
            points.append({"nfe": result.nfe, "sw2": distance, **options})
            print(f"toy2d  {name:28s} nfe={result.nfe:5d}  SW2={distance:.4f}", flush=True)
        curves[name] = points
    return {"n_samples": n, "floor_sw2": floor, "curves": curves}


def train_digits_model(run_dir: Path, max_steps: int) -> None:
    """A DDPM model on digits with the project's defaults (the `make run` setup)."""
    command = [sys.executable, "-m", "diffusion_lab.run", f"hydra.run.dir={run_dir}",
               f"trainer.max_steps={max_steps}", "final_samples=0",
               "trainer.enable_progress_bar=false"]  # fmt: skip
    subprocess.run(command, check=True)


def digits_study(run_dir: Path, quick: bool, n: int, seed: int = 0) -> dict:
    """fid_digits against NFE for a trained VP/epsilon model on digits."""
    from diffusion_lab.metrics.fid import compute_fid
    from diffusion_lab.sample import load_run

    _, method, datamodule = load_run(run_dir, [])
    score_fn, shape = method.score_fn(), (n, *datamodule.data_shape)
    reference = datamodule.reference_samples(10000)
    train_x, _ = datamodule.tensors("train")  # real-vs-real at the same sample size
    real = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:n]]
    real_vs_real = compute_fid(real, reference)["fid_digits"]
    curves = {}
    for name, (sampler, kind, option_sets) in sampler_grid(quick).items():
        if kind != "vp":  # annealed Langevin needs an NCSN (VE) model: see ncsn_schedules.py
            continue
        points = []
        for options in option_sets:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                result = sampler(
                    score_fn, method.process, shape, generator=generator, progress=False,
                    **options,
                )  # fmt: skip
            samples = method.to_data_range(result.samples)
            fid = compute_fid(samples, reference)["fid_digits"]
            points.append({"nfe": result.nfe, "fid_digits": fid, **options})
            print(f"digits {name:28s} nfe={result.nfe:5d}  fid_digits={fid:.2f}", flush=True)
        curves[name] = points
    return {
        "run_dir": str(run_dir),
        "n_samples": n,
        "n_reference": len(reference),
        "fid_digits_real_vs_real": real_vs_real,
        "curves": curves,
    }


def plot(results: dict, path: Path) -> None:
    panels = [("toy2d", "sw2", "SW$_2$ to exact samples (gmm8, exact score)")]
    if "digits" in results:
        panels.append(("digits", "fid_digits", "fid_digits (trained DDPM on digits)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, metric, title) in zip(axes[0], panels):
        for name, points in results[key]["curves"].items():
            ax.plot([p["nfe"] for p in points], [p[metric] for p in points], marker="o", label=name)
        floor = results[key].get("floor_sw2", results[key].get("fid_digits_real_vs_real"))
        ax.axhline(
            floor,
            color="0.4",
            ls="--",
            label="exact vs exact" if key == "toy2d" else "real vs real",
        )
        ax.set(xscale="log", yscale="log", xlabel="NFE", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits: fewer budgets and samples")
    parser.add_argument("--run-dir", type=Path, help="a trained digits DDPM run folder")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    start = time.time()
    results = {"quick": args.quick, "toy2d": toy_study(quick=False, n=20000)}  # cheap: always full
    if not args.skip_digits:
        run_dir = args.run_dir or RESULTS / "nfe_digits_model"
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            train_digits_model(run_dir, max_steps=1500)
        results["digits"] = digits_study(run_dir, args.quick, n=256 if args.quick else 512)
    results["seconds"] = time.time() - start
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sampler_nfe.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "sampler_nfe.png")
    print(f"wrote {RESULTS / 'sampler_nfe.json'} and sampler_nfe.png in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
