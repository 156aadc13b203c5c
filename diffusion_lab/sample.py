"""``python -m diffusion_lab.sample RUN_DIR [overrides]``: draw samples from a trained run.

Rebuilds the run's config from its recorded Hydra overrides plus new ones (e.g. ``sampler=pc
sampler.steps=500``), loads the EMA weights of ``checkpoints/last.ckpt`` with
``weights_only=True`` and writes ``samples_<sampler>.png`` / ``.pt`` into the run folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from omegaconf import open_dict

from diffusion_lab.build import build_datamodule, build_method, load_checkpoint
from diffusion_lab.callbacks.images import save_samples_picture
from diffusion_lab.errors import ConfigError
from diffusion_lab.run import config_dir, one_line_errors
from diffusion_lab.schema import check_config, compose_config


def load_run(run_dir: Path, overrides: list[str]):
    """The run's method with its trained weights, and its DataModule."""
    recorded = run_dir / ".hydra" / "overrides.yaml"
    saved = yaml.safe_load(recorded.read_text()) if recorded.is_file() else []
    cfg = compose_config(config_dir(), [*saved, *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    check_config(cfg)
    datamodule, metrics = build_datamodule(cfg)
    method = build_method(cfg, metrics)
    checkpoint_path = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint_path.is_file():
        raise ConfigError(f"no checkpoint at {checkpoint_path}: train the run first")
    checkpoint = load_checkpoint(checkpoint_path, method)
    method.load_state_dict(checkpoint["state_dict"])  # the EMA weights when EMA was on
    return cfg, method, datamodule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. sampler=pc")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--evaluate", action="store_true", help="also score the samples")
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    with one_line_errors():
        cfg, method, datamodule = load_run(args.run_dir, args.overrides)
        shape = datamodule.data_shape
        samples, nfe = method.generate(args.num_samples, sample_shape=shape)
        name = cfg.sampler._target_.rsplit(".", 1)[-1]
        torch.save(samples, args.run_dir / f"samples_{name}.pt")
        picture = save_samples_picture(samples, args.run_dir / f"samples_{name}.png")
        report = {"sampler": name, "nfe": nfe, "num_samples": args.num_samples, "png": str(picture)}
        if args.evaluate and method.evaluator is not None:
            report.update(method.evaluator(samples, datamodule))
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
