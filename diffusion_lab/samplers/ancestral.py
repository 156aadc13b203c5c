"""Ancestral sampling: DDPM's reverse Markov chain (Ho et al. Alg. 2; Khungurn eq. 14), and its
SMLD counterpart (Score SDE App. F), through ``process.ancestral_step``."""

from __future__ import annotations

import torch

from diffusion_lab.config_types import PositiveInt
from diffusion_lab.processes.sde import GAUSSIAN, INVERTIBLE_MEAN, SDE
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
from diffusion_lab.samplers.grids import level_grid
from diffusion_lab.utils import append_dims, batch_time


@sampler(requires=(GAUSSIAN, INVERTIBLE_MEAN), time_grid="levels")
@torch.no_grad()
def ancestral(
    model: Model,
    process: SDE,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: PositiveInt | None = None,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    spacing: str = "trailing",
    variance: str | None = None,
    denoise: bool = True,
    return_trajectory: bool = False,
    progress: bool = True,
) -> SampleResult:
    """x_{i-1} = (x_i + b_i^2 s(x_i, i)) / a_i + std_i z over the process's levels.

    With the VP process and all N levels this is DDPM's sampler with sigma_i^2 = beta_i;
    the last step (to the clean t = 0) returns its mean, as Ho et al. add no noise at t = 1.
    With fewer steps the chain strides over levels (each stride an exact transition). Where
    the last level still carries noise (VE: sigma_min) its step keeps its noise, so that x is a
    draw at that level, as Score SDE's samplers leave it, and ``denoise`` then applies
    Tweedie's final step (dropping that noise as well would denoise twice).
    """
    score = CountingModel(model, process)
    x = initial_state(process, x_or_shape, generator)
    times = level_grid(process, steps, spacing)
    trajectory = [] if return_trajectory else None
    last = len(times) - 2
    ends_clean = float(process.std(times[-1:])[0]) == 0.0
    for k, t, t_next in step_pairs(times, progress, "ancestral"):
        t_b = batch_time(t, x)
        t_prev = batch_time(t_next, x)
        mean, std = process.ancestral_step(x, t_b, t_prev, score(x, t_b), variance)
        if k == last and ends_clean:
            x = mean
        else:
            x = mean + append_dims(std, x.ndim) * gaussian_like(x, generator)
        report(callback, trajectory, x=x, t=t_next, step=k)
    x = final_denoise(score, process, x, times[-1].item(), denoise)
    return SampleResult(x, score.nfe, trajectory or [])
