"""``python -m diffusion_lab.run``: compose a config, train, sample, evaluate, write the run folder.

The run folder holds the resolved config (config.yaml), checkpoints/ (last.ckpt), samples/ (a PNG
grid per validation), samples.png and samples.pt (final EMA samples), metrics.csv and curves.png,
final_metrics.json and the loggers' files.

Every stop ends with one line on stderr, the last one printed (progress bars are closed first):

- exit 2, ``diffusion_lab: error: ...``: bad input, a divergence (a NaN loss, NaN samples), a
  failed checkpoint write, a crash in training or in the final sampling; the line names the
  checkpoint kept and the command that goes on. A ``-m`` sweep runs every job and ends with one
  such line per failed job (its number, overrides, folder and reason).
- exit 130 (Ctrl-C, SIGINT) or 143 (SIGTERM), ``diffusion_lab: interrupted: ...``: the step, the
  checkpoint kept and the command that resumes (or, during the final sampling, that samples).
"""

from __future__ import annotations

import copy
import json
import logging
import shlex
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from diffusion_lab.build import (
    build_datamodule,
    build_method,
    build_trainer,
    compose_config,
    load_checkpoint,
    resolve_checkpoint,
    resume_if_requeued,
)
from diffusion_lab.callbacks.images import save_samples_picture
from diffusion_lab.errors import (
    DataError,
    DiffusionLabError,
)
from diffusion_lab.metrics.evaluator import (
    check_samples_finite,
)
from diffusion_lab.schema import check_config
from diffusion_lab.stops import (
    RunInterrupted,
    close_progress_bars,
    final_stage,
    interrupts_named,
    naming_last_checkpoint,
    one_line_errors,
    print_last_lines,
    stop_line,
)

log = logging.getLogger("diffusion_lab")

#: Hydra's record of a resumed run (``.hydra/``), written by :func:`write_hydra_record` once the
#: checkpoint is accepted; None when Hydra writes it itself (see :func:`defer_hydra_record`).
DEFERRED_RECORD: str | None = None
#: Hydra's override that keeps it from writing its record (Lightning's DDP launcher adds it too).
NO_RECORD = "hydra.output_subdir=null"


class SweepInterrupted(BaseException):
    """A sweep job interrupted: ends the whole sweep (Hydra goes on after an ``Exception``)."""

    def __init__(self, error: RunInterrupted) -> None:
        super().__init__(str(error))
        self.error = error


def wandb_mode() -> str:
    """W&B's mode: ``WANDB_MODE`` if set, online if logged in, else offline (never a prompt)."""
    import os

    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    import wandb

    return "online" if wandb.login(prompt=False, verify=False) else "offline"


def run_stamp() -> str:
    """The run folder's name under ``outputs/``: the launch time (``%Y-%m-%d/%H-%M-%S``), or
    inside a SLURM job step (``srun``) the step, ``slurm-<job>.<step>``: every task ``srun``
    starts composes its own config, and the clock could give each its own folder; a requeued
    job runs its steps again under the same names, so it finds its checkpoints."""
    import os
    from datetime import datetime

    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    if job and step:
        return f"slurm-{job}.{step}"
    return datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


OmegaConf.register_new_resolver("wandb_mode", wandb_mode, replace=True)
OmegaConf.register_new_resolver("run_stamp", run_stamp, replace=True)


