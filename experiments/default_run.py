"""Where the default run's budget buys the most quality (issue 12 item 4).

Each variant is the default run itself, ``python -m diffusion_lab.run`` with a few overrides (the
sampler, the learning rate, the EMA decay, the network's width, the number of steps), run one at a
time on both cores; its wall-clock time (the whole command, as ``make run`` takes it) and its
final metrics (``final_metrics.json``: 256 samples, the digits classifier's confident fraction at
0.9 and classes present, fid_digits against the 180 held-out test digits) are recorded.
fid_digits of 256 real digits is 152.6 +- 19.2 over 10 draws (``digits_fid_scale.py``), the
target band of the issue.

Usage: ``python experiments/default_run.py [--variants NAME ...] [--seeds 0 1] [--quick]``
(``--quick``: 60 steps, 32 samples). Writes ``experiments/results/default_run.json``; run
folders go to ``experiments/results/default_runs/`` (ignored by git) and are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "sampler dpm_solver_pp (20 NFE)": ["sampler=dpm_solver_pp"],
    "sampler heun (35 NFE)": ["sampler=heun"],
    "lr 2e-3": ["optimizer.lr=2e-3"],
    "lr 5e-4": ["optimizer.lr=5e-4"],
    "ema 0.999": ["callbacks.ema.decay=0.999"],
    "no ema": ["callbacks.ema=null"],
    "width 48": ["network.base_channels=48"],
    "width 24, 3000 steps": ["network.base_channels=24", "trainer.max_steps=3000"],
    "3000 steps": ["trainer.max_steps=3000"],
    "lr 2e-3, sde_dpm_solver_pp 20": ["optimizer.lr=2e-3", "sampler=sde_dpm_solver_pp"],
    "lr 3e-3, sde_dpm_solver_pp 20": ["optimizer.lr=3e-3", "sampler=sde_dpm_solver_pp"],
    "lr 2e-3, sde_dpm_solver_pp 20, 2400 steps": [
        "optimizer.lr=2e-3",
        "sampler=sde_dpm_solver_pp",
        "trainer.max_steps=2400",
    ],
    "v-prediction": ["method.parameterization=v"],
    "min-SNR-5 weighting": ["loss.weighting=min_snr"],
    "EDM preconditioning and loss": ["method.parameterization=edm", "loss=edm"],
    "flow matching (linear path)": ["process=flow", "method.parameterization=velocity",
                                    "loss=flow_matching"],
    "flow matching, dpm_solver_pp 20": ["process=flow", "method.parameterization=velocity",
                                        "loss=flow_matching", "sampler=dpm_solver_pp"],
    "class-conditional, CFG w=2": ["network.num_classes=10", "method.label_dropout=0.1",
                                   "method.guidance_scale=2.0"],
}  # fmt: skip
KEYS = ("fid_digits", "coverage_confident_fraction", "coverage_classes_present", "coverage_balance",
        "nfe")  # fmt: skip


def run_variant(name: str, overrides: list[str], seed: int, quick: bool, root: Path) -> dict:
    """One default run with ``overrides``; its record is kept and reused."""
    slug = "".join(c if c.isalnum() or c == "." else "_" for c in name)
    folder = root / f"{slug}_seed{seed}"
    record_path = folder / "record.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    extra = ["trainer.max_steps=60", "final_samples=32"] if quick else []
    command = [sys.executable, "-m", "diffusion_lab.run", f"hydra.run.dir={folder}", f"seed={seed}",
               "trainer.enable_progress_bar=false", *overrides, *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"variant {name!r} failed:\n{done.stderr[-2000:]}")
    seconds = time.perf_counter() - start
    metrics = json.loads((folder / "final_metrics.json").read_text())
    record = {"variant": name, "overrides": overrides, "seed": seed, "seconds": seconds,
              **{k.removeprefix("coverage_"): metrics[k] for k in KEYS}}  # fmt: skip
    record_path.write_text(json.dumps(record, indent=1))
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    args = parser.parse_args()
    root = RESULTS / ("default_runs_quick" if args.quick else "default_runs")
    records = [run_variant(name, VARIANTS[name], seed, args.quick, root)
               for seed in args.seeds for name in args.variants]  # fmt: skip
    name = "default_run_quick" if args.quick else "default_run"
    out = RESULTS / f"{name}.json"
    previous = json.loads(out.read_text())["runs"] if out.is_file() else []
    kept = {(r["variant"], r["seed"]): r for r in [*previous, *records]}
    out.write_text(json.dumps({"note": args.note, "runs": list(kept.values())}, indent=1) + "\n")
    for r in kept.values():
        print(f"{r['variant']:32s} seed {r['seed']}  {r['seconds']:7.1f} s  "
              f"fid {r['fid_digits']:7.1f}  confident {r['confident_fraction']:.3f}  "
              f"classes {r['classes_present']}")  # fmt: skip


if __name__ == "__main__":
    main()
