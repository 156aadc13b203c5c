"""A diffusers scheduler config (``scheduler_config.json``) as this project's VP or VE process.

diffusers' DDPM-family schedulers (DDPM, DDIM, PNDM, ...) share the training chain: ``beta_start``,
``beta_end``, ``beta_schedule`` and ``num_train_timesteps`` (T), and what the network predicts
(``prediction_type``). Timestep k of diffusers (0-based, x_k with alphas_cumprod[k]) is t = (k + 1)
/ T of :class:`~diffusion_lab.processes.sde.VPSDE`, whose noise label there is k again. Everything
else in such a file (``clip_sample``, ``variance_type``, ``timestep_spacing``, ...) configures
diffusers' own sampling loop, which this project's samplers replace.

diffusers' ``ScoreSdeVeScheduler`` (NCSN++'s) is Score SDE's VE SDE with sigma(t) = sigma_min
(sigma_max / sigma_min)^t (eq. 31, the geometric schedule of
:class:`~diffusion_lab.processes.sde.VESDE`) and the settings of its predictor-corrector sampler
(Alg. 2: ``snr``, ``correct_steps`` Langevin steps, t from 1 down to ``sampling_eps``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from diffusion_lab.errors import ConfigError

#: diffusers' ``beta_schedule`` -> ours: ``linear`` is DDPM's torch.linspace(beta_start, beta_end,
#: T); ``squaredcos_cap_v2`` is Nichol & Dhariwal's cosine, clipped at 0.999, as ``beta_cosine``.
SCHEDULES = {"linear": "beta_linear", "squaredcos_cap_v2": "beta_cosine"}
#: diffusers' ``prediction_type`` -> our ``method.parameterization``.
PREDICTIONS = {"epsilon": "eps"}
#: diffusers' scheduler of the VE SDE (NCSN++'s).
VE_SCHEDULER = "ScoreSdeVeScheduler"
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


def _fields(
    scheduler: Mapping[str, Any], defaults: Mapping[str, Any]
) -> tuple[dict[str, Any], Callable[[str, str], ConfigError]]:
    """The scheduler's fields (``defaults`` where it has none), and the one-line refusal of one."""
    cfg = {field: scheduler.get(field, default) for field, default in defaults.items()}

    def refuse(field: str, why: str) -> ConfigError:
        return ConfigError(
            f"diffusers scheduler field {field} = {cfg[field]!r} cannot be converted: {why}"
        )

    return cfg, refuse


def vp_settings(scheduler: Mapping[str, Any]) -> dict[str, Any]:
    """``process`` settings (``schedule``, ``num_steps``, ``beta_min``, ``beta_max``, Score SDE's
    beta_i = beta_min / T .. beta_max / T) and the ``parameterization`` of a scheduler config.

    Raises :class:`ConfigError` naming a field with no counterpart here (given betas, another
    schedule, v-prediction, zero terminal SNR).
    """
    if scheduler.get("_class_name") == VE_SCHEDULER:
        raise ConfigError(
            f"the scheduler config is a {VE_SCHEDULER} (VE), but the model is DDPM's U-Net "
            "(VP): give the scheduler saved with this model"
        )
    cfg, refuse = _fields(scheduler, DEFAULTS)

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


#: The defaults of ``ScoreSdeVeScheduler.__init__`` (diffusers 0.42), for fields a file leaves out.
VE_DEFAULTS = {
    "num_train_timesteps": 2000,
    "snr": 0.15,
    "sigma_min": 0.01,
    "sigma_max": 1348.0,
    "sampling_eps": 1e-5,
    "correct_steps": 1,
}


def ve_settings(scheduler: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``process`` settings (``sigma_min``, ``sigma_max``, ``num_steps``) and ``sampler``
    settings of the PC sampler (``snr``, ``steps``, ``eps``, ``n_corrector_steps``) of a
    ``ScoreSdeVeScheduler`` config. Raises :class:`ConfigError` naming a field out of range."""
    name = scheduler.get("_class_name", VE_SCHEDULER)
    if name != VE_SCHEDULER:
        raise ConfigError(
            f"the scheduler config is a {name}, but an NCSN++ model needs a {VE_SCHEDULER}: "
            "give the scheduler saved with this model"
        )
    cfg, refuse = _fields(scheduler, VE_DEFAULTS)

    for field, least in (("num_train_timesteps", 1), ("correct_steps", 0)):
        if not isinstance(cfg[field], int) or cfg[field] < least:
            raise refuse(field, f"an integer >= {least}")
    for field in ("snr", "sigma_min", "sampling_eps"):
        if not isinstance(cfg[field], int | float) or not cfg[field] > 0:
            raise refuse(field, "a positive number")
    if not isinstance(cfg["sigma_max"], int | float) or not cfg["sigma_max"] > cfg["sigma_min"]:
        raise refuse("sigma_max", f"a number above sigma_min = {cfg['sigma_min']}")
    process = {
        "sigma_min": float(cfg["sigma_min"]),
        "sigma_max": float(cfg["sigma_max"]),
        "num_steps": cfg["num_train_timesteps"],
    }
    sampler = {
        "snr": float(cfg["snr"]),
        "steps": cfg["num_train_timesteps"],
        "eps": float(cfg["sampling_eps"]),
        "n_corrector_steps": cfg["correct_steps"],
    }
    return process, sampler
