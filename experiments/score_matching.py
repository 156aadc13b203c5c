"""Score matching beyond DSM, and why noise (issue 13).

Three parts, each offline by construction:

1. ``objectives``: on toy2d ``gmm8`` (8 Gaussians of std 0.5 on a circle of radius 4) perturbed at
   one small level sigma_0 = 0.1, the toy MLP learns grad log p_sigma0 (exact: the mixture
   convolved) by denoising (DSM), implicit (ISM, exact trace), sliced (SSM) and variance-reduced
   sliced (SSM-VR) score matching (one Gaussian projection, as the reference code), each weighted by sigma_0^2 and one after another in this
   process. The score error E||s_theta - grad log p||^2 is measured every ``EVAL_EVERY`` steps
   against wall-clock time, on draws of p_sigma0 (overall) and on uniform points of [-6, 6]^2
   where p_sigma0 is below 1% of its value at a mode (the low-density regions between modes).
2. ``langevin``: Spagnoletti et al. sec. 3.1.2 / Song & Ermon 2019 sec. 3.2 on ``two_modes``
   (weights 0.8 / 0.2 at (5, 5) and (-5, -5), std 1), from U[-8, 8]^2. Plain Langevin dynamics
   (Spagnoletti eq. 5, the framework's step x + eps s + sqrt(2 eps) z, eps = 0.05, 2000 steps)
   with the exact data score and with a score learned by plain SSM-VR on the clean data; then
   annealed Langevin (``samplers.annealed_langevin``; L = 10 geometric levels 20 -> 1, T = 100,
   step_lr 0.05) with the exact noise-conditional score and with models learned per level by
   DSM and by SSM-VR. Recorded: the heavy mode's weight (0.8 is right) and the learned plain
   score's error where the data are and where they are not.
3. ``digits``: NCSN on the embedded digits trained by SSM-VR (``+experiment=ncsn_ssm_digits``)
   against the same run with DSM (``loss=dsm_levels``), 1500 steps, fid_digits and the digits
   classifier's confident fraction of 256 samples.

Usage: ``python experiments/score_matching.py [--quick] [--skip-digits] [--seeds 0 1 2]``
(``--quick``: 200 steps, one seed, 1000 points, digits skipped). Writes
``experiments/results/score_matching.json`` and ``.png`` (``*_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from diffusion_lab.data.toy2d import GaussianMixture, make_toy2d  # noqa: E402
from diffusion_lab.losses.dsm import DenoisingScoreMatching  # noqa: E402
from diffusion_lab.losses.score_matching import (  # noqa: E402
    ImplicitScoreMatching,
    SlicedScoreMatching,
)
from diffusion_lab.networks.mlp import MLP  # noqa: E402
from diffusion_lab.processes.sde import VESDE  # noqa: E402
from diffusion_lab.samplers.annealed_langevin import annealed_langevin  # noqa: E402
from diffusion_lab.samplers.langevin import langevin_step  # noqa: E402
from diffusion_lab.score_model import ScoreModel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIGMA_0 = 0.1
EVAL_EVERY = 100
BATCH = 256
LR = 1e-3
FIXED = {"time_sampling": "fixed", "fixed_time": 0.0}
OBJECTIVES = {
    "DSM": lambda: DenoisingScoreMatching(**FIXED),
    "ISM (exact trace)": lambda: ImplicitScoreMatching(trace="exact", **FIXED),
    "SSM": lambda: SlicedScoreMatching(variance_reduced=False, projection="gaussian", **FIXED),
    "SSM-VR": lambda: SlicedScoreMatching(projection="gaussian", **FIXED),
}
BOX = 8.0
PLAIN_EPS, PLAIN_STEPS = 0.05, 2000
LEVELS = {"sigma_min": 1.0, "sigma_max": 20.0, "num_steps": 10}


def toy_network() -> MLP:
    """The toy MLP at half width (128, 3 layers) for CPU budgets."""
    return MLP(dim=2, hidden=128, depth=3, embedding="fourier")


def exact_score(mixture: GaussianMixture, sigma: float):
    return lambda x, t: mixture.score(x, 1.0, sigma)


def low_density_points(mixture: GaussianMixture, sigma: float, n: int, seed: int) -> torch.Tensor:
    """Uniform points of [-6, 6]^2 where p_sigma < 1% of its value at a mode centre."""
    g = torch.Generator().manual_seed(seed)
    points = (torch.rand(20 * n, 2, generator=g) * 12 - 6).double()
    peak = mixture.log_prob(mixture.means[:1], 1.0, sigma)
    keep = mixture.log_prob(points, 1.0, sigma) < peak + torch.log(torch.tensor(0.01))
    return points[keep][:n].float()


def score_error(model: ScoreModel, points: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        s = model.score(points, torch.zeros(len(points)))
    return float((s - target).pow(2).sum(1).mean())


def train(model: ScoreModel, loss, data: torch.Tensor, steps: int, seed: int, probe=None):
    """Adam on minibatches of ``data``; ``probe(step, seconds)`` every EVAL_EVERY steps."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    seconds = 0.0
    for step in range(1, steps + 1):
        batch = data[torch.randint(len(data), (BATCH,), generator=g)]
        start = time.perf_counter()
        optimizer.zero_grad()
        loss(model, batch).backward()
        optimizer.step()
        seconds += time.perf_counter() - start
        if probe is not None and step % EVAL_EVERY == 0:
            probe(step, seconds)
    return seconds


