"""``python -m diffusion_lab.sample RUN_DIR [overrides]``: draw samples from a trained run.

Rebuilds the run's config from its recorded Hydra overrides plus new ones (e.g. ``sampler=pc
sampler.steps=500``), loads the EMA weights of ``checkpoints/last.ckpt`` with
``weights_only=True`` and writes ``samples_<sampler>.pt`` (all samples, data range),
``samples_<sampler>.png`` (the first 256) and, for images, ``samples_<sampler>.npz`` (``--npz``
elsewhere: uint8 (N, H, W, C) as ``arr_0``, the evaluators' format) into the run folder. The
samples are drawn in batches of ``--batch-size`` on ``--devices`` devices of ``--accelerator``
(``sharded_sampling``); neither changes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import torch
import yaml
from omegaconf import open_dict

from diffusion_lab.build import build_datamodule, build_method, compose_config, load_checkpoint
from diffusion_lab.callbacks.images import save_samples_picture
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.evaluator import check_samples_finite
from diffusion_lab.npz import save_npz
from diffusion_lab.run import config_dir
from diffusion_lab.schema import check_config
from diffusion_lab.sharded_sampling import ACCELERATORS, check_devices, draw_on_devices
from diffusion_lab.stops import one_line_errors

T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are the project's one line (``diffusion_lab: error:``,
    exit code 2) with the usage on the same line, not argparse's two."""

    def error(self, message: str) -> NoReturn:
        usage = " ".join(self.format_usage().split())
        print(f"diffusion_lab: error: {message} ({usage})", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def check_run_folder(run_dir: Path) -> None:
    """A folder that exists (a typo or a wrong path is named as such, not as untrained)."""
    if not run_dir.is_dir():
        what = "is a file, not a run folder" if run_dir.exists() else "does not exist"
        raise ConfigError(
            f"no such run folder {run_dir} ({what}): give the folder a run wrote "
            "(its hydra.run.dir, e.g. outputs/<date>/<time>)"
        )


def read_yaml(path: Path, load: Callable[[str], T]) -> T:
    """``load(text of path)``; an unreadable or malformed file is one ConfigError line."""
    try:
        return load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(
            f"cannot read {path} ({reason}): restore the file the run wrote"
        ) from None


def override_key(override: str) -> str:
    """The config key a Hydra override sets: ``sampler`` of ``sampler=pc``, ``sampler.snr`` of
    ``+sampler.snr=0.1``."""
    return override.lstrip("+~").split("=", 1)[0]


def run_overrides(saved: list[str], overrides: list[str]) -> list[str]:
    """The run's recorded overrides, then the new ones. A new ``sampler=...`` replaces the
    recorded sampler with its settings (``sampler.snr=0.17`` of a PC sampler is no key of Heun's)."""
    if any(override_key(o) == "sampler" for o in overrides):
        key = override_key
        saved = [o for o in saved if key(o) != "sampler" and not key(o).startswith("sampler.")]
    return [*saved, *overrides]


def load_run(run_dir: Path, overrides: list[str]):
    """The run's method with its trained weights, and its DataModule."""
    check_run_folder(run_dir)
    checkpoint_path = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint_path.is_file():
        raise ConfigError(f"no checkpoint at {checkpoint_path}: train the run first")
    recorded = run_dir / ".hydra" / "overrides.yaml"
    saved = read_yaml(recorded, yaml.safe_load) if recorded.is_file() else []
    cfg = compose_config(config_dir(), run_overrides(saved, overrides))
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    check_config(cfg)
    datamodule, metrics = build_datamodule(cfg)
    method = build_method(cfg, metrics)
    checkpoint = load_checkpoint(checkpoint_path, method)
    method.load_state_dict(checkpoint["state_dict"])  # the EMA weights when EMA was on
    return cfg, method, datamodule


def main(argv: list[str] | None = None) -> None:
    """Draw ``--num-samples`` samples from a trained run folder (and score them)."""
    parser = OneLineParser(
        prog="python -m diffusion_lab.sample", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. sampler=pc")
    parser.add_argument("--num-samples", type=positive_int, default=64)
    parser.add_argument(
        "--batch-size", type=positive_int, help="samples per batch (method.sample_batch_size)"
    )
    parser.add_argument("--devices", type=positive_int, default=1, help="processes (DDP if > 1)")
    parser.add_argument("--accelerator", choices=ACCELERATORS, default="auto")
    parser.add_argument("--npz", type=Path, help="the .npz path (default: in the run folder)")
    parser.add_argument("--evaluate", action="store_true", help="also score the samples")
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    with one_line_errors():
        accelerator = check_devices(args.accelerator, args.devices)
        cfg, method, datamodule = load_run(args.run_dir, args.overrides)
        shape = tuple(datamodule.data_shape)
        if args.npz is not None and len(shape) != 3:
            raise ConfigError(f"--npz needs images, and this run draws points of shape {shape}")
        drawn = draw_on_devices(
            method, args.num_samples, shape, args.batch_size, accelerator, args.devices,
            args.run_dir, str(cfg.trainer.get("precision", "32-true")),
        )  # fmt: skip
        if drawn is None:  # another rank's: rank 0 writes
            return
        samples, nfe = drawn
        name = cfg.sampler._target_.rsplit(".", 1)[-1]
        torch.save(samples, args.run_dir / f"samples_{name}.pt")
        picture = save_samples_picture(samples[:256], args.run_dir / f"samples_{name}.png")
        report = {"sampler": name, "nfe": nfe, "num_samples": args.num_samples, "png": str(picture)}
        if len(shape) == 3:
            check_samples_finite(
                samples,
                f"samples drawn from {args.run_dir}",
                f"samples_{name}.pt holds them, no .npz was written; draw them with another "
                "sampler (sampler=NAME)",
            )
            npz = args.npz or args.run_dir / f"samples_{name}.npz"
            report["npz"] = str(save_npz(samples, method.data_range, npz))
        if args.evaluate and method.evaluator is not None:
            report.update(method.evaluator(samples, datamodule))
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
