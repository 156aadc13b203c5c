"""``python -m diffusion_lab.soft_schedule [--out PATH] [Hydra overrides]``: Soft Diffusion blur levels.

Composes the project's config for a Soft Diffusion blur run (``process=soft_blur method=soft``,
:data:`SOFT_RUN`, unless an ``+experiment`` is given) and the overrides (e.g. ``data=digits
data.image_size=16 process.blur_max=8``, ``process/blur_schedule=soft_mse_matched``), builds the
run's data and method (``diffusion_lab.build``) and fits the process to the training images a run
fits it to (``fit_examples``), with a progress bar over the bisection on eps. Its levels, with
their settings and the images' hash, are in a JSON file: the cache file that runs fitting the same
images with the same settings reuse, or ``--out``. Prints the levels and, for ``--out``, the
override that reads the file (``process.blur_schedule.file=PATH``).
"""

from __future__ import annotations

import argparse
import json
import logging

from omegaconf import open_dict

from diffusion_lab.build import build_datamodule, build_method, compose_config
from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.soft import SoftBlurProcess
from diffusion_lab.run import config_dir
from diffusion_lab.schedules.soft import BlurSchedule, save_schedule
from diffusion_lab.schema import check_config
from diffusion_lab.stops import one_line_errors

#: The groups of a Soft Diffusion blur run, which the overrides complete.
SOFT_RUN = {"process": "soft_blur", "method": "soft", "loss": "soft_score_matching",
            "sampler": "soft_momentum"}  # fmt: skip


def soft_run_overrides(overrides: list[str]) -> list[str]:
    """``overrides`` after the :data:`SOFT_RUN` groups they do not choose (none with an
    ``+experiment``, which chooses its own): the run whose process the levels are for."""
    if any(o.startswith("+experiment=") for o in overrides):
        return list(overrides)
    chosen = {o.split("=", 1)[0] for o in overrides}
    return [f"{g}={o}" for g, o in SOFT_RUN.items() if g not in chosen] + list(overrides)


def main(argv: list[str] | None = None) -> BlurSchedule:
    """Compute (or reuse from the cache) and save the configured blur schedule."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=digits")
    parser.add_argument("--out", default=None, help="JSON file to write (default: the cache)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_errors():
        cfg = compose_config(config_dir(), soft_run_overrides(args.overrides))
        with open_dict(cfg):
            cfg.run_dir = ""
        check_config(cfg)
        datamodule, _ = build_datamodule(cfg)
        method = build_method(cfg, [])
        process = method.process
        if not isinstance(process, SoftBlurProcess):
            raise ConfigError(
                f"soft_schedule computes the levels of process=soft_blur, got "
                f"{type(process).__name__}: drop the process override"
            )
        data = None
        if process.blur_schedule.needs_data:
            datamodule.prepare_data()
            data = method.fit_examples(datamodule)
        schedule, path = process.find_levels(data, progress=not args.no_progress)
        if args.out:
            path = save_schedule(args.out, schedule)
    print(f"name: {schedule.name}")
    print(f"levels ({len(schedule.levels)}): " + json.dumps([round(v, 6) for v in schedule.levels]))
    for key in ("eps", "exact", "clamped"):
        if key in schedule.info:
            print(f"{key}: {schedule.info[key]}")
    if path is not None:
        print(f"file: {path}")
    if args.out:
        print(f"override: process.blur_schedule.file={path}")
    return schedule


if __name__ == "__main__":
    main()
