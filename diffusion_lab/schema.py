"""The config's schema, derived from what it builds: every node with a ``_target_`` is checked
against the type hints of that target's signature (ranges as ``config_types`` aliases), the
trainer against ``lightning.Trainer``'s and the root keys against :class:`Run`, with pydantic.

Values are checked as the JSON they are (strict: no string is a number, no float an int), before
anything is built; a ConfigError names the full key. A misspelt key gets a "did you mean".
"""

from __future__ import annotations

import difflib
import inspect
import json
import pydoc
import typing
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace
from typing import Any, Literal

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from pydantic import ConfigDict, TypeAdapter, ValidationError

from diffusion_lab.config_types import (
    BatchLimit,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    StepLimit,
    UnitFloat,
)
from diffusion_lab.errors import ConfigError


@dataclass
class Run:
    """The root config's own keys (the rest are its groups)."""

    seed: int
    final_samples: NonNegativeInt
    ckpt_path: str | None
    run_dir: str
    # both absent from the configs of older run folders
    inception_weights: str | None = None
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"


#: Ranges of third-party targets' numeric arguments, on top of the types their signatures give.
THIRD_PARTY: dict[Any, dict[str, Any]] = {
    L.Trainer: {
        "max_steps": StepLimit,
        "max_epochs": StepLimit | None,
        "min_steps": NonNegativeInt | None,
        "min_epochs": NonNegativeInt | None,
        "num_nodes": PositiveInt,
        "check_val_every_n_epoch": PositiveInt | None,
        "val_check_interval": BatchLimit | None,
        "log_every_n_steps": PositiveInt | None,
        "num_sanity_val_steps": StepLimit | None,
        "accumulate_grad_batches": PositiveInt,
        "gradient_clip_val": NonNegativeFloat | None,
        "limit_train_batches": BatchLimit | None,
        "limit_val_batches": BatchLimit | None,
        "limit_test_batches": BatchLimit | None,
        "limit_predict_batches": BatchLimit | None,
    },
    torch.optim.Adam: {
        "lr": NonNegativeFloat,
        "betas": tuple[UnitFloat, UnitFloat],
        "eps": NonNegativeFloat,
        "weight_decay": NonNegativeFloat,
    },
}
#: Keys of a node that the run reads itself rather than passing them to the target: a data
#: set's metrics, wherever its node stands (a blur schedule carries a copy of ``data``; a
#: wrapped data set, ``data.source``, its own).
READ_BY_RUN = ("metrics",)
_STRICT = ConfigDict(strict=True, arbitrary_types_allowed=True)


@cache
def parameters(target: Callable) -> tuple[dict[str, Any], bool]:
    """The annotated parameters of ``target`` (a class: its ``__init__``) and whether it takes
    ``**kwargs``."""
    function = inspect.unwrap(target.__init__ if inspect.isclass(target) else target)
    signature = inspect.signature(function)
    hints: dict[str, Any] = {}
    for name, hint in function.__annotations__.items():  # one by one: a hint that names a type
        holder = SimpleNamespace(__annotations__={name: hint})  # known only to type checkers is Any
        with suppress(NameError):
            hints |= typing.get_type_hints(holder, function.__globals__, include_extras=True)
    names = [
        p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    annotations = {p.name: hints.get(p.name, Any) for p in names if p.name != "self"}
    annotations.update(THIRD_PARTY.get(target, {}))
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    return annotations, takes_kwargs


def did_you_mean(node: str, key: str, known: Iterable[str]) -> str:
    """``<node> has no key <key>: did you mean <node>.<closest>?`` (or the keys it has)."""
    where = node or "the config"
    prefix = f"{node}." if node else ""
    known = [k for k in known if not k.startswith("_")]  # not Hydra's _target_, ...
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"its keys are {', '.join(known)}"
    return f"{where} has no key {key}: {hint}"


def check_value(key: str, value: Any, annotation: Any) -> None:
    """A ConfigError unless ``value`` (as its JSON) fits ``annotation``."""
    try:
        TypeAdapter(annotation, config=_STRICT).validate_json(json.dumps(value), strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        error = next((e for e in errors if "instance" not in e["type"]), errors[0])
        fields = [part for part in error["loc"] if isinstance(part, str)]  # in a settings block
        if fields:
            key, value = ".".join([key, *fields]), error["input"]
        raise ConfigError(f"{key} {describe(error)}, got {value!r}") from None


def describe(error: Mapping[str, Any]) -> str:
    """pydantic's complaint as "must be ..."."""
    ctx = error.get("ctx", {})
    for bound, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            return f"must be {sign} {ctx[bound]}"
    return error["msg"].replace("Input should be", "must be")


def check_node(key: str, values: Mapping[str, Any], target: Callable) -> None:
    """The keys and values of one node against ``target``'s signature."""
    annotations, takes_kwargs = parameters(target)
    for name, value in values.items():
        full_key = f"{key}.{name}" if key else name
        data_node = key == "data" or key.endswith((".data", ".source"))
        read_by_run = name in READ_BY_RUN and data_node
        if name.startswith("_") and name.endswith("_") or read_by_run:
            continue  # Hydra's _target_, _partial_, ...
        if name not in annotations:
            if not takes_kwargs:
                raise ConfigError(did_you_mean(key, name, annotations))
        elif not (isinstance(value, Mapping) and "_target_" in value):  # built, then passed
            check_value(full_key, value, annotations[name])


def target_object(key: str, target: str) -> Any:
    """The class or function a ``_target_`` names, as Hydra will import it."""
    found = pydoc.locate(target)
    if found is None:
        where = f"{key}._target_" if key else "_target_"
        raise ConfigError(f"{where} names nothing importable: {target}")
    return found


def check_tree(key: str, value: Any) -> None:
    """Every node with a ``_target_`` in ``value``, at any depth."""
    if isinstance(value, Mapping):
        if "_target_" in value:
            check_node(key, value, target_object(key, value["_target_"]))
        for name, child in value.items():
            check_tree(f"{key}.{name}" if key else name, child)
    elif isinstance(value, list):
        for i, child in enumerate(value):
            check_tree(f"{key}[{i}]", child)


def check_config(cfg: DictConfig) -> None:
    """The whole composed config against the schema: a ConfigError on the first problem."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    own = {k: v for k, v in tree.items() if not isinstance(v, Mapping) and v is not None}
    check_node("", own, Run)
    check_node("trainer", tree.get("trainer") or {}, L.Trainer)
    check_tree("", tree)
    check_draws_samples(tree)


def check_draws_samples(tree: Mapping[str, Any]) -> None:
    """``final_samples`` > 0 asks the method to sample: one that takes no sampler (a classifier)
    cannot."""
    target = (tree.get("method") or {}).get("_target_")
    if not tree.get("final_samples") or target is None:
        return
    annotations, takes_kwargs = parameters(target_object("method", target))
    if not takes_kwargs and "sampler" not in annotations:
        raise ConfigError(
            f"final_samples={tree['final_samples']}: {target} takes no sampler and draws no "
            "samples: set final_samples=0"
        )
