"""``python -m diffusion_lab.evaluate RUN_DIR``: re-score a run folder's ``samples.pt``.

The metrics are those of the run's data set (``data.metrics``), computed by
``metrics.evaluator.SampleEvaluator`` as during training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffusion_lab.build import build_datamodule
from diffusion_lab.metrics.evaluator import SampleEvaluator


def main(argv: list[str] | None = None) -> None:
    """Re-score a run folder's final samples with the metrics of its data set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    cfg = OmegaConf.load(args.run_dir / "config.yaml")
    datamodule, metrics = build_datamodule(cfg)
    samples = torch.load(args.run_dir / "samples.pt", weights_only=True)
    print(json.dumps(SampleEvaluator(metrics)(samples, datamodule), indent=2))


if __name__ == "__main__":
    main()
