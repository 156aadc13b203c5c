"""Predictor-corrector samplers (Song et al. 2021 Alg. 1-3; Khungurn sec. 7.3.2).

Each time step runs the corrector at t, then the predictor from t to the next time (the order of
Score SDE's code). Predictors: Euler-Maruyama, reverse diffusion (Khungurn eq. 13), ancestral,
none; correctors: Langevin with a target signal-to-noise ratio, none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusion_lab.config_types import NonNegativeInt, PositiveInt
from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.sde import SDE
from diffusion_lab.samplers.base import (
    CountingModel,
    Model,
    SampleResult,
    StepCallback,
    final_denoise,
    gaussian_like,
    initial_state,
    report,
    sampler,
    step_pairs,
)
from diffusion_lab.samplers.grids import continuous_grid
from diffusion_lab.samplers.langevin import langevin_corrector
from diffusion_lab.utils import append_dims, batch_time

Projection = Callable[[torch.Tensor, float, float, "torch.Generator | None"], torch.Tensor]
Predictor = Callable[
    [CountingModel, SDE, torch.Tensor, float, float, "torch.Generator | None"],
    tuple[torch.Tensor, torch.Tensor],
]


def euler_maruyama_predictor(score, process, x, t, t_next, generator):
    """x <- x - [f - g^2 s] dt + g sqrt(dt) z, with dt = t - t_next > 0."""
    dt = t - t_next
    drift, g = process.reverse(score).sde(x, batch_time(t, x))
    mean = x - drift * dt
    return mean + append_dims(g, x.ndim) * dt**0.5 * gaussian_like(x, generator), mean


def reverse_diffusion_predictor(score, process, x, t, t_next, generator):
    """x <- x - f_i + G_i^2 s + G_i z (Khungurn eq. 13) with the exact forward step (f_i, G_i)."""
    f, big_g = process.reverse(score).discretize(x, batch_time(t, x), t - t_next)
    mean = x - f
    return mean + append_dims(big_g, x.ndim) * gaussian_like(x, generator), mean


def ancestral_predictor(score, process, x, t, t_next, generator):
    """The ancestral step of ``process`` from t to t_next (DDPM's for VP, SMLD's for VE)."""
    t_b = batch_time(t, x)
    t_prev = batch_time(t_next, x)
    mean, std = process.ancestral_step(x, t_b, t_prev, score(x, t_b))
    return mean + append_dims(std, x.ndim) * gaussian_like(x, generator), mean


def no_predictor(score, process, x, t, t_next, generator):
    """Leave x unchanged (corrector-only sampling, as SMLD's annealed Langevin)."""
    return x, x


PREDICTORS: dict[str, Predictor] = {
    "euler_maruyama": euler_maruyama_predictor,
    "reverse_diffusion": reverse_diffusion_predictor,
    "ancestral": ancestral_predictor,
    "none": no_predictor,
}
CORRECTORS = ("langevin", "none")


@sampler(
    requires=("sde",),
    time_grid="continuous",
    option_requires={"predictor": {"ancestral": ("gaussian_sde",)}},
)
@torch.no_grad()
def predictor_corrector(
    model: Model,
    process: SDE,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: PositiveInt = 1000,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector_steps: NonNegativeInt = 1,
    eps: float = 1e-3,
    denoise: bool = True,
    return_trajectory: bool = False,
    progress: bool = True,
    project: Projection | None = None,
    finalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SampleResult:
    """Integrate the reverse SDE from t = 1 to ``eps`` in ``steps`` steps, then Tweedie-denoise.

    With ``corrector="none"`` this is a plain reverse-SDE solver (Euler-Maruyama, reverse
    diffusion or ancestral); with ``predictor="none"`` a corrector-only sampler. For controllable
    generation (``samplers.inpainting``, ``samplers.inverse``), ``project(x, t, dt, generator)``
    is applied to the initial state and after every corrector and predictor step (Song et al.
    2021 App. I.2, their ``get_pc_inpainter``), and ``finalize(x)`` after the final denoising
    step.
    """
    if predictor not in PREDICTORS:
        raise ConfigError(f"unknown predictor {predictor!r}: use one of {sorted(PREDICTORS)}")
    if corrector not in CORRECTORS:
        raise ConfigError(f"unknown corrector {corrector!r}: use one of {CORRECTORS}")
    score = CountingModel(model, process)
    dt = (1.0 - eps) / steps
    project = project or (lambda x, t, dt, generator: x)
    x = project(initial_state(process, x_or_shape, generator), 1.0, dt, generator)
    trajectory = [] if return_trajectory else None
    for k, t, t_next in step_pairs(continuous_grid(steps, eps), progress, f"pc[{predictor}]"):
        if corrector == "langevin":
            x, _ = langevin_corrector(score, process, x, t, generator, snr, n_corrector_steps)
            x = project(x, t, dt, generator)
        x, mean = PREDICTORS[predictor](score, process, x, t, t_next, generator)
        x = project(x, t_next, dt, generator)
        report(callback, trajectory, x=x, t=t_next, step=k, mean=mean)
    x = final_denoise(score, process, x, eps, denoise)
    return SampleResult(finalize(x) if finalize else x, score.nfe, trajectory or [])


@sampler(requires=("sde",), time_grid="continuous")
def euler_maruyama(model: Model, process: SDE, x_or_shape, steps: PositiveInt = 1000, **options):
    """Euler-Maruyama on the reverse SDE, no corrector."""
    return predictor_corrector(
        model,
        process,
        x_or_shape,
        steps,
        predictor="euler_maruyama",
        corrector="none",
        **options,
    )


@sampler(requires=("sde",), time_grid="continuous")
def reverse_diffusion(model: Model, process: SDE, x_or_shape, steps: PositiveInt = 1000, **options):
    """The reverse-diffusion predictor (Khungurn eq. 13), no corrector."""
    return predictor_corrector(
        model,
        process,
        x_or_shape,
        steps,
        predictor="reverse_diffusion",
        corrector="none",
        **options,
    )
