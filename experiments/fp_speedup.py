"""FP score embedding's training speed-up at CPU scale (Na, Gao, Wan 2024, Tables 1-3 and Fig. 5).

Arms, each trained from the framework's configs with the same network (``unet_small``: the DDPM
U-Net at CPU size), the same batch (16), Adam 1e-3 (the paper's rate, for every arm) without
warm-up, gradient clipping at 1 and no EMA, on the same image(s) at 16x16 (a 2-core CPU budget;
the paper: 32x32):

- ``fp``: ``+experiment=fp_embed_cifar10_single`` (``_multi`` for three images) offline: the FP
  embedding of the VE SDE (sigma 0.01 -> 50, N = 10, tol 1e-6, the stencil derived from eq. 15),
  eq. 24, Alg. 2's sequential times, the linear time embedding; denoised by the probability-flow
  ODE (RK45, from the VE prior for one image, from x^N + sigma z for three: the paper's
  conditional multi-image setting);
- ``fp_zero_score``: the same with grad m = 0 (``process.embedding=zero_score``: for VE the table
  is the image itself), which isolates the embedding from the rest of the recipe (loss, time
  sampling, time embedding, base SDE);
- ``fp_printed``: the same with the matrix printed under eq. 16-17 (``process.stencil=printed``);
- ``ddpm``: ``+experiment=ddpm_cifar10`` on the same data and network (VP, T = 1000, L_simple,
  sinusoidal embedding), sampled by its ancestral sampler (1000 steps) and, from the same weights
  at the same moments, by DDIM (50 steps, eta 0): the paper's DDPM and DDIM rows.

Diagnostic arms (``--arms``, not in the default study): ``fp_variance_weight`` (eq. 24 with the
weight 1/2 instead of 1/(2 g^2)), ``fp_sigma1`` (sigma_max 1), ``fp_vp`` and ``fp_vp_variance``
(over the VP SDE), ``fp_stochastic`` (``fp`` scored with the probability-flow ODE and, from the
same weights, the stochastic reverse-diffusion sampler of the VE SDE, 1000 steps), and
``fp_uniform_variance`` / ``fp_zero_score_uniform_variance`` (the times n ~ U{1..N} per example
and the weight 1/2: the recipe under which the framework's VE Score SDE learns this image).

The loop is the script's own (so that one trained DDPM serves both samplers, and the clock can
stop exactly): each step is the method's loss (``images_loss`` of the batch's images and image
indices for the FP arms, ``batch_loss`` for DDPM), backward, clipping, Adam; the clock runs
over the steps only (evaluation excluded) and starts with the FP precomputation already on it (the
embedding is computed in the run, uncached, and its seconds counted: the paper's "total training
time"). Every ``--eval-every`` steps, ``--samples`` outputs are drawn (seeded: the same noise each
time) and each is scored against the training image nearest to it: torchmetrics' windowed SSIM,
the paper's global SSIM (eq. 26-29, constants squared) and MSE. The time to a threshold (0.90,
0.95, 0.98, 0.99) is the training time at the first evaluation at or above it. Settings:
``single`` (one photograph, skimage's chelsea: CIFAR-10 is not on this machine) and ``three``
(three natural crops of skimage's photographs), ``--seeds`` seeds each; one thread per run, two
runs at a time.

Usage: ``python experiments/fp_speedup.py [--quick]`` (``--quick``: one seed, the single image,
40 steps: a smoke test). Writes ``experiments/results/fp_speedup.json`` and ``fp_speedup.png``.
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
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
THRESHOLDS = [0.90, 0.95, 0.98, 0.99]
METRICS = ("ssim", "global_ssim")
COMMON = ["network=unet_small", "data.batch_size=16", "optimizer.lr=1e-3", "method.warmup_steps=0",
          "callbacks.ema=null"]  # fmt: skip
SETTINGS = {
    "single": ["data=single_image", "data.name=chelsea", "data.image_size=16"],
    "three": ["data=few_images", "data@data.source=natural_crops", "data.count=3",
              "data.source.image_size=16", "data.source.n_train=3", "data.source.n_val=1",
              "data.source.n_test=1"],
}  # fmt: skip
FP = {
    "single": "+experiment=fp_embed_cifar10_single",
    "three": "+experiment=fp_embed_cifar10_multi",
}
ARMS = {
    "fp": ["process.cache=false"],
    "fp_zero_score": ["process.cache=false", "process.embedding=zero_score"],
    "fp_printed": ["process.cache=false", "process.stencil=printed"],
    "fp_variance_weight": ["process.cache=false", "loss.weighting=variance"],
    "fp_sigma1": ["process.cache=false", "process.base.sigma_max=1.0"],
    "fp_stochastic": ["process.cache=false"],
    "fp_vp": ["process.cache=false", "process@process.base=vp"],
    "fp_vp_variance": ["process.cache=false", "process@process.base=vp", "loss.weighting=variance"],
    "fp_uniform_variance": [
        "process.cache=false",
        "loss.time_sampling=uniform",
        "loss.weighting=variance",
    ],
    "fp_zero_score_uniform_variance": [
        "process.cache=false",
        "process.embedding=zero_score",
        "loss.time_sampling=uniform",
        "loss.weighting=variance",
    ],
    "ddpm": [],
}
#: The study's arms; the others are diagnostics (``--arms``): the same recipe with the weighting
#: 1/2 instead of 1/(2 g^2) (``loss.weighting=variance``), with sigma_max 1 instead of 50, and over
#: the VP SDE (with either weighting), ``fp`` sampled stochastically too, and ``fp`` and the
#: control with the times drawn uniformly per example and the weight 1/2 (Score SDE's recipe).
MAIN_ARMS = ["fp", "fp_zero_score", "fp_printed", "ddpm"]
#: The samplers each arm is scored with: name -> (sampler module attribute, options).
SAMPLERS = {
    "fp": {"ode": ("ode.probability_flow", {"progress": False})},
    "fp_stochastic": {
        "ode": ("ode.probability_flow", {"progress": False}),
        "reverse_diffusion": ("pc.reverse_diffusion", {"steps": 1000, "progress": False}),
    },
    "ddpm": {
        "ancestral": ("ancestral.ancestral", {"progress": False}),
        "ddim": ("ddim.ddim", {"steps": 50, "eta": 0.0, "progress": False}),
    },
}


def overrides(arm: str, setting: str, seed: int) -> list[str]:
    """The run's Hydra overrides."""
    experiment = "+experiment=ddpm_cifar10" if arm == "ddpm" else FP[setting]
    return [experiment, *SETTINGS[setting], *COMMON, *ARMS[arm], f"seed={seed}"]


