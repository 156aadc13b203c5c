"""``python -m diffusion_lab.evaluate RUN_DIR``: re-score a run folder's ``samples.pt``.

The metrics are those of the run's data set (``data.metrics``), computed by
``metrics.evaluator.SampleEvaluator`` as during training.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from diffusion_lab.build import build_datamodule, load_safely
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.evaluator import SampleEvaluator
from diffusion_lab.sample import OneLineParser, check_run_folder, read_yaml
from diffusion_lab.schema import check_config
from diffusion_lab.stops import one_line_errors


def run_files(run_dir: Path) -> tuple[Path, Path]:
    """The run folder's config.yaml and samples.pt, which must both exist."""
    check_run_folder(run_dir)
    config, samples = run_dir / "config.yaml", run_dir / "samples.pt"
    if not config.is_file():
        raise ConfigError(
            f"{run_dir} has no config.yaml, so it is not a run folder: give the folder a run "
            "wrote (its hydra.run.dir)"
        )
    if not samples.is_file():
        raise ConfigError(
            f"no samples at {samples}: train the run first (it writes samples.pt at the end; "
            "final_samples=0 writes none)"
        )
    return config, samples


def main(argv: list[str] | None = None) -> None:
    """Re-score a run folder's final samples with the metrics of its data set."""
    parser = OneLineParser(
        prog="python -m diffusion_lab.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    with one_line_errors():
        config, samples_path = run_files(args.run_dir)
        cfg = read_yaml(config, OmegaConf.create)
        check_config(cfg)
        datamodule, metrics = build_datamodule(cfg)
        samples = load_safely(samples_path)
        evaluator = SampleEvaluator(metrics, inception_weights=cfg.get("inception_weights"))
        print(json.dumps(evaluator(samples, datamodule), indent=2))


if __name__ == "__main__":
    main()