def objectives_study(steps: int, seeds: list[int], n: int) -> dict:
    mixture = make_toy2d("gmm8")
    process = VESDE(sigma_min=SIGMA_0, sigma_max=1.0)  # t = 0 is sigma_0
    data, _ = mixture.sample(10_000, torch.Generator().manual_seed(0))
    on_data = (mixture.sample(n, torch.Generator().manual_seed(1))[0]
               + SIGMA_0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(2)))  # fmt: skip
    between = low_density_points(mixture, SIGMA_0, n, seed=3)
    targets = {"overall": (on_data, mixture.score(on_data, 1.0, SIGMA_0)),
               "low_density": (between, mixture.score(between, 1.0, SIGMA_0))}  # fmt: skip
    scale = {k: float(target.pow(2).sum(1).mean()) for k, (_, target) in targets.items()}
    out: dict = {"sigma_0": SIGMA_0, "steps": steps, "target_mean_square": scale, "curves": {}}
    for name, make_loss in OBJECTIVES.items():
        runs = []
        for seed in seeds:
            torch.manual_seed(seed)
            model = ScoreModel(toy_network(), process, "score_over_sigma")
            curve: list[dict] = []

            def probe(step: int, seconds: float, model=model, curve=curve) -> None:
                errors = {k: score_error(model, p, target) for k, (p, target) in targets.items()}
                curve.append({"step": step, "seconds": seconds, **errors})

            train(model, make_loss(), data.float(), steps, seed, probe)
            runs.append(curve)
            print(f"{name} seed {seed}: {curve[-1]}", flush=True)
        out["curves"][name] = runs
    return out


def heavy_weight(mixture: GaussianMixture, samples: torch.Tensor) -> float:
    """Fraction of samples nearer the heavy component (0)."""
    component = mixture.responsibilities(samples.double()).argmax(1)
    return float((component == 0).double().mean())


def plain_langevin(score, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 2, generator=g) * 2 * BOX - BOX).float()
    t = torch.zeros(n)
    for _ in range(PLAIN_STEPS):
        with torch.no_grad():
            s = score(x, t)
        x, _ = langevin_step(x, s, PLAIN_EPS, torch.randn(x.shape, generator=g))
    return x


def annealed(score, process: VESDE, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 2, generator=g) * 2 * BOX - BOX).float()
    result = annealed_langevin(score, process, x, generator=g, n_steps_each=100, step_lr=0.05,
                               denoise=False, progress=False)  # fmt: skip
    return result.samples


def field_grid(points: int = 21) -> torch.Tensor:
    axis = torch.linspace(-BOX, BOX, points)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    return torch.stack([xx.flatten(), yy.flatten()], 1)


def langevin_study(steps: int, n: int, seed: int = 0) -> dict:
    mixture = make_toy2d("two_modes")
    data = mixture.sample(10_000, torch.Generator().manual_seed(0))[0].float()
    levels = VESDE(**LEVELS)
    plain = ScoreModel(toy_network(), VESDE(sigma_min=1.0, sigma_max=2.0), "score")
    clean = {"perturb": False, "weighting": "none", **FIXED}
    train(plain, SlicedScoreMatching(projection="gaussian", **clean), data, steps, seed)
    learned = {}
    for name, loss in (("DSM", DenoisingScoreMatching(time_sampling="levels")),
                       ("SSM-VR", SlicedScoreMatching(time_sampling="levels", projection="gaussian"))):  # fmt: skip
        torch.manual_seed(seed)
        learned[name] = ScoreModel(toy_network(), levels, "score_over_sigma")
        train(learned[name], loss, data, steps, seed)
    samples = {
        "plain Langevin, exact score": plain_langevin(exact_score(mixture, 0.0), n, seed),
        "plain Langevin, learned (SSM-VR)": plain_langevin(plain.score, n, seed),
        "annealed Langevin, exact scores": annealed(mixture.score_fn(levels), levels, n, seed),
        "annealed Langevin, learned (DSM)": annealed(learned["DSM"], levels, n, seed),
        "annealed Langevin, learned (SSM-VR)": annealed(learned["SSM-VR"], levels, n, seed),
    }
    grid = field_grid()
    with torch.no_grad():
        learned_field = plain.score(grid, torch.zeros(len(grid)))
    exact_field = mixture.score(grid, 1.0, 0.0)
    error = (learned_field - exact_field).pow(2).sum(1)
    density = mixture.log_prob(grid).exp()
    dense = density > 0.01 * density.max()
    return {
        "heavy_weight": {k: heavy_weight(mixture, v) for k, v in samples.items()},
        "true_heavy_weight": 0.8,
        "plain_score_error": {
            "where p > 1% of max": float(error[dense].mean()),
            "elsewhere": float(error[~dense].mean()),
        },  # fmt: skip
        "_samples": {k: v.tolist() for k, v in samples.items()},
        "_field": {
            "grid": grid.tolist(),
            "learned": learned_field.tolist(),
            "exact": exact_field.tolist(),
            "error": error.tolist(),
        },  # fmt: skip
    }


