"""``python -m diffusion_lab.run``: compose a config, train, sample, evaluate, write the run folder.

The run folder holds the resolved config (config.yaml), checkpoints/ (last.ckpt), samples/ (a PNG
grid per validation), samples.png and samples.pt (final EMA samples), metrics.csv and curves.png,
final_metrics.json and the loggers' files.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.build import (
    build_datamodule,
    build_method,
    build_trainer,
    last_checkpoint_path,
    load_checkpoint,
    resolve_checkpoint,
)
from diffusion_lab.callbacks.images import save_samples_picture
from diffusion_lab.callbacks.ranks import dead_ranks
from diffusion_lab.errors import (
    DataError,
    DiffusionLabError,
    TrainingDivergedError,
    TrainingFailedError,
)
from diffusion_lab.metrics.evaluator import SampleEvaluator
from diffusion_lab.schema import check_config, check_overrides

log = logging.getLogger("diffusion_lab")


def wandb_mode() -> str:
    """W&B's mode: ``WANDB_MODE`` if set, online if logged in, else offline (never a prompt)."""
    import os

    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    import wandb

    return "online" if wandb.login(prompt=False, verify=False) else "offline"


OmegaConf.register_new_resolver("wandb_mode", wandb_mode, replace=True)


def config_dir() -> str:
    """conf/ shipped inside the package (wheel) or beside it (source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError("diffusion_lab's conf/ folder is missing: reinstall the package")


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Stop with one clear line, not a traceback, on the project's own errors."""
    try:
        yield
    except DiffusionLabError as exc:
        print(f"diffusion_lab: error: {exc}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def naming_last_checkpoint(run_dir: Path) -> Iterator[None]:
    """End a failed fit with one line naming the run's last checkpoint and how to resume.

    A divergence error gets the checkpoint's path (the method says to resume, but only the run
    knows its folder); any other exception in training or validation (e.g. a sampler raising)
    becomes a ``TrainingFailedError`` line, its traceback written to ``<run_dir>/error.log``.
    """
    try:
        yield
    except DiffusionLabError as exc:
        if not isinstance(exc, TrainingDivergedError):
            raise
        raise TrainingDivergedError(f"{exc} {resume_hint(run_dir)}") from None
    except Exception as exc:
        (run_dir / "error.log").write_text(traceback.format_exc())
        what = f"by {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        gone = dead_ranks(run_dir / "ranks")
        if gone:
            what = "on every rank: " + ", ".join(
                f"rank {rank} of {size} (pid {pid}) died or was killed" for rank, size, pid in gone
            )
        raise TrainingFailedError(
            f"training stopped {what} (traceback in {run_dir / 'error.log'}) {resume_hint(run_dir)}"
        ) from None


def offline_overrides(experiment: str) -> str | None:
    """The overrides of an experiment's ``# offline:`` line (embedded data instead of a
    download; empty for an experiment that is offline already), None without such a line."""
    path = Path(config_dir()) / "experiment" / f"{experiment}.yaml"
    for line in path.read_text().splitlines():
        if line.startswith("# offline:"):
            return line.removeprefix("# offline:").split("(")[0].strip()
    return None


@contextmanager
def naming_offline_line() -> Iterator[None]:
    """A missing data set of an experiment says how to run that experiment offline."""
    try:
        yield
    except DataError as exc:
        experiment = HydraConfig.get().runtime.choices.get("experiment")
        offline = offline_overrides(experiment) if experiment else ""
        if not offline:
            raise
        command = f"python -m diffusion_lab.run +experiment={experiment} {offline}"
        raise DataError(f"{exc}; this experiment offline: {command}") from None


def resume_hint(run_dir: Path) -> str:
    """The last good checkpoint (or "none written yet") and the command line to resume."""
    path = last_checkpoint_path(run_dir)
    if not path.is_file():
        return "(last good checkpoint: none written yet)"
    return f"(last good checkpoint: {path}: resume with hydra.run.dir={run_dir} ckpt_path=last)"


def train(cfg: DictConfig) -> float | None:
    """Fit, then sample with the final (EMA) weights and score the samples."""
    check_config(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    datamodule, metrics = build_datamodule(cfg)
    SampleEvaluator.prepare(metrics)  # e.g. train the digits classifier, before the seed is set
    L.seed_everything(cfg.seed, workers=True)
    with naming_offline_line():  # a missing or corrupt data set stops the run here, before training
        datamodule.prepare_data()
        datamodule.setup("fit")
    method = build_method(cfg, metrics)
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, run_dir)
    if ckpt_path is not None:
        load_checkpoint(ckpt_path, method)  # safe to load, and fits this run's model
    trainer = build_trainer(cfg)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    with naming_last_checkpoint(run_dir):
        trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if trainer.interrupted or not trainer.is_global_zero:
        return None
    results = final_evaluation(method, datamodule, cfg.final_samples, run_dir)
    log.info("final metrics: %s", json.dumps(results))
    for logger in trainer.loggers:
        logger.log_metrics({f"final/{k}": v for k, v in results.items()}, step=trainer.global_step)
        log_image = getattr(logger, "log_image", None)  # W&B takes the pictures too
        if callable(log_image):
            pictures = [p for p in ("samples.png", "curves.png") if (run_dir / p).is_file()]
            for picture in pictures:
                log_image(key=f"final/{picture[:-4]}", images=[str(run_dir / picture)])
        logger.finalize("success")
    return next(iter(results.values()), None)


def final_evaluation(method, datamodule, num_samples: int, run_dir: Path) -> dict[str, float]:
    """Draw ``num_samples`` with the trained weights; save them and their scores."""
    if num_samples <= 0:
        return {}
    samples, nfe = method.generate(num_samples)
    torch.save(samples.cpu(), run_dir / "samples.pt")
    save_samples_picture(samples[:256], run_dir / "samples.png")
    results = {"nfe": float(nfe), "num_samples": float(num_samples)}
    results = {**method.sample_metrics(samples, datamodule), **results}
    (run_dir / "final_metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Entry point; with -m, one call per multirun job."""
    with one_line_errors():
        try:
            return train(cfg)
        finally:
            finish_wandb()


def finish_wandb() -> None:
    """Close a W&B run after each (multirun) job, if one was opened."""
    if "wandb" in sys.modules:
        sys.modules["wandb"].finish()


if __name__ == "__main__":
    with one_line_errors():  # every job's config, before Hydra starts any
        check_overrides(sys.argv[1:], config_dir())
    main()