def config_dir() -> str:
    """conf/ shipped inside the package (wheel) or beside it (source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError("diffusion_lab's conf/ folder is missing: reinstall the package")


def run_overrides() -> list[str]:
    """The run's own overrides (Hydra's ``overrides.task``), none outside a Hydra job."""
    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def resume_command(run_dir: Path) -> str:
    """The shell command that resumes the run in ``run_dir`` from its last.ckpt, with its
    overrides (``ckpt_path`` replaced)."""
    kept = [o for o in run_overrides() if o.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
    words = ["python", "-m", "diffusion_lab.run", f"hydra.run.dir={run_dir}", "ckpt_path=last"]
    return " ".join(shlex.quote(word) for word in [*words, *kept])


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


def defer_hydra_record(argv: list[str]) -> list[str]:
    """``argv`` for a resumed run (``ckpt_path`` given, no ``-m``) with Hydra told not to write
    its record (``.hydra/config.yaml``, ``overrides.yaml``, which ``diffusion_lab.sample``
    reads) before the job starts: :func:`write_hydra_record` writes it once the checkpoint is
    accepted, so that a refused resume (another width, say) leaves the folder as it was."""
    global DEFERRED_RECORD
    try:
        args = get_args_parser().parse_args(argv[1:])
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except (HydraException, SystemExit):
        return argv
    keys = {override.key_or_group: override for override in parsed}
    ckpt = keys.get("ckpt_path")
    asks = args.multirun or args.help or args.hydra_help or args.info or args.cfg
    if asks or ckpt is None or ckpt.value() is None or "hydra.output_subdir" in keys:
        return argv
    DEFERRED_RECORD = ".hydra"
    return [*argv, NO_RECORD]


def write_hydra_record(cfg: DictConfig, run_dir: Path) -> None:
    """Hydra's record of a resumed run, as Hydra writes it (``config.yaml``, ``hydra.yaml``,
    ``overrides.yaml`` in ``.hydra/``), once its checkpoint is accepted; nothing unless
    :func:`defer_hydra_record` held it back."""
    if DEFERRED_RECORD is None or not HydraConfig.initialized():
        return
    hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    node = hydra_cfg.hydra  # Hydra's nodes are read-only, each on its own
    with read_write(node), read_write(node.overrides):
        node.output_subdir = DEFERRED_RECORD
        node.overrides.hydra = [o for o in node.overrides.hydra if o != NO_RECORD]
    folder = run_dir / DEFERRED_RECORD
    folder.mkdir(parents=True, exist_ok=True)
    records = {"config.yaml": cfg, "hydra.yaml": hydra_cfg}
    records["overrides.yaml"] = hydra_cfg.hydra.overrides.task
    for name, node in records.items():
        (folder / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")


def check_overrides(argv: list[str], config_dir: str) -> None:
    """Compose and check what ``python -m diffusion_lab.run argv`` will run (every job of a -m
    sweep) before Hydra starts, so that a misspelt key or a bad value in any job stops the run
    with one line. Whatever else Hydra refuses, Hydra reports."""
    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.cfg or args.config_path or args.config_dir:
        return
    try:
        if args.multirun:
            parsed = OverridesParser.create().parse_overrides(args.overrides)
            jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        else:
            jobs = [args.overrides]
        configs = [compose_config(config_dir, job, args.config_name or "config") for job in jobs]
    except HydraException:
        return
    for cfg in configs:
        with open_dict(cfg):
            cfg.run_dir = ""  # Hydra's output folder, known only once the job runs
        check_config(cfg)


def train(cfg: DictConfig) -> float | None:
    """Fit, then sample with the final (EMA) weights and score the samples."""
    run_dir = Path(cfg.run_dir)
    with interrupts_named("before training started: run the command again"):
        check_config(cfg)
        with open_dict(cfg):  # before the loggers read it: the CSV rows are kept too
            cfg.ckpt_path = resume_if_requeued(cfg.ckpt_path, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        datamodule, metrics = build_datamodule(cfg)
        L.seed_everything(cfg.seed, workers=True)
        with naming_offline_line():  # a missing or corrupt data set stops the run here
            datamodule.prepare_data()
            datamodule.setup("fit")
        method = build_method(cfg, metrics)
        ckpt_path = resolve_checkpoint(cfg.ckpt_path, run_dir)
        if ckpt_path is not None:
            load_checkpoint(ckpt_path, method)  # safe to load, and fits this run's model
        trainer = build_trainer(cfg)
        if trainer.is_global_zero:
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
            write_hydra_record(cfg, run_dir)
    with naming_last_checkpoint(run_dir, trainer, resume_command(run_dir)):
        trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if trainer.interrupted:  # Lightning returned instead of exiting
            raise KeyboardInterrupt
    if not trainer.is_global_zero:
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
    """Draw ``num_samples`` with the trained weights, on the device that trained them; save
    them and their scores.

    NaN or infinite samples are neither saved nor scored (FID's eigenvalue solver crashes on
    them): one line says so. Ctrl-C here ends with the command that samples (or scores) again.
    """
    if num_samples <= 0:
        return {}
    sample_again = (
        f"sample with python -m diffusion_lab.sample {shlex.quote(str(run_dir))} "
        f"--num-samples {num_samples} --evaluate"
    )
    with final_stage(run_dir, "sampling", sample_again):
        log.info("final sampling: %d samples with the final weights", num_samples)
        method.to(method.trainer.strategy.root_device)  # fit ends with the model on the CPU
        samples, nfe = method.generate(num_samples)
        samples = samples.cpu()
        check_samples_finite(
            samples,
            f"final samples (step {method.global_step})",
            "the weights have diverged though the loss stayed finite, or the sampler is "
            "unstable: lower the learning rate (optimizer.lr) and train again, or draw samples "
            f"with another sampler (python -m diffusion_lab.sample {run_dir} sampler=NAME)",
        )
    torch.save(samples.cpu(), run_dir / "samples.pt")
    save_samples_picture(samples[:256], run_dir / "samples.png")
    results = {"nfe": float(nfe), "num_samples": float(num_samples)}
    score_again = f"score them with python -m diffusion_lab.evaluate {shlex.quote(str(run_dir))}"
    with final_stage(run_dir, "scoring", f"samples.pt is saved: {score_again}"):
        results = {**method.sample_metrics(samples, datamodule), **results}
    (run_dir / "final_metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


@dataclass
class SweepJob:
    """A job of a ``-m`` sweep run in this process: its number, overrides, folder and, when it
    failed, the one-line reason."""

    num: int
    overrides: list[str]
    folder: str
    failure: str | None = None


#: The jobs of this process's sweep (Hydra's basic launcher runs them one after the other here).
SWEEP_JOBS: list[SweepJob] = []


def is_sweep_job() -> bool:
    """Whether the running Hydra job is one of a ``-m`` sweep run in this process (Hydra's basic
    launcher). Jobs that other launchers (submitit, joblib) run elsewhere stop as a single run
    does, each with its own line and exit code, which their launcher reports."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    return launcher.rsplit(".", 1)[-1] == "BasicLauncher"


