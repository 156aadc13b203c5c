"""Time grids shared by the ODE solvers (Euler, Heun, DPM-Solver++) and DDIM.

Every Gaussian process here has marginals x_t = alpha(t) x_0 + sigma(t) z, so its probability
flow is fixed by one curve: the noise-to-signal ratio ``sigma(t) / alpha(t)`` (Karras et al.
2022 eq. 4: the sigma of their x / s coordinates; Lu et al. 2022: lambda = -log of it, half
the log-SNR). A grid is ``steps`` decreasing times t_0 = 1 > ... > t_{N-1} = t_min at which the
model is evaluated; the solvers then take one last step to the clean image (ratio 0), as
Karras et al. Alg. 1 appends t_N = 0 and DPM-Solver++ ends at the data prediction.

Grids (``GRIDS``):

- ``levels``: the process's own noise levels, strided (:func:`level_grid`, which DDIM, the
  ancestral sampler, annealed Langevin and Soft Diffusion's samplers use too);
- ``uniform``: uniform in t;
- ``logsnr``: uniform in log-SNR (Lu et al. 2022 sec. 3.3, "uniform lambda"), i.e. geometric in
  the ratio; for the VE SDE these are its own geometric levels;
- ``karras``: the rho-schedule of Karras et al. eq. 5 on the ratio,
  (r_max^(1/rho) + i / (N - 1) (r_min^(1/rho) - r_max^(1/rho)))^rho, rho = 7.

A flow (``processes.flow``) ends in pure noise: alpha(1) = 0, the ratio at t = 1 is infinite
and lambda = -infinity there, a value the solvers take (their first step is then DDIM's, the
exact step from a point that holds nothing of x_0 but its mean); the log-SNR and Karras ramps
start from ``INFINITE_RATIO_START`` instead, with t_0 = 1 kept.

The ratio is strictly increasing in t for VE, VP and sub-VP; a time with a given ratio (for
the non-level grids and the stochastic EDM sampler's raised noise) is found by bisection in
float64 to a relative 1e-12, so every grid serves every process without per-process formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.base import ForwardProcess
from diffusion_lab.processes.sde import SDE

GRIDS = ("levels", "uniform", "logsnr", "karras")
BISECTION_STEPS = 64
#: The ratio the log-SNR and Karras grids start from where r(1) is infinite (a flow, alpha(1) =
#: 0): Karras et al.'s sigma_max (sec. 5); the grid itself still starts at t = 1.
INFINITE_RATIO_START = 80.0

#: A check of a sampler's options: (sampler name, process, options) -> None or a ConfigError.
GridCheck = Callable[[str, ForwardProcess, Mapping[str, object]], None]
#: How samplers read ``steps`` (their ``time_grid``): each kind is declared with
#: :func:`declare_time_grid` next to the code that makes its grid, with the check
#: ``samplers.base.check_sampler`` runs when a run is built.
TIME_GRIDS: dict[str, GridCheck] = {}


def declare_time_grid(name: str) -> Callable[[GridCheck], GridCheck]:
    """Register the decorated check as time-grid kind ``name``."""

    def register(check: GridCheck) -> GridCheck:
        TIME_GRIDS[name] = check
        return check

    return register


SPACINGS = ("trailing", "leading", "linspace", "quadratic")


def level_grid(
    process: ForwardProcess, steps: int | None, spacing: str = "trailing"
) -> torch.Tensor:
    """Decreasing times at ``steps`` of the process's N levels, then 0 if not already there.

    ``"trailing"`` always starts at the noisiest level t = 1 and strides down (the spacing that
    avoids the off-by-one of diffusers #2585/#9261); ``"leading"`` is DDIM's original
    0, k, 2k, ... (never reaches t = 1); ``"linspace"`` rounds an even spread over the levels;
    ``"quadratic"`` is DDIM's quadratic selection (Song et al. 2021, App. D.2: levels
    floor(c i^2) with c such that the last is 0.8 N, its CIFAR-10 choice), dense near the data,
    defined for 2 <= steps <= 1 + sqrt(0.8 N) (more would repeat a level).
    The grid is strictly decreasing: no duplicated last level and no zero-length step.
    """
    levels = process.level_times()
    n = len(levels)
    steps = n if steps is None else steps
    if not 1 <= steps <= n:
        raise ConfigError(f"sampler steps must lie in [1, {n}] for this process, got {steps}")
    if spacing == "trailing":  # round(n - i n / steps) - 1, i = 0 .. steps - 1
        index = [rounded_ratio(n * (steps - i), steps) - 1 for i in range(steps)]
    elif spacing == "leading":
        index = [i * (n // steps) for i in reversed(range(steps))]
    elif spacing == "linspace":  # round((n - 1)(1 - i / (steps - 1))), i = 0 .. steps - 1
        last = max(steps - 1, 1)
        index = [rounded_ratio((n - 1) * (last - i), last) for i in range(steps)]
    elif spacing == "quadratic":  # floor(0.8 n i^2 / (steps - 1)^2), exactly, from the top
        if steps < 2 or 4 * n < 5 * (steps - 1) ** 2:
            most = 1 + math.isqrt(4 * n // 5)
            raise ConfigError(
                f"quadratic spacing over {n} levels takes 2 to {most} steps (more repeat a "
                f"level), got {steps}: use spacing trailing"
            )
        last = steps - 1
        index = [4 * n * i * i // (5 * last * last) for i in reversed(range(steps))]
    else:
        raise ConfigError(f"unknown time-step spacing {spacing!r}: use one of {SPACINGS}")
    times = levels[torch.tensor(index)]
    if times[-1] > 0:
        times = torch.cat([times, torch.zeros(1)])
    return times


@declare_time_grid("levels")
def _check_levels(name: str, process: ForwardProcess, options: Mapping[str, object]) -> None:
    """The process's levels (:func:`level_grid`), ``steps`` of them (None: all)."""
    level_grid(process, options["steps"], options.get("spacing", "linspace"))  # type: ignore[arg-type]


