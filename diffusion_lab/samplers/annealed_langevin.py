"""Annealed Langevin dynamics (NCSN, Song & Ermon 2019 Alg. 1; Khungurn sec. 5.1) and its
inpainting variant (Khungurn sec. 5.2): a corrector-only sampler on the VE process's levels.

For each level sigma_i, largest first, T = ``n_steps_each`` Langevin steps with
alpha_i = eps sigma_i^2 / sigma_L^2 (eps = ``step_lr``), through the shared
:func:`~diffusion_lab.samplers.langevin.langevin_step`, x <- x + alpha_i s(x, sigma_i) +
sqrt(2 alpha_i) z. This is the update of NCSNv2's Alg. 1 and of both papers' released code
(with eps = 2e-5 for NCSN, 6.2e-6 for NCSNv2 CIFAR-10), and the one Technique 4's
closed form assumes; NCSN's printed Alg. 1 writes alpha_i / 2 s + sqrt(alpha_i) z, which is the
same update with eps halved (pass ``step_lr = eps / 2`` to run the printed pseudo-code).

Then, with ``denoise``, Tweedie's final step x + sigma_L^2 s(x, sigma_L) (``process.denoise``;
skipping it costs about 5 FID points). ``steps`` (default: every level) takes that
many of the process's levels, evenly spread and always including sigma_1 and sigma_L (the
shared ``level_grid`` with "linspace" spacing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusion_lab.config_types import PositiveInt
from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.base import ForwardProcess
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
from diffusion_lab.samplers.grids import level_grid
from diffusion_lab.samplers.langevin import langevin_step
from diffusion_lab.utils import batch_time

# Called at the start of each level with its sigma; returns the projection applied after every
# Langevin step of that level (inpainting), or None.
LevelConstraint = Callable[[float], Callable[[torch.Tensor], torch.Tensor] | None]


def _annealed_loop(
    score: CountingModel,
    process: ForwardProcess,
    x: torch.Tensor,
    steps: int | None,
    callback: StepCallback | None,
    generator: torch.Generator | None,
    n_steps_each: int,
    step_lr: float,
    return_trajectory: bool,
    progress: bool,
    constraint: LevelConstraint | None = None,
) -> tuple[torch.Tensor, float, list[torch.Tensor]]:
    """Run the levels; returns x after the last level, that level's time and the trajectory
    (x after each level, if asked for)."""
    if n_steps_each < 1:
        raise ConfigError(f"sampler.n_steps_each must be >= 1, got {n_steps_each}")
    if step_lr <= 0:
        raise ConfigError(f"sampler.step_lr must be > 0, got {step_lr}")
    times = level_grid(process, steps, "linspace")
    sigmas = process.std(times).tolist()
    sigma_last = sigmas[-1]
    trajectory: list[torch.Tensor] | None = [] if return_trajectory else None
    # step_pairs yields (k, t, t_next); appending a dummy time visits every level once.
    for level, t, _ in step_pairs(torch.cat([times, times[-1:]]), progress, "annealed langevin"):
        sigma = sigmas[level]
        alpha = step_lr * sigma**2 / sigma_last**2
        project = constraint(sigma) if constraint is not None else None
        t_b = batch_time(t, x)
        for _ in range(n_steps_each):
            x, mean = langevin_step(x, score(x, t_b), alpha, gaussian_like(x, generator))
            x = project(x) if project is not None else x
        report(callback, trajectory, x=x, t=t, step=level, mean=mean, sigma=sigma, step_size=alpha)
    return x, float(times[-1]), trajectory or []


@sampler(requires=("noisy_at_zero",), time_grid="levels")
@torch.no_grad()
def annealed_langevin(
    model: Model,
    process: ForwardProcess,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: PositiveInt | None = None,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    denoise: bool = True,
    return_trajectory: bool = False,
    progress: bool = True,
) -> SampleResult:
    """NCSN's annealed Langevin dynamics; NFE = levels x ``n_steps_each`` (+ 1 with ``denoise``).

    ``x_or_shape``: the initial state, or a shape to draw it from the process prior
    N(0, sigma_1^2 I). (NCSN and NCSNv2 start from U[0, 1]^D; pass such a tensor to match them.)
    The trajectory, if asked for, holds x after each level.
    """
    score = CountingModel(model, process)
    x = initial_state(process, x_or_shape, generator)
    x, t_last, trajectory = _annealed_loop(
        score, process, x, steps, callback, generator, n_steps_each, step_lr,
        return_trajectory, progress,
    )  # fmt: skip
    return SampleResult(final_denoise(score, process, x, t_last, denoise), score.nfe, trajectory)


@sampler(requires=("gaussian_sde", "unit_mean"), time_grid="levels")
@torch.no_grad()
def annealed_langevin_inpaint(
    model: Model,
    process: SDE,
    observed: torch.Tensor,
    mask: torch.Tensor,
    steps: PositiveInt | None = None,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    denoise: bool = True,
    return_trajectory: bool = False,
    progress: bool = True,
    x_init: torch.Tensor | None = None,
) -> SampleResult:
    """Inpainting by annealed Langevin dynamics (Khungurn sec. 5.2).

    ``mask`` (broadcastable to ``observed``) is 1 where a pixel is observed. At each level a
    noisy copy y = observed + sigma_i z is drawn once, and after every Langevin step the observed
    pixels are set to y: x <- x (1 - m) + y m. The result returns the observed pixels exactly
    (and the denoised completion elsewhere). ``x_init`` defaults to a draw from the prior.
    """
    keep = mask.to(torch.bool).expand_as(observed)

    def constraint(sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
        y = observed + sigma * gaussian_like(observed, generator)
        return lambda x: torch.where(keep, y, x)

    score = CountingModel(model, process)
    x = initial_state(process, tuple(observed.shape) if x_init is None else x_init, generator)
    x, t_last, trajectory = _annealed_loop(
        score, process, x, steps, callback, generator, n_steps_each, step_lr,
        return_trajectory, progress, constraint,
    )  # fmt: skip
    x = final_denoise(score, process, x, t_last, denoise)
    return SampleResult(torch.where(keep, observed, x), score.nfe, trajectory)
