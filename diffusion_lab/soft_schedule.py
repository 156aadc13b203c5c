"""``python -m diffusion_lab.soft_schedule [--out PATH] [Hydra overrides]``: Soft Diffusion blur levels.

Composes the project's config with ``process=soft_blur`` and the overrides (e.g. ``data=digits
data.image_size=16 process.blur_max=8``, ``blur_schedule=soft_mse_matched``), computes the levels of its
``blur_schedule`` (:mod:`diffusion_lab.schedules.soft`) from the training split, with a progress
bar over the bisection on eps, and writes them with their settings and the data's hash to a JSON
file: ``--out`` or the cache file that runs with the same settings and data reuse. Prints the
levels and the override that reads the file (``blur_schedule.file=PATH``).
"""

from __future__ import annotations

import argparse
import json
import logging

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from diffusion_lab.run import config_dir, one_line_errors
from diffusion_lab.schedules.soft import BlurSchedule, resolve_schedule, save_schedule


def main(argv: list[str] | None = None) -> BlurSchedule:
    """Compute (or reuse from the cache) and save the configured blur schedule."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=digits")
    parser.add_argument("--out", default=None, help="JSON file to write (default: the cache)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_errors():
        overrides = args.overrides
        if not any(o.startswith("process=") for o in overrides):
            overrides = ["process=soft_blur", *overrides]  # the process whose levels these are
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        node = OmegaConf.to_container(cfg.blur_schedule, resolve=False)
        node = OmegaConf.to_container(
            OmegaConf.merge(cfg, {"blur_schedule": node}).blur_schedule, resolve=True
        )
        for key in ("_target_", "_recursive_"):
            node.pop(key, None)
        if args.out:
            node["file"] = None  # compute (or reuse the cache), then write --out
        schedule, path = resolve_schedule(**node, progress=not args.no_progress)
        if args.out:
            path = save_schedule(args.out, schedule)
    print(f"name: {schedule.name}")
    print(f"levels ({len(schedule.levels)}): " + json.dumps([round(v, 6) for v in schedule.levels]))
    for key in ("eps", "exact", "clamped"):
        if key in schedule.info:
            print(f"{key}: {schedule.info[key]}")
    if path is not None:
        print(f"file: {path}")
        print(f"override: blur_schedule.file={path}")
    return schedule


if __name__ == "__main__":
    main()