def samplers_of(arm: str) -> dict:
    from diffusion_lab import samplers

    chosen = SAMPLERS.get(arm, SAMPLERS["fp"])
    out = {}
    for name, (path, options) in chosen.items():
        module, function = path.split(".")
        __import__(f"diffusion_lab.samplers.{module}")
        out[name] = functools.partial(getattr(getattr(samplers, module), function), **options)
    return out


def score(samples: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """SSIM (windowed, global) and MSE of each sample against its nearest training image."""
    from diffusion_lab.metrics import image_quality
    from diffusion_lab.metrics.evaluator import nearest_images

    targets = nearest_images(samples, images)
    return {
        "ssim": image_quality.ssim(samples, targets),
        "global_ssim": image_quality.global_ssim(samples, targets),
        "mse": image_quality.mse(samples, targets),
    }


def train_one(arm: str, setting: str, seed: int, max_steps: int, eval_every: int, n: int) -> dict:
    """One run in this process: the training curve and the time to each threshold."""
    from diffusion_lab.build import build_datamodule, build_method, compose_config
    from diffusion_lab.processes.fokker_planck import FixedPointError
    from diffusion_lab.run import config_dir

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    cfg = compose_config(config_dir(), overrides(arm, setting, seed))
    datamodule, _ = build_datamodule(cfg)
    method = build_method(cfg, [])
    train_x = datamodule.tensors("train")[0]
    images = torch.unique(train_x, dim=0)
    samplers = samplers_of(arm)
    start = time.perf_counter()
    try:
        if method.process.needs_fit:
            method.process.fit(method.to_model_range(train_x))  # in the order of their index
    except FixedPointError as exc:  # the printed matrix: a finding, not a crash
        curve: list[dict] = []
        return {"arm": arm, "setting": setting, "seed": seed, "failed": str(exc), "curve": curve,
                "samplers": list(samplers), "time_to": time_to(curve, list(samplers))}  # fmt: skip
    precompute = time.perf_counter() - start
    optimizer = method.configure_optimizers()["optimizer"]
    loader = datamodule.train_dataloader()
    batches = iter(loader)
    shape = datamodule.data_shape
    clock, curve = precompute, []
    for step in range(max_steps + 1):
        if step % eval_every == 0 or step == max_steps:
            point = {"step": step, "seconds": clock}
            for name, sampler in samplers.items():
                method.sampler = sampler
                samples, nfe = method.generate(n, sample_shape=shape)
                point.update({f"{k}_{name}": v for k, v in score(samples, images).items()})
                point[f"nfe_{name}"] = nfe
            curve.append(point)
            if all(point[f"{m}_{s}"] >= THRESHOLDS[-1] for m in METRICS for s in samplers):
                break
        if step == max_steps:
            break
        tick = time.perf_counter()
        try:
            x, index = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, index = next(batches)
        method.train()
        x = method.to_model_range(x)
        loss = method.images_loss(x, index, step) if arm != "ddpm" else method.batch_loss(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.model.network.parameters(), 1.0)
        optimizer.step()
        clock += time.perf_counter() - tick
    return {
        "arm": arm, "setting": setting, "seed": seed, "precompute_seconds": precompute,
        "curve": curve, "samplers": list(samplers), "time_to": time_to(curve, list(samplers)),
    }  # fmt: skip


def time_to(curve: list[dict], samplers: list[str]) -> dict:
    """{metric: {sampler: {threshold: training seconds at the first evaluation at or above it,
    or None}}}."""
    return {
        metric: {
            name: {
                str(threshold): next(
                    (p["seconds"] for p in curve if p[f"{metric}_{name}"] >= threshold), None
                )
                for threshold in THRESHOLDS
            }
            for name in samplers
        }
        for metric in METRICS
    }


def run_child(arm: str, setting: str, seed: int, args: argparse.Namespace) -> dict:
    """One run in a subprocess with one thread; its record is kept as JSON and reused."""
    out = args.runs / f"{setting}_{arm}_seed{seed}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, __file__, "--child", arm, setting, str(seed),
                   "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                   "--samples", str(args.samples), "--runs", str(args.runs)]  # fmt: skip
        subprocess.run(command, check=True, env=ENV)
    return json.loads(out.read_text())


def summary(records: list[dict]) -> dict:
    """{setting: {arm/sampler: {metric: {threshold: mean, std, reached, ratio_to_fp}}}}: the time
    to each threshold over seeds (runs that never reached it are counted in ``reached``, not in
    the mean) and its ratio to ``fp``'s (when both reached it in every seed)."""
    out: dict = {}
    for r in records:
        for metric, by_sampler in r["time_to"].items():
            for name, by_threshold in by_sampler.items():
                row = out.setdefault(r["setting"], {}).setdefault(f"{r['arm']}/{name}", {})
                for threshold, seconds in by_threshold.items():
                    row.setdefault(metric, {}).setdefault(threshold, []).append(seconds)
    for rows in out.values():
        for row in rows.values():
            for by_threshold in row.values():
                for threshold, values in by_threshold.items():
                    reached = [v for v in values if v is not None]
                    by_threshold[threshold] = {
                        "mean": statistics.mean(reached) if reached else None,
                        "std": statistics.stdev(reached) if len(reached) > 1 else None,
                        "reached": len(reached),
                        "runs": len(values),
                    }
        fp = rows.get("fp/ode")
        for row in rows.values():
            for metric, by_threshold in row.items():
                for threshold, cell in by_threshold.items():
                    base = fp[metric][threshold] if fp else None
                    complete = base and base["reached"] == base["runs"] == cell["reached"]
                    cell["ratio_to_fp"] = cell["mean"] / base["mean"] if complete else None
    return out


def plot(records: list[dict], path: Path) -> None:
    """SSIM and MSE against training time (the paper's Fig. 5), one line per arm and seed."""
    settings = sorted({r["setting"] for r in records})
    fig, axes = plt.subplots(2, len(settings), figsize=(6 * len(settings), 8), squeeze=False)
    colours = {arm: f"C{i}" for i, arm in enumerate(ARMS)}
    for column, setting in enumerate(settings):
        for r in (r for r in records if r["setting"] == setting):
            for name in r["samplers"]:
                style = "--" if name == "ddim" else "-"
                label = (
                    f"{r['arm']} ({name})" if r["seed"] == min(x["seed"] for x in records) else None
                )
                seconds = [p["seconds"] for p in r["curve"]]
                for row, metric in enumerate(("ssim", "mse")):
                    axes[row][column].plot(
                        seconds, [p[f"{metric}_{name}"] for p in r["curve"]], style,
                        color=colours[r["arm"]], alpha=0.7, label=label,
                    )  # fmt: skip
        axes[0][column].set(title=f"{setting}: SSIM (windowed)", xlabel="training seconds")
        axes[1][column].set(title=f"{setting}: MSE", xlabel="training seconds", yscale="log")
        for t in THRESHOLDS:
            axes[0][column].axhline(t, color="grey", lw=0.5)
        axes[0][column].set_ylim(0, 1)
        axes[0][column].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, single image, 40 steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000, help="training steps at most")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--arms", nargs="+", default=MAIN_ARMS, choices=list(ARMS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--name", default="fp_speedup", help="results file stem")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--runs", type=Path, default=RESULTS / "fp_runs", help="run records")
    parser.add_argument("--child", nargs=3, metavar=("ARM", "SETTING", "SEED"))
    args = parser.parse_args()
    if args.child:
        arm, setting, seed = args.child[0], args.child[1], int(args.child[2])
        record = train_one(arm, setting, seed, args.steps, args.eval_every, args.samples)
        (args.runs / f"{setting}_{arm}_seed{seed}.json").write_text(json.dumps(record, indent=1))
        return
    if args.quick:
        args.runs = RESULTS / "fp_runs_quick"
        args.seeds, args.steps, args.eval_every, args.settings = 1, 40, 20, ["single"]
    jobs = [(a, s, seed) for seed in range(args.seeds) for s in args.settings for a in args.arms]
    start = time.time()
    with ThreadPoolExecutor(args.workers) as pool:
        records = list(pool.map(lambda job: run_child(*job, args), jobs))
    result = {
        "note": args.note,
        "settings": {"arms": args.arms, "steps": args.steps, "eval_every": args.eval_every, "samples": args.samples,
                     "seeds": args.seeds, "thresholds": THRESHOLDS, "quick": args.quick},
        "summary": summary(records), "runs": records, "wall_seconds": time.time() - start,
    }  # fmt: skip
    name = f"{args.name}_quick" if args.quick else args.name
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(records, RESULTS / f"{name}.png")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
