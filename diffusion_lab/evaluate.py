"""``python -m diffusion_lab.evaluate RUN_DIR``: re-score a run folder's ``samples.pt``.

The metrics are those of the run's data set (``data.metrics``), computed by
``metrics.evaluator.SampleEvaluator`` as during training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from diffusion_lab.build import build_datamodule, load_safely
from diffusion_lab.metrics.evaluator import SampleEvaluator
from diffusion_lab.run import one_line_errors
from diffusion_lab.schema import check_config


def main(argv: list[str] | None = None) -> None:
    """Re-score a run folder's final samples with the metrics of its data set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    with one_line_errors():
        cfg = OmegaConf.load(args.run_dir / "config.yaml")
        check_config(cfg)
        datamodule, metrics = build_datamodule(cfg)
        samples = load_safely(args.run_dir / "samples.pt")
        print(json.dumps(SampleEvaluator(metrics)(samples, datamodule), indent=2))


if __name__ == "__main__":
    main()
