"""A diffusers scheduler config (``scheduler_config.json``) as this project's VP process.

diffusers' DDPM-family schedulers (DDPM, DDIM, PNDM, ...) share the training chain: ``beta_start``,
``beta_end``, ``beta_schedule`` and ``num_train_timesteps`` (T), and what the network predicts
(``prediction_type``). Timestep k of diffusers (0-based, x_k with alphas_cumprod[k]) is t = (k + 1)
/ T of :class:`~diffusion_lab.processes.sde.VPSDE`, whose noise label there is k again. Everything
else in such a file (``clip_sample``, ``variance_type``, ``timestep_spacing``, ...) configures
diffusers' own sampling loop, which this project's samplers replace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusion_lab.errors import ConfigError

#: diffusers' ``beta_schedule`` -> ours: ``linear`` is DDPM's torch.linspace(beta_start, beta_end,
#: T); ``squaredcos_cap_v2`` is Nichol & Dhariwal's cosine, clipped at 0.999, as ``beta_cosine``.
SCHEDULES = {"linear": "beta_linear", "squaredcos_cap_v2": "beta_cosine"}
#: diffusers' ``prediction_type`` -> our ``method.parameterization``.
PREDICTIONS = {"epsilon": "eps"}
#: The defaults of ``DDPMScheduler.__init__`` (diffusers 0.42), for fields a file leaves out.
DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}


def vp_settings(scheduler: Mapping[str, Any]) -> dict[str, Any]:
    """``process`` settings (``schedule``, ``num_steps``, ``beta_min``, ``beta_max``, Score SDE's
    beta_i = beta_min / T .. beta_max / T) and the ``parameterization`` of a scheduler config.

    Raises :class:`ConfigError` naming a field with no counterpart here (given betas, another
    schedule, v-prediction, zero terminal SNR).
    """
    cfg = {field: scheduler.get(field, default) for field, default in DEFAULTS.items()}

    def refuse(field: str, why: str) -> ConfigError:
        return ConfigError(
            f"diffusers scheduler field {field} = {cfg[field]!r} cannot be converted: {why}"
        )

    if cfg["trained_betas"] is not None:
        raise refuse("trained_betas", "give the schedule by beta_schedule")
    if cfg["beta_schedule"] not in SCHEDULES:
        raise refuse("beta_schedule", f"supported: {', '.join(SCHEDULES)}")
    if cfg["prediction_type"] not in PREDICTIONS:
        raise refuse("prediction_type", f"supported: {', '.join(PREDICTIONS)}")
    if cfg["rescale_betas_zero_snr"]:
        raise refuse("rescale_betas_zero_snr", "the VP process keeps DDPM's terminal SNR")
    steps = cfg["num_train_timesteps"]
    if not isinstance(steps, int) or steps < 1:
        raise refuse("num_train_timesteps", "a positive integer")
    return {
        "schedule": SCHEDULES[cfg["beta_schedule"]],
        "num_steps": steps,
        "beta_min": float(cfg["beta_start"]) * steps,
        "beta_max": float(cfg["beta_end"]) * steps,
        "parameterization": PREDICTIONS[cfg["prediction_type"]],
    }
