"""Where a 10-step grid should end (issue 12, the sub-VP target at 10 NFE).

DPM-Solver++(2M) at 10 evaluations ends with the jump to the clean image from its last grid
time, so that time decides much of its error. On toy2d ``gmm8`` with the exact score (the setup
of ``sampler_nfe.py``: 20,000 samples, 3 seeds, SW_2 to exact draws and the component-spread
error), this sweeps the grid (``levels``; ``logsnr``, ``uniform``, ``karras`` ending at t_min)
under VE, VP and sub-VP, beside DDIM at 20 evaluations on its default grid, and records the noise
ratio sigma / alpha at the last grid time (the same ratio means the same jump on every process).

Usage: ``python experiments/grid_end.py [--quick]`` (``--quick``: one seed, 2000 samples).
Writes ``experiments/results/grid_end.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from sampler_nfe import PROCESSES, _ddim_steps, quality

from diffusion_lab.data.toy2d import make_toy2d
from diffusion_lab.samplers import ddim, dpm_solver
from diffusion_lab.samplers.grids import noise_ratio, sampling_times

RESULTS = Path(__file__).resolve().parent / "results"
T_MINS = (1e-3, 0.01, 0.03, 0.1, 0.2, 0.3)
GRIDS = ("logsnr", "uniform", "karras")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seeds, n = ([0], 2000) if args.quick else ([0, 1, 2], 20_000)
    mixture = make_toy2d("gmm8")
    out: dict = {"nfe": 10, "samples": n, "seeds": seeds, "processes": {}}
    for kind, make in PROCESSES.items():
        process = make()
        cells: dict[str, list[dict]] = {}
        for seed in seeds:
            prior = process.prior_sampling((n, 2), generator=torch.Generator().manual_seed(seed))
            prior = prior.double()
            exact, _ = mixture.sample(n, torch.Generator().manual_seed(1000 + seed))
            score = mixture.score_fn(process)
            runs = {"DDIM-20 (levels)": (ddim.ddim, _ddim_steps(20, process)),
                    "DPM-Solver++ levels": (dpm_solver.dpm_solver_pp, {"steps": 10})}  # fmt: skip
            for grid in GRIDS:
                for t_min in T_MINS:
                    runs[f"DPM-Solver++ {grid} t_min {t_min}"] = (
                        dpm_solver.dpm_solver_pp, {"steps": 10, "grid": grid, "t_min": t_min}
                    )  # fmt: skip
            for name, (sample, options) in runs.items():
                result = sample(score, process, prior.clone(), progress=False, **options)
                metrics = quality(result.samples, mixture, exact, None, seed)
                cells.setdefault(name, []).append({"nfe": result.nfe, **metrics})
        table = {}
        for name, values in cells.items():
            options = {"steps": 10} if "levels" in name else {}
            if "t_min" in name:
                grid, t_min = name.split()[1], float(name.split()[-1])
                options = {"steps": 10, "grid": grid, "t_min": t_min}
            last_time = sampling_times(process, **options)[-1:] if options else None
            table[name] = {
                "nfe": values[0]["nfe"],
                **{k: statistics.mean(v[k] for v in values) for k in ("sw2", "spread_error")},
                "sw2_std": statistics.stdev(v["sw2"] for v in values) if len(values) > 1 else 0.0,
                "last_ratio": float(noise_ratio(process, last_time)) if options else None,
            }
        best = min((k for k in table if k.startswith("DPM")), key=lambda k: table[k]["sw2"])
        out["processes"][kind] = {"cells": table, "best_dpm": best}
        print(kind, "DDIM-20", table["DDIM-20 (levels)"], "\n  best", best, table[best], flush=True)
    name = "grid_end_quick" if args.quick else "grid_end"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
