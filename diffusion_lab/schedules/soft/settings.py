"""A soft blur process's ``blur_schedule`` settings and the entry points that turn them into
levels (Daras et al. sec. 3.3, App. C, App. F.1.2): :func:`compute_schedule` runs a scheduler,
:func:`fit_schedule` reads, computes and caches the schedule of a process's training images."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import torch
from pydantic import Field

from diffusion_lab.config_types import PositiveFloat, PositiveInt
from diffusion_lab.errors import ConfigError
from diffusion_lab.schedules.soft.blur import SPACINGS, BlurFn, Spacing, candidate_blurs
from diffusion_lab.schedules.soft.mse_matched import mse_matched_levels
from diffusion_lab.schedules.soft.paths import OBJECTIVES, Objective
from diffusion_lab.schedules.soft.quantise import DISTANCE_RTOL
from diffusion_lab.schedules.soft.store import (
    SCHEDULE_FORMAT,
    BlurSchedule,
    data_hash,
    load_schedule,
    save_schedule,
    schedule_cache_path,
)
from diffusion_lab.schedules.soft.wasserstein import wasserstein_path_levels

log = logging.getLogger("diffusion_lab")

Method = Literal["wasserstein", "mse_matched", "linear", "geometric"]
METHODS: tuple[str, ...] = get_args(Method)
#: The schedulers that need no training images.
DATA_FREE = ("linear", "geometric")


def compute_schedule(
    method: str,
    x0: torch.Tensor | None,
    blur: BlurFn | None,
    *,
    name: str | None = None,
    num_levels: int = 32,
    blur_min: float = 0.01,
    blur_max: float = 23.0,
    sigma: float = 0.1,
    num_candidates: int = 256,
    spacing: str = "linear",
    ve_sigma_min: float = 0.01,
    ve_sigma_max: float = 50.0,
    progress: bool = False,
    objective: str = "fewest_levels",
) -> BlurSchedule:
    """Run scheduler ``method`` (wasserstein, mse_matched, linear or geometric) and wrap the
    result."""
    if method not in METHODS:
        raise ConfigError(f"unknown blur schedule method {method!r}: use {', '.join(METHODS)}")
    settings: dict[str, Any] = {
        "method": method,
        "num_levels": int(num_levels),
        "blur_min": float(blur_min),
        "blur_max": float(blur_max),
    }
    if method in DATA_FREE:
        if num_levels < 2:
            raise ConfigError(f"need at least 2 blur levels, got {num_levels}")
        levels = candidate_blurs(blur_min, blur_max, num_levels, method).tolist()
        return BlurSchedule(name or f"soft_{method}", levels, settings)
    if x0 is None or blur is None:
        raise ConfigError(f"blur schedule {method} needs training images and a blur")
    settings |= {"sigma": float(sigma), "num_images": int(x0.shape[0]),
                 "image_shape": list(x0.shape[1:])}  # fmt: skip
    if method == "wasserstein":
        settings |= {"num_candidates": int(num_candidates), "spacing": spacing,
                     "objective": objective, "distance_rtol": DISTANCE_RTOL,
                     "distance": "coupled: sqrt(E ||(C_i - C_j) x0||^2)"}  # fmt: skip
        levels, info = wasserstein_path_levels(
            x0, blur, num_levels, blur_min, blur_max, num_candidates, spacing, progress, objective
        )
    else:
        settings |= {"ve_sigma_min": float(ve_sigma_min), "ve_sigma_max": float(ve_sigma_max)}
        levels, info = mse_matched_levels(
            x0, blur, sigma, num_levels, blur_min, blur_max, ve_sigma_min, ve_sigma_max
        )
    return BlurSchedule(name or f"soft_{method}", levels, settings, data_hash(x0), info)


@dataclass(frozen=True)
class BlurScheduleSettings:
    """How a soft blur process chooses its levels: its ``blur_schedule`` settings block
    (``conf/process/soft_blur.yaml``; the options of ``conf/process/blur_schedule/`` set
    ``method``). The range (``blur_min``, ``blur_max``), the noise (``sigma_max``) and the blur
    (its kernel) are the process's own.

    ``method``: ``wasserstein`` (sec. 3.3, App. C), ``mse_matched`` (App. F.1.2, eq. 45),
    ``linear`` or ``geometric`` (no data). ``num_levels`` levels in all; the data-driven methods
    read the first ``num_images`` of the images given to ``fit``; ``num_candidates``,
    ``spacing`` and ``objective`` are the path search's (:func:`wasserstein_path_levels`),
    ``ve_sigma_min`` and ``ve_sigma_max`` the VE SDE that ``mse_matched`` matches. ``file``: a
    schedule written by ``python -m diffusion_lab.soft_schedule`` to use instead of computing
    one (:func:`fit_schedule`).
    """

    method: Method = "linear"
    num_levels: Annotated[int, Field(ge=2)] = 32
    num_candidates: Annotated[int, Field(ge=2)] = 256
    spacing: Spacing = "linear"
    objective: Objective = "fewest_levels"
    ve_sigma_min: PositiveFloat = 0.01
    ve_sigma_max: PositiveFloat = 50.0
    num_images: PositiveInt = 1000
    file: str | None = None

    def __post_init__(self) -> None:
        key = "process.blur_schedule"
        for name, choices in (("method", METHODS), ("spacing", SPACINGS),
                              ("objective", OBJECTIVES)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"{key}.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )
        if self.num_levels < 2:
            raise ConfigError(f"{key}.num_levels must be at least 2, got {self.num_levels}")
        if self.method == "wasserstein" and self.num_candidates < self.num_levels:
            raise ConfigError(
                f"{key}.num_candidates ({self.num_candidates}) must be at least num_levels "
                f"({self.num_levels}): the path chooses its levels among the candidates"
            )
        if not 0 < self.ve_sigma_min < self.ve_sigma_max:
            raise ConfigError(
                f"{key}.ve_sigma_min and ve_sigma_max must satisfy 0 < ve_sigma_min < "
                f"ve_sigma_max, got {self.ve_sigma_min} and {self.ve_sigma_max}"
            )
        if self.num_images < 1:
            raise ConfigError(f"{key}.num_images must be at least 1, got {self.num_images}")

    @classmethod
    def from_mapping(cls, values: Any) -> BlurScheduleSettings:
        """The settings of a config block (a mapping); a misspelt key is a ConfigError that
        names the closest one."""
        from diffusion_lab.schema import did_you_mean

        values = dict(values)
        for name in values:
            if name not in cls.__dataclass_fields__:
                raise ConfigError(
                    did_you_mean("process.blur_schedule", name, cls.__dataclass_fields__)
                )
        return cls(**values)

    @property
    def needs_data(self) -> bool:
        """Whether the levels are computed from training images (in ``fit``)."""
        return self.method not in DATA_FREE


def fit_schedule(
    settings: BlurScheduleSettings,
    x0: torch.Tensor | None,
    blur: BlurFn,
    *,
    blur_min: float,
    blur_max: float,
    sigma: float,
    blur_key: dict[str, Any],
    progress: bool = False,
) -> tuple[BlurSchedule, Path | None]:
    """The schedule ``settings`` give for the images ``x0`` (model range; the first
    ``settings.num_images`` are read), and the file it was read from or written to (None for
    the data-free methods).

    ``settings.file`` set: that file, whose method, blur_min, blur_max and num_levels must be the
    settings' (a schedule of other images is used with a warning). Otherwise the cache file keyed
    by the settings, the range, sigma, the blur (``blur_key``: what identifies ``blur``) and the
    hash of the images read (:func:`data_hash`) is read if it exists, else the schedule is
    computed, saved there and reused by any run that fits the same images with the same settings.
    """
    name = f"soft_{settings.method}"
    if not settings.needs_data:
        schedule = compute_schedule(settings.method, None, None, num_levels=settings.num_levels,
                                    blur_min=blur_min, blur_max=blur_max)  # fmt: skip
        return schedule, None
    if x0 is None:
        raise ConfigError(f"blur schedule {name} needs training images: fit the process to them")
    x0 = torch.as_tensor(x0).detach()[: settings.num_images].to("cpu", torch.float64)
    if settings.file:
        return _read_schedule_file(settings, x0, blur_min, blur_max), Path(settings.file)
    key = {**asdict(settings), "file": None, "blur_min": float(blur_min),
           "blur_max": float(blur_max), "sigma": float(sigma), "blur": blur_key,
           "distance_rtol": DISTANCE_RTOL, "format": SCHEDULE_FORMAT,
           "data_hash": data_hash(x0)}  # fmt: skip
    path = schedule_cache_path(name, key)
    if path.is_file():
        return load_schedule(path), path
    log.info("blur schedule %s: computing from %d training images", name, x0.shape[0])
    schedule = compute_schedule(
        settings.method, x0, blur, name=name, num_levels=settings.num_levels, blur_min=blur_min,
        blur_max=blur_max, sigma=sigma, num_candidates=settings.num_candidates,
        spacing=settings.spacing, ve_sigma_min=settings.ve_sigma_min,
        ve_sigma_max=settings.ve_sigma_max, progress=progress, objective=settings.objective,
    )  # fmt: skip
    save_schedule(path, schedule)
    log.info("blur schedule %s: saved to %s", name, path)
    return schedule, path


def _read_schedule_file(
    settings: BlurScheduleSettings, x0: torch.Tensor, blur_min: float, blur_max: float
) -> BlurSchedule:
    file = settings.file
    schedule = load_schedule(file)
    for key, want in (("method", settings.method), ("blur_min", blur_min),
                      ("blur_max", blur_max), ("num_levels", settings.num_levels)):  # fmt: skip
        have = schedule.settings.get(key)
        if have is None:
            continue
        if have != want if isinstance(want, str) else not math.isclose(have, want, rel_tol=1e-9):
            where = "process.blur_schedule" if key in ("method", "num_levels") else "process"
            raise ConfigError(
                f"blur schedule file {file} was computed with {key}={have}, the config asks for "
                f"{key}={want}: recompute it or change {where}.{key}"
            )
    if schedule.data_hash != data_hash(x0):
        log.warning("blur schedule file %s was computed from other images than these", file)
    return schedule
