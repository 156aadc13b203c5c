"""What every sampler shares: the result type, NFE counting, initial states and time grids.

Samplers are plain functions with one signature (DESIGN.md): ``sampler(score_fn, process,
x_or_shape, steps, callback=None, generator=None, **options) -> SampleResult``. A score function is
any callable ``score(x, t)``; an analytic score and a trained network are interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.sde import SDE, ScoreFn
from diffusion_lab.utils import batch_time

StepCallback = Callable[[dict], None]


@dataclass
class SampleResult:
    """Samples, the number of score evaluations (NFE) and, if asked for, the visited states."""

    samples: torch.Tensor
    nfe: int
    trajectory: list[torch.Tensor] = field(default_factory=list)


class CountingScore:
    """Wraps a score function and counts its (batched) evaluations: one call is one NFE."""

    def __init__(self, score_fn: ScoreFn) -> None:
        self.score_fn = score_fn
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return self.score_fn(x, t.expand(x.shape[0]) if t.ndim == 0 else t)


def initial_state(
    process: SDE,
    x_or_shape: torch.Tensor | tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The given starting tensor, or a draw of the given shape from the process prior."""
    if isinstance(x_or_shape, torch.Tensor):
        return x_or_shape
    return process.prior_sampling(tuple(x_or_shape), generator=generator, device=device or "cpu")


def gaussian_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, from ``generator`` when given (reproducible)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


SPACINGS = ("trailing", "leading", "linspace")


def level_grid(process: SDE, steps: int | None, spacing: str = "trailing") -> torch.Tensor:
    """Decreasing times at ``steps`` of the process's N levels, then 0 if not already there.

    ``"trailing"`` always starts at the noisiest level t = 1 and strides down (the spacing that
    avoids the off-by-one of diffusers #2585/#9261); ``"leading"`` is DDIM's original
    0, k, 2k, ... (never reaches t = 1); ``"linspace"`` rounds an even spread over the levels.
    The grid is strictly decreasing: no duplicated last level and no zero-length step.
    """
    levels = process.level_times()
    n = len(levels)
    steps = n if steps is None else steps
    if not 1 <= steps <= n:
        raise ConfigError(f"sampler steps must lie in [1, {n}] for this process, got {steps}")
    if spacing == "trailing":
        index = torch.round(torch.arange(n, 0, -n / steps)).long() - 1
    elif spacing == "leading":
        index = (torch.arange(steps) * (n // steps)).flip(0)
    elif spacing == "linspace":
        index = torch.linspace(n - 1, 0, steps).round().long()
    else:
        raise ConfigError(f"unknown time-step spacing {spacing!r}: use one of {SPACINGS}")
    times = levels[index.unique().flip(0)]
    if times[-1] > 0:
        times = torch.cat([times, torch.zeros(1)])
    return times


def continuous_grid(steps: int, eps: float) -> torch.Tensor:
    """``steps + 1`` decreasing times from 1 to eps (Score SDE's reverse-time grid)."""
    if steps < 1:
        raise ConfigError(f"sampler steps must be at least 1, got {steps}")
    if not 0 < eps < 1:
        raise ConfigError(f"sampler eps must lie in (0, 1), got {eps}")
    return torch.linspace(1.0, eps, steps + 1)


def step_pairs(
    times: torch.Tensor, progress: bool, desc: str
) -> Iterator[tuple[int, float, float]]:
    """(index, t, t_next) over consecutive grid times, with a progress bar."""
    pairs: Iterable = enumerate(zip(times[:-1].tolist(), times[1:].tolist()))
    for k, (t, t_next) in tqdm(
        pairs, total=len(times) - 1, desc=desc, disable=not progress, leave=False
    ):
        yield k, t, t_next


def report(
    callback: StepCallback | None, trajectory: list[torch.Tensor] | None, **state: object
) -> None:
    """Pass a step's state to the callback and keep x in the trajectory if one is kept."""
    if callback is not None:
        callback(state)
    if trajectory is not None:
        trajectory.append(state["x"].detach().clone())  # type: ignore[union-attr]


def final_denoise(
    score: CountingScore, process: SDE, x: torch.Tensor, t: float, denoise: bool
) -> torch.Tensor:
    """Tweedie's final step x + sigma^2 s(x, sigma) (divided by alpha) if the last time still
    carries noise; skipping it costs about 5 FID points (PITFALLS, Sampling)."""
    t_b = batch_time(t, x.shape[0], x.device)
    if not denoise or float(process.marginal_coefficients(t_b)[1].max()) == 0.0:
        return x
    return process.denoise(x, t_b, score(x, t_b))
