"""Noise schedules, and the heuristics that choose their levels.

- :mod:`~diffusion_lab.schedules.sigma`: NCSN sigma schedules for VE processes, the five of
  Spagnoletti et al. (geometric, linear, cosine, squared_cosine, sigmoid).
- :mod:`~diffusion_lab.schedules.beta`: DDPM beta schedules for VP processes (beta_linear,
  beta_cosine).
- :mod:`~diffusion_lab.schedules.ncsnv2`: NCSNv2's Techniques 1, 2 and 4 (sigma_1, the common
  ratio and L, the Langevin step size); ``python -m diffusion_lab.noise_levels`` prints them.

The names are those of the Hydra config group ``conf/schedule/`` (they reach a process as
``process.schedule``). No name is both a sigma and a beta schedule, so one kind is never read as
the other: asked for the wrong kind, :func:`sigma_schedule` and :func:`beta_schedule` stop with a
one-line ConfigError that names the process's kind and its choices.
"""

from __future__ import annotations

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.schedules.beta import BETA_SCHEDULES
from diffusion_lab.schedules.sigma import SIGMA_SCHEDULES


def _check_name(name: str, kind: str, process: str, names: dict, other: dict) -> None:
    """A ConfigError unless ``name`` is one of ``names`` (the schedules of ``kind``)."""
    if name in names:
        return
    choices = f"schedule={', '.join(list(names)[:-1])} or {list(names)[-1]}"
    if name in other:
        other_kind = "beta" if kind == "sigma" else "sigma"
        raise ConfigError(
            f"schedule {name!r} is a {other_kind} schedule; process {process} needs a {kind} "
            f"schedule: {choices}"
        )
    raise ConfigError(f"unknown {kind} schedule {name!r}: use {choices}")


def sigma_schedule(name: str, sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """The L noise levels of schedule ``name``, from sigma_max down to sigma_min exactly (float64)."""
    if not 0 < sigma_min < sigma_max:
        raise ConfigError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    if num_levels < 2:
        raise ConfigError(f"need at least 2 noise levels, got {num_levels}")
    _check_name(name, "sigma", "VESDE", SIGMA_SCHEDULES, BETA_SCHEDULES)
    levels = SIGMA_SCHEDULES[name](sigma_max, sigma_min, num_levels)
    levels[0], levels[-1] = (
        sigma_max,
        sigma_min,
    )  # exact end points (exp(log x) may be off by an ulp)
    return levels


def beta_schedule(name: str, num_steps: int, beta_min: float, beta_max: float) -> torch.Tensor:
    """The N discrete betas of schedule ``name`` (float64), beta_i ~ beta(t_i) / N."""
    _check_name(name, "beta", "VPSDE / SubVPSDE", BETA_SCHEDULES, SIGMA_SCHEDULES)
    return BETA_SCHEDULES[name](num_steps, beta_min, beta_max)
