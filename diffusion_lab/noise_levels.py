"""``python -m diffusion_lab.noise_levels [options] [Hydra overrides]``: NCSNv2's noise levels.

Composes the project's config with the given overrides (e.g. ``data=digits data.image_size=32``,
``data=cifar10 data.root=...``), builds the DataModule of its ``data`` group and applies NCSNv2's
Techniques 1, 2 and 4 (:mod:`diffusion_lab.schedules.ncsnv2`) to the training split, in the
DataModules' range [0, 1], which is the model range of the NCSN methods (``method.model_range``).
Prints sigma_1, the common ratio, L, the Langevin step size eps and the matching Hydra overrides.
For the embedded 8x8 digits: sigma_1 = 4.815, gamma = 1.342, L = 22, eps = 2.35e-5 at T = 5.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from hydra import compose, initialize_config_dir

from diffusion_lab.build import build_datamodule
from diffusion_lab.run import config_dir
from diffusion_lab.schedules.ncsnv2 import NCSNv2Config, ncsnv2_config
from diffusion_lab.stops import one_line_errors


def main(argv: list[str] | None = None) -> NCSNv2Config:
    """Print the heuristics for the training split of the configured data set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=digits")
    parser.add_argument("--steps-each", type=int, default=5, help="T, Langevin steps per level")
    parser.add_argument("--sigma-min", type=float, default=0.01, help="sigma_L, the last level")
    args = parser.parse_args(argv)
    with one_line_errors():
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=args.overrides)
        datamodule, _ = build_datamodule(cfg)
        datamodule.prepare_data()
        train = datamodule.dataset("train")
        x = datamodule.reference_samples(len(train), split="train")
        config = ncsnv2_config(x, args.steps_each, args.sigma_min)
    for key, value in asdict(config).items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    print("overrides: " + " ".join(config.overrides()))
    return config


if __name__ == "__main__":
    main()
