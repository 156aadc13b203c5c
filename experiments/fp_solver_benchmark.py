"""FP score embedding: time of the log-density Fokker-Planck precomputation against image size.

For an RGB photograph (``skimage.data.astronaut()``, resized with ``skimage.transform.resize``
(anti-aliased) to H x W and kept in [0, 1] float64) and the framework's VE SDE
(``VESDE(sigma_min=0.01, sigma_max=50)``, N = 10 steps on [0, 1], fixed-point tol 1e-6), every
linear solver (the package's and those of ``fp_solver_variants.py``) runs the whole precomputation
(KDE + all PDE steps + transport, ``solve_embedding``) at H = W = 16, 32, 64, 128, in one process,
on one core (OMP_NUM_THREADS=1, ``torch.set_num_threads(1)``), ``--repeats`` timed runs after a
warm-up, the median reported. Reported per size and solver: the total, the time per PDE step,
where the time goes (kde, assembly, factorisation, solve, transport), the fixed-point and Krylov
iteration counts, and the largest difference of m from the direct LU's. The exponent of time
against H*W is fitted by least squares on log-log. Targets: 128 x 128 RGB under 5 s on one core;
growth no faster than (H W)^1.2.

Usage: ``python experiments/fp_solver_benchmark.py [--quick] [--repeats 3] [--note "..."]``
(``--quick``: sizes 16 and 32). Writes ``experiments/results/fp_solver_benchmark.json`` and
``.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fp_solver_variants import SOLVERS  # noqa: E402

from diffusion_lab.processes import fokker_planck as fp  # noqa: E402
from diffusion_lab.processes.sde import VESDE  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIGMA_MIN, SIGMA_MAX = 0.01, 50.0
PARTS = ("kde", "assembly", "factorisation", "solve", "transport")
DEFAULT_SOLVERS = (
    "lu",
    "lu_mmd_at_plus_a",
    "spsolve",
    "gmres_lu_reuse",
    "gmres_ilu",
    "gmres_dst",
    "bicgstab_dst",
)


def photograph(size: int) -> np.ndarray:
    """skimage's astronaut resized to (3, size, size) float64 in [0, 1]."""
    from skimage import data, transform

    image = transform.resize(data.astronaut(), (size, size), anti_aliasing=True)
    return np.clip(image, 0.0, 1.0).transpose(2, 0, 1).astype(np.float64)


