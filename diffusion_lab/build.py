"""Compose a run's config (Hydra) and build its parts: the one place that instantiates
``_target_``s."""

from __future__ import annotations

import difflib
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError
from torch import nn

from diffusion_lab.callbacks.checkpoint import AtomicCheckpointIO
from diffusion_lab.callbacks.ranks import RankRegistry
from diffusion_lab.errors import ConfigError, DiffusionLabError
from diffusion_lab.metrics.evaluator import SampleEvaluator
from diffusion_lab.processes.base import ForwardProcess
from diffusion_lab.samplers.base import check_sampler
from diffusion_lab.schema import did_you_mean, parameters

log = logging.getLogger("diffusion_lab")


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with the project's errors unwrapped to one clear line.

    Every object of a run is built here, so a future Hydra target allow-list is a one-line change.
    """
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, DiffusionLabError):
            raise cause from None
        target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
        reason = cause if cause is not None else exc
        raise ConfigError(f"cannot build {target}: {reason}".splitlines()[0]) from None


def build_datamodule(cfg: DictConfig) -> tuple[L.LightningDataModule, list[str]]:
    """The DataModule and the metric names its data call for (``data.metrics``)."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    metrics = list(data_cfg.pop("metrics", []) or [])
    for value in data_cfg.values():  # a wrapped source data set (data=few_images): its own
        if isinstance(value, dict) and "_target_" in value:  # metrics are not the run's
            value.pop("metrics", None)
    return instantiate(data_cfg), metrics


#: The parts :func:`build_method` can give a method.
ALL_PARTS = {"network", "process", "optimizer", "sampler", "loss", "evaluator", "run_config"}


def build_method(cfg: DictConfig, metrics: list[str]) -> L.LightningModule:
    """The configured method, given the parts its constructor declares: network, process,
    optimiser (a partial, built by the method on the network's parameters), sampler, loss,
    evaluator and run config; a part it does not declare is not built (a classifier builds no
    sampler or loss).

    A sampler that cannot serve the process (a missing capability, steps out of range) stops
    here, before any training and before the evaluator loads (or, the first time, trains)
    what its metrics need. The parts are built in a fixed order (network first, from the
    seeded global RNG), so the same config gives the same weights.
    """
    # TF32 ("high") or bf16 ("medium") matmuls on GPUs that have them; "highest" keeps float32
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "highest"))
    annotations, takes_kwargs = parameters(get_object(cfg.method._target_))
    declared = ALL_PARTS if takes_kwargs else set(annotations)
    parts: dict[str, Any] = {
        "network": instantiate(cfg.network),
        "process": instantiate(cfg.process),
        "optimizer": instantiate(cfg.optimizer),
    }
    if "sampler" in declared:
        parts["sampler"] = instantiate(cfg.sampler)
        check_sampler(parts["sampler"], parts["process"])
    if "loss" in declared:
        parts["loss"] = instantiate(cfg.loss)
    if "evaluator" in declared:
        weights = cfg.get("inception_weights")
        parts["evaluator"] = (
            SampleEvaluator(metrics, inception_weights=weights) if metrics else None
        )
    if "run_config" in declared:
        parts["run_config"] = OmegaConf.to_container(cfg, resolve=True)
    method = instantiate(
        cfg.method,
        _partial_=True,  # the parts built above are passed as they are (Hydra would turn a
        _recursive_=False,  # dataclass part, e.g. a score-matching loss, into a dict)
        _convert_="all",  # plain lists and dicts, so checkpoints load with weights_only=True
    )
    return method(**{name: part for name, part in parts.items() if name in declared})


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """A Trainer with the configured loggers and callbacks and atomic checkpoint writes."""
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node]
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    try:
        return L.Trainer(
            **OmegaConf.to_container(cfg.trainer, resolve=True),
            logger=loggers or False,
            callbacks=[*callbacks, RankRegistry(Path(cfg.run_dir) / "ranks")],
            plugins=[AtomicCheckpointIO()],
            default_root_dir=cfg.run_dir,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"trainer: {exc}".splitlines()[0]) from None