def digits_study(root: Path) -> dict:
    out = {}
    for name, extra in (("SSM-VR", []), ("DSM", ["loss=dsm_levels"])):
        folder = root / name
        command = [sys.executable, "-m", "diffusion_lab.run", "+experiment=ncsn_ssm_digits",
                   f"hydra.run.dir={folder}", "trainer.enable_progress_bar=false",
                   "trainer.check_val_every_n_epoch=1000", *extra]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"digits run {name} failed:\n{done.stderr[-2000:]}")
        metrics = json.loads((folder / "final_metrics.json").read_text())
        out[name] = {"seconds": time.perf_counter() - start, "fid_digits": metrics["fid_digits"],
                     "confident": metrics["coverage_confident_fraction"],
                     "classes": metrics["coverage_classes_present"]}  # fmt: skip
        print(name, out[name], flush=True)
    return out


def summary_of(curves: dict) -> dict:
    """Final errors (mean and std over seeds) and seconds per 1000 steps."""
    table = {}
    for name, runs in curves.items():
        last = [run[-1] for run in runs]
        table[name] = {k: {"mean": statistics.mean(r[k] for r in last),
                           "std": statistics.stdev(r[k] for r in last) if len(last) > 1 else 0.0}
                       for k in ("overall", "low_density")}  # fmt: skip
        table[name]["seconds_per_1000_steps"] = statistics.mean(
            1000 * r["seconds"] / r["step"] for r in last
        )
    return table


def plot(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 4, figsize=(20, 9.5))
    for ax, region in zip(axes[0, :2], ("overall", "low_density"), strict=True):
        for name, runs in results["objectives"]["curves"].items():
            for i, run in enumerate(runs):
                ax.plot([p["seconds"] for p in run], [p[region] for p in run],
                        color=f"C{list(OBJECTIVES).index(name)}", alpha=0.8,
                        label=name if i == 0 else None)  # fmt: skip
        ax.set(yscale="log", xlabel="training seconds", ylabel="E||s - grad log p||^2",
               title=f"gmm8 at sigma {SIGMA_0}: score error, {region.replace('_', ' ')}")  # fmt: skip
        ax.legend()
    lang = results["langevin"]
    field = {k: torch.tensor(v) for k, v in lang["_field"].items()}
    grid = field["grid"]
    for ax, key, title in ((axes[0, 2], "exact", "two_modes: exact score"),
                           (axes[0, 3], "learned", "plain SSM-VR score (learned)")):  # fmt: skip
        vectors = field[key] / field[key].norm(dim=1, keepdim=True).clamp(min=1e-8)
        ax.quiver(grid[:, 0], grid[:, 1], vectors[:, 0], vectors[:, 1], field[key].norm(dim=1).log(),
                  cmap="viridis")  # fmt: skip
        ax.set(title=title + " (direction; colour log |s|)", aspect="equal")
    side = int(len(grid) ** 0.5)
    im = axes[1, 0].imshow(field["error"].reshape(side, side).log10(), origin="lower",
                           extent=(-BOX, BOX, -BOX, BOX), cmap="magma")  # fmt: skip
    fig.colorbar(im, ax=axes[1, 0])
    axes[1, 0].set(title="log10 |s_learned - grad log p|^2 (plain SSM-VR)")
    names = ["plain Langevin, exact score", "annealed Langevin, exact scores",
             "annealed Langevin, learned (DSM)"]  # fmt: skip
    for ax, name in zip(axes[1, 1:], names, strict=True):
        pts = torch.tensor(lang["_samples"][name])
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4)
        ax.set(title=f"{name}\nheavy mode {lang['heavy_weight'][name]:.2f} (true 0.80)",
               xlim=(-BOX - 2, BOX + 2), ylim=(-BOX - 2, BOX + 2), aspect="equal")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 steps, one seed, no digits")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    steps, seeds, n = (200, [0], 1000) if args.quick else (args.steps, args.seeds, 5000)
    name = "score_matching_quick" if args.quick else "score_matching"
    results: dict = {"objectives": objectives_study(steps, seeds, n)}
    results["objectives"]["summary"] = summary_of(results["objectives"]["curves"])
    results["langevin"] = langevin_study(steps, n)
    if not (args.quick or args.skip_digits):
        results["digits"] = digits_study(RESULTS / "score_matching_runs")
    plot(results, RESULTS / f"{name}.png")
    public = {**results, "langevin": {k: v for k, v in results["langevin"].items()
                                      if not k.startswith("_")}}  # fmt: skip
    (RESULTS / f"{name}.json").write_text(json.dumps(public, indent=1) + "\n")
    print(json.dumps({k: public[k] for k in public if k != "objectives"}, indent=1))
    print(json.dumps(public["objectives"]["summary"], indent=1))


if __name__ == "__main__":
    main()