def fit_exponent(sizes: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(H W)."""
    pixels = np.log(np.array(sizes, dtype=float) ** 2)
    return float(np.polyfit(pixels, np.log(seconds), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 16 and 32 only")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--solvers", nargs="*", default=list(DEFAULT_SOLVERS), choices=list(SOLVERS)
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--out", default=str(RESULTS / "fp_solver_benchmark"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = args.sizes or ([16, 32] if args.quick else [16, 32, 64, 128])
    drift, diffusion = fp.sde_coefficients(VESDE(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX))

    def run(image: np.ndarray, solver: str) -> fp.FPSolution:
        return fp.solve_embedding(
            image, drift, diffusion, num_steps=args.steps, tol=args.tol, solver=SOLVERS[solver]
        )

    for solver in args.solvers:  # warm-up (imports, caches)
        run(photograph(sizes[0]), solver)

    rows = []
    for size in sizes:
        image = photograph(size)
        reference = None
        for solver in args.solvers:
            runs = [run(image, solver) for _ in range(args.repeats)]
            totals = [r.seconds["total"] for r in runs]
            median = runs[int(np.argsort(totals)[len(totals) // 2])]
            if reference is None:
                reference = median.log_density
            pde = sum(median.seconds[k] for k in ("assembly", "factorisation", "solve"))
            row = {
                "size": size,
                "pixels": size * size,
                "channels": image.shape[0],
                "solver": solver,
                "total_s": statistics.median(totals),
                "totals_s": totals,
                "per_step_s": pde / args.steps,
                "parts_s": {k: median.seconds[k] for k in PARTS},
                "fixed_point_iterations": median.iterations.tolist(),
                "krylov_iterations": median.krylov_iterations,
                "max_residual": float(median.residuals.max()),
                "max_diff_from_first_solver": float(np.abs(median.log_density - reference).max()),
            }
            rows.append(row)
            print(
                f"{size:4d}^2 {solver:18s} total {row['total_s']:8.3f} s  per step "
                f"{row['per_step_s']:.4f} s  fp-its {sum(row['fixed_point_iterations']):4d}  "
                f"krylov {row['krylov_iterations']:5d}  diff {row['max_diff_from_first_solver']:.1e}",
                flush=True,
            )

    kde = {}  # the initial condition both ways: scikit-learn's tree KDE against the closed form
    for size in sizes:
        image = photograph(size)
        seconds = {}
        for method in fp.KDES:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                values = fp.initial_log_density(image, method)
                times.append(time.perf_counter() - start)
            seconds[method] = statistics.median(times)
            seconds[f"{method}_values"] = values
        diff = float(np.abs(seconds.pop("sklearn_values") - seconds.pop("exact_values")).max())
        kde[size] = {**seconds, "max_abs_diff": diff}
        print(f"{size:4d}^2 KDE sklearn {seconds['sklearn']:.3f} s  exact {seconds['exact']:.4f} s"
              f"  max |diff| {diff:.1e}", flush=True)  # fmt: skip

    summary = {}
    for solver in args.solvers:
        mine = [r for r in rows if r["solver"] == solver]
        entry = {"seconds_by_size": {r["size"]: r["total_s"] for r in mine}}
        if len(mine) >= 2:
            entry["exponent_vs_pixels"] = fit_exponent(
                [r["size"] for r in mine], [r["total_s"] for r in mine]
            )
            # the local slope between the two largest sizes (the fit over all sizes is flattered by
            # fixed overheads at 16 x 16)
            entry["exponent_last_pair"] = fit_exponent(
                [r["size"] for r in mine[-2:]], [r["total_s"] for r in mine[-2:]]
            )
        summary[solver] = entry
    fastest_at_largest = min(
        (r for r in rows if r["size"] == sizes[-1]), key=lambda r: r["total_s"]
    )["solver"]
    default = summary.get(fp.DEFAULT_SOLVER, {})
    result = {
        "description": __doc__.splitlines()[0],
        "sde": f"VESDE(sigma_min={SIGMA_MIN}, sigma_max={SIGMA_MAX})",
        "image": "skimage.data.astronaut(), resized (anti-aliased), RGB, [0, 1] float64",
        "steps": args.steps,
        "tol": args.tol,
        "repeats": args.repeats,
        "threads": 1,
        "machine": platform.platform(),
        "processor": platform.processor(),
        "note": args.note,
        "default_solver": fp.DEFAULT_SOLVER,
        "fastest_at_largest_size": fastest_at_largest,
        "targets": {
            "total_under_5s_at_128": default.get("seconds_by_size", {}).get(128, float("nan")) < 5
            if 128 in sizes
            else None,
            "exponent_at_most_1.2": default.get("exponent_vs_pixels", float("nan")) <= 1.2,
            "last_pair_exponent_at_most_1.2": default.get("exponent_last_pair", float("nan"))
            <= 1.2,
        },
        "summary": summary,
        "kde_seconds": kde,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(rows, args.solvers, sizes, out.with_suffix(".png"))
    for solver, entry in summary.items():
        print(solver, entry)
    print("fastest at", sizes[-1], ":", fastest_at_largest, "| default:", fp.DEFAULT_SOLVER)


def plot(rows: list[dict], solvers: list[str], sizes: list[int], path: Path) -> None:
    """Total time against H*W (log-log) per solver, and the default solver's time split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for solver in solvers:
        mine = [r for r in rows if r["solver"] == solver]
        left.loglog([r["pixels"] for r in mine], [r["total_s"] for r in mine], "o-", label=solver)
    pixels = np.array([s * s for s in sizes], dtype=float)
    first = [r for r in rows if r["solver"] == fp.DEFAULT_SOLVER] or rows
    anchor = first[0]["total_s"]
    left.loglog(pixels, anchor * (pixels / pixels[0]) ** 1.2, "k--", lw=0.8, label="(HW)^1.2")
    left.axhline(5.0, color="grey", lw=0.8, ls=":")
    left.set_xlabel("H x W")
    left.set_ylabel("whole precomputation (s, median)")
    left.legend(fontsize=7)
    mine = [r for r in rows if r["solver"] == fp.DEFAULT_SOLVER]
    bottom = np.zeros(len(mine))
    labels = [f"{r['size']}" for r in mine]
    for part in PARTS:
        values = np.array([r["parts_s"][part] for r in mine])
        right.bar(labels, values, bottom=bottom, label=part)
        bottom += values
    right.set_xlabel("H = W")
    right.set_ylabel("seconds")
    right.set_title(f"where the time goes ({fp.DEFAULT_SOLVER})")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