def rounded_ratio(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded to the nearest integer, halves to even (as
    ``torch.round``), in exact integer arithmetic: no float step decides an index."""
    quotient, remainder = divmod(numerator, denominator)
    if 2 * remainder > denominator or (2 * remainder == denominator and quotient % 2):
        quotient += 1
    return quotient


def continuous_grid(steps: int, eps: float) -> torch.Tensor:
    """``steps + 1`` decreasing times from 1 to eps (Score SDE's reverse-time grid)."""
    if steps < 1:
        raise ConfigError(f"sampler steps must be at least 1, got {steps}")
    if not 0 < eps < 1:
        raise ConfigError(f"sampler eps must lie in (0, 1), got {eps}")
    return torch.linspace(1.0, eps, steps + 1)


@declare_time_grid("continuous")
def _check_continuous(name: str, process: ForwardProcess, options: Mapping[str, object]) -> None:
    """``steps`` uniform steps from 1 to ``eps`` (:func:`continuous_grid`)."""
    if options["steps"] is None:
        raise ConfigError(f"sampler {name} needs a number of steps: set sampler.steps")
    continuous_grid(options["steps"], options["eps"])  # type: ignore[arg-type]


def noise_ratio(process: SDE, t: torch.Tensor) -> torch.Tensor:
    """sigma(t) / alpha(t): the noise level of x / alpha (Karras et al. eq. 4)."""
    alpha, sigma = process.marginal_coefficients(t)
    return sigma / alpha


def coefficients_and_lambdas(
    process: SDE, times: torch.Tensor
) -> tuple[list[float], list[float], list[float]]:
    """alpha, sigma and lambda = log(alpha / sigma) (half the log-SNR, Lu et al. 2022) at each
    time, on the host in float64; lambda = -infinity where alpha = 0 (a flow's t = 1)."""
    alphas, sigmas = (c.double().tolist() for c in process.marginal_coefficients(times))
    lambdas = [math.log(a) - math.log(s) if a > 0 else -math.inf for a, s in zip(alphas, sigmas)]
    return alphas, sigmas, lambdas


def time_of_ratio(process: SDE, ratio: torch.Tensor) -> torch.Tensor:
    """The times t in [0, 1] with ``noise_ratio(t) = ratio`` (clamped to the ends), by bisection."""
    target = ratio.double().log()
    low = torch.zeros_like(target)
    high = torch.ones_like(target)
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        above = noise_ratio(process, middle).double().log() > target
        high = torch.where(above, middle, high)
        low = torch.where(above, low, middle)
    return ((low + high) / 2).to(ratio.dtype)


def smallest_noisy_time(process: SDE) -> float:
    """The smallest level time with noise (t = 0 itself for VE, whose x(0) carries sigma_min)."""
    levels = process.level_times()
    noisy = levels[process.std(levels) > 0]
    return float(noisy.min())


@declare_time_grid("choice")
def _check_choice(name: str, process: ForwardProcess, options: Mapping[str, object]) -> None:
    """A grid of the sampler's ``grid`` option (:func:`sampling_times`)."""
    sampling_times(process, options["steps"], options["grid"], options["spacing"],  # type: ignore[arg-type]
                   options["rho"], options["t_min"])  # fmt: skip


def sampling_times(
    process: SDE,
    steps: int | None,
    grid: str = "levels",
    spacing: str = "trailing",
    rho: float = 7.0,
    t_min: float | None = None,
) -> torch.Tensor:
    """``steps`` decreasing times from 1 to the last noisy one (see the module docstring).

    ``spacing`` applies to ``levels``; ``t_min`` (default: the smallest noisy level) to the
    others, whose ratio runs from r(1) to r(t_min).
    """
    if grid not in GRIDS:
        raise ConfigError(f"sampler grid must be one of {GRIDS}, got {grid!r}")
    if grid == "levels":  # steps None: every level
        times = level_grid(process, steps, spacing)
        return times[: len(process.level_times()) if steps is None else steps]  # no t = 0 added
    if steps is None or steps < 1:
        raise ConfigError(f"sampler grid {grid!r} needs steps >= 1, got {steps}")
    t_min = smallest_noisy_time(process) if t_min is None else float(t_min)
    if not 0 <= t_min < 1 or float(process.std(torch.tensor([t_min]))) <= 0:
        raise ConfigError(f"sampler t_min must lie in [0, 1) and carry noise, got {t_min}")
    ends = torch.tensor([1.0, t_min], dtype=torch.float64)
    if grid == "uniform":
        return torch.linspace(1.0, t_min, steps)
    r_max, r_min = noise_ratio(process, ends).tolist()
    r_max = INFINITE_RATIO_START if math.isinf(r_max) else r_max
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    if grid == "logsnr":
        ratios = torch.tensor(r_max).pow(1 - ramp) * torch.tensor(r_min).pow(ramp)
    else:
        ratios = (r_max ** (1 / rho) + ramp * (r_min ** (1 / rho) - r_max ** (1 / rho))) ** rho
    times = time_of_ratio(process, ratios)
    times[-1] = t_min  # the ends exactly, not to the bisection's tolerance; one step: t = 1
    times[0] = 1.0
    return times.float()