def run_sweep_job(cfg: DictConfig) -> float | None:
    """Run one job of a sweep; a failure is logged and kept for :func:`end_sweep`, and the
    sweep goes on to the next job. An interrupt (Ctrl-C) ends the whole sweep."""
    hydra_cfg = HydraConfig.get()
    job = SweepJob(hydra_cfg.job.num, run_overrides(), str(hydra_cfg.runtime.output_dir))
    SWEEP_JOBS.append(job)
    try:
        return train(cfg)
    except (RunInterrupted, KeyboardInterrupt) as exc:
        stop = exc if isinstance(exc, RunInterrupted) else RunInterrupted("interrupted (Ctrl-C)")
        job.failure = str(stop)
        raise SweepInterrupted(stop) from None
    except DiffusionLabError as exc:
        job.failure = str(exc)
    except Exception as exc:  # outside training (which names its own errors): a bug
        error_log = Path(job.folder) / "error.log"
        error_log.write_text(traceback.format_exc())
        reason = str(exc).splitlines()[0] if str(exc) else ""
        job.failure = f"stopped by {type(exc).__name__}: {reason} (traceback in {error_log})"
    finally:
        finish_wandb()
    close_progress_bars()
    log.error("sweep job %d failed (the sweep goes on): %s", job.num, job.failure)
    return None


def distinguishing_overrides(jobs: list[SweepJob]) -> list[list[str]]:
    """Each job's overrides that not every job shares (all of them for a single job)."""
    if len(jobs) < 2:
        return [job.overrides for job in jobs]
    shared = set.intersection(*(set(job.overrides) for job in jobs))
    return [[o for o in job.overrides if o not in shared] or job.overrides for job in jobs]


def end_sweep(interrupted: RunInterrupted | None = None) -> None:
    """After a sweep: one line per failed job (number, overrides, folder, reason) and exit 2,
    or 130 when it was interrupted; nothing when every job finished (or no sweep ran)."""
    shown = dict(zip((id(job) for job in SWEEP_JOBS), distinguishing_overrides(SWEEP_JOBS)))
    failed = [job for job in SWEEP_JOBS if job.failure is not None]
    if interrupted is not None:
        failed = failed[:-1]  # the interrupted job has its own line, the last
    if not failed and interrupted is None:
        return
    lines = [
        f"diffusion_lab: error: sweep job {job.num} ({' '.join(shown[id(job)])}) failed, "
        f"folder {job.folder}: {job.failure}"
        for job in failed
    ]
    if interrupted is not None:
        lines.append(stop_line(RunInterrupted(f"sweep stopped: {interrupted}")))
    print(f"sweep: {len(failed)} of {len(SWEEP_JOBS)} jobs failed", flush=True)
    print_last_lines(*lines)
    sys.exit(interrupted.exit_code if interrupted is not None else 2)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Entry point; with -m, one call per multirun job."""
    if is_sweep_job():
        return run_sweep_job(cfg)
    with one_line_errors():
        try:
            return train(cfg)
        except KeyboardInterrupt:  # after the final scores (the stages before name their own)
            raise RunInterrupted("interrupted (Ctrl-C) after the final evaluation") from None
        finally:
            finish_wandb()


def finish_wandb() -> None:
    """Close a W&B run after each (multirun) job, if one was opened."""
    if "wandb" in sys.modules:
        sys.modules["wandb"].finish()


def cli() -> None:
    """``python -m diffusion_lab.run``: check every job's config before Hydra starts any, hold
    back Hydra's record of a resumed run until its checkpoint is accepted, run, and end a sweep
    with its failed jobs."""
    with one_line_errors():
        check_overrides(sys.argv[1:], config_dir())
    sys.argv = defer_hydra_record(sys.argv)
    try:
        main()
    except SweepInterrupted as stop:
        end_sweep(stop.error)
    end_sweep()


if __name__ == "__main__":
    cli()