def last_checkpoint_path(run_dir: str | Path) -> Path:
    """<run_dir>/checkpoints/last.ckpt, where the ``LastCheckpoint`` callback writes."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def checkpoint_global_step(path: Path) -> int:
    """The training step a checkpoint was written at (read without loading its tensors)."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def resume_if_requeued(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """Where a requeued SLURM job resumes: it starts again with its first overrides,
    ``ckpt_path=null`` included (preempted, or timed out with submitit's ``max_num_timeout``:
    ``SLURM_RESTART_COUNT`` > 0), and would retrain from step 0 in the same folder. It resumes
    from the latest of its folder's checkpoints: ``checkpoints/last.ckpt`` (an epoch end, or
    written when SLURM's SIGTERM stopped it) or Lightning's ``hpc_ckpt_N.ckpt`` (written on the
    requeue signal, SIGUSR1, when Lightning requeues the job itself). Otherwise ``ckpt_path``
    as it is."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    if ckpt_path is not None or restarts in ("", "0"):
        return ckpt_path
    candidates = [last_checkpoint_path(run_dir), *Path(run_dir).glob("hpc_ckpt_*.ckpt")]
    found = [path for path in candidates if path.is_file()]
    if not found:
        return ckpt_path
    latest = max(found, key=lambda path: (checkpoint_global_step(path), path.name))
    log.info("SLURM requeued this job (restart %s): resuming from %s", restarts, latest.name)
    return "last" if latest == last_checkpoint_path(run_dir) else str(latest)


def resolve_checkpoint(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """None (fresh run), a path, or ``last`` -> <run_dir>/checkpoints/last.ckpt, which must exist.

    Resuming is only ever what was asked for (an automatic resume surprised Lightning's users,
    Lightning-AI/pytorch-lightning#19827), or what a SLURM requeue implies
    (:func:`resume_if_requeued`).
    """
    if ckpt_path is None:
        return None
    path = last_checkpoint_path(run_dir) if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(
            f"checkpoint {path} not found: to resume, run with hydra.run.dir=<the run folder> "
            "ckpt_path=last, or give ckpt_path=<file>"
        )
    return str(path)


def load_safely(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True``, never more: a file that holds anything beyond
    tensors and plain values (code, in a malicious pickle) or is no torch file is a ConfigError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"{path} holds objects other than tensors and plain values (possibly code) and was not "
            "loaded: use a file that diffusion_lab wrote, from a source you trust"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path} is not a readable torch file ({reason}): give another") from None


def fitted_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the buffers that processes inside ``module`` fill from training data
    (``ForwardProcess.register_fitted``), whose shapes come from the data."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules(remove_duplicate=False)
        if isinstance(sub, ForwardProcess)
        for name in sub._fitted_names
    }


def load_checkpoint(path: str | Path, method: L.LightningModule) -> dict[str, Any]:
    """The checkpoint at ``path`` (see :func:`load_safely`), checked to fit ``method``: the same
    method and process families as recorded in its run config, the same keys and shapes."""
    checkpoint = load_safely(path)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path} has no state_dict: give a Lightning checkpoint")
    fix = "give the overrides it was trained with"
    trained = checkpoint.get("hyper_parameters", {}).get("run_config", {})
    for group in ("method", "process"):
        theirs = (trained.get(group) or {}).get("_target_")
        ours = method.hparams.get("run_config", {}).get(group, {}).get("_target_")
        if theirs and ours and theirs != ours:
            raise ConfigError(
                f"checkpoint {path} was trained with {group} {theirs}, this run has {ours}: {fix}"
            )
    expected = method.state_dict()
    fitted = fitted_keys(method)  # what a process estimated from data: any shape on load
    for key in [*expected, *(k for k in state if k not in expected)]:
        if key not in state or key not in expected:
            where = "this run's model" if key in expected else "the checkpoint"
            raise ConfigError(
                f"checkpoint {path} does not fit this run: only {where} has {key} (trained with "
                f"another method or network: {fix})"
            )
        if state[key].shape != expected[key].shape and key not in fitted:
            raise ConfigError(
                f"checkpoint {path} does not fit this run: {key} is {list(state[key].shape)} there "
                f"and {list(expected[key].shape)} here (trained with another network / "
                f"network.base_channels: {fix})"
            )
    return checkpoint


def compose_config(
    config_dir: str, overrides: list[str], config_name: str = "config"
) -> DictConfig:
    """Hydra's ``compose``, with a misspelt key or group option as a ConfigError that says
    what was meant (Hydra itself suggests adding the typo with ``+``)."""
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        try:
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        except MissingConfigException as exc:
            group, _, option = (exc.missing_cfg_file or "").rpartition("/")
            if not exc.options or not group:
                raise
            close = difflib.get_close_matches(option, exc.options, n=1)
            hint = (
                f"did you mean {group}={close[0]}?"
                if close
                else f"use one of {', '.join(exc.options)}"
            )
            raise ConfigError(f"{group} has no option {option}: {hint}") from None
        except ConfigCompositionException as exc:
            cause = exc.__cause__
            missing = isinstance(cause, (ConfigAttributeError, ConfigKeyError))
            if not missing or not isinstance(cause.parent_node, DictConfig):
                raise
            node = (cause.full_key or "").rpartition(".")[0]
            raise ConfigError(did_you_mean(node, cause.key, cause.parent_node.keys())) from None
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} interpolations
    with open_dict(cfg):
        del cfg.hydra
    return cfg
