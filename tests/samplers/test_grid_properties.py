"""Every time grid over the whole range of its inputs: every process config in conf/process,
every spacing and grid kind, every step count from 1 to N (levels: all of them; the bisected
grids: drawn by hypothesis), and the defects such checks found, each pinned by a regression test."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers import CONF
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from hypothesis import given
from hypothesis import strategies as st

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.base import ForwardProcess
from diffusion_lab.processes.sde import SDE, VPSDE
from diffusion_lab.samplers.ancestral import ancestral
from diffusion_lab.samplers.grids import GRIDS, SPACINGS, level_grid, rounded_ratio, sampling_times

PROCESS_CONFIGS = sorted(path.stem for path in (CONF / "process").glob("*.yaml"))


@functools.cache
def process_from_config(name: str) -> ForwardProcess:
    """The process a run builds from ``process=NAME`` (soft_blur with its data-free levels)."""
    overrides = [f"process={name}"] + (
        ["process/blur_schedule=soft_linear"] if name == "soft_blur" else []
    )
    with initialize_config_dir(str(CONF), version_base=None):
        return instantiate(compose("config", overrides=overrides).process)


def sde_configs() -> list[str]:
    return [name for name in PROCESS_CONFIGS if isinstance(process_from_config(name), SDE)]


def test_every_process_config_is_covered():
    assert len(PROCESS_CONFIGS) >= 10 and {"vp", "ve", "soft_blur", "fp_embedding"} <= set(
        PROCESS_CONFIGS
    )


@pytest.mark.parametrize("name", PROCESS_CONFIGS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_level_grid_decreases_from_its_first_level_to_zero(name: str, spacing: str):
    """For every steps in [1, N]: strictly decreasing, the documented first level (t = 1 for
    trailing and linspace; DDIM's (steps - 1) * (N // steps)-th level for leading, its 0.8 N-th
    for quadratic, which refuses the step counts that would repeat a level), ending at
    t = 0: ``steps`` of the levels, then t = 0 unless the last of them is already 0 (VE)."""
    process = process_from_config(name)
    levels = process.level_times()
    n = len(levels)
    for steps in range(1, n + 1):
        if spacing == "quadratic" and not 2 <= steps <= 1 + math.isqrt(4 * n // 5):
            with pytest.raises(ConfigError, match="quadratic spacing over .* takes 2 to"):
                level_grid(process, steps, spacing)
            continue
        times = level_grid(process, steps, spacing)
        first = {"leading": levels[(steps - 1) * (n // steps)], "quadratic": levels[4 * n // 5]}
        first = first.get(spacing, levels[-1])
        assert float(times[0]) == float(first), (steps, times[:3])
        assert float(times[-1]) == 0.0, (steps, times[-3:])
        assert bool((times[1:] < times[:-1]).all()), (steps, times)
        visited, appended = times[:steps], times[steps:]
        assert bool(torch.isin(visited, levels).all()), steps  # steps of the process's levels
        assert appended.tolist() == ([0.0] if float(visited[-1]) > 0 else []), steps


@given(
    st.integers(0, 10**6),
    st.integers(1, 10**6),
)
def test_rounded_ratio_is_exact_rounding_with_ties_to_even(numerator: int, denominator: int):
    quotient = numerator // denominator
    twice_remainder = 2 * (numerator - quotient * denominator)
    assert abs(2 * rounded_ratio(numerator, denominator) * denominator - 2 * numerator) <= (
        denominator
    )
    if twice_remainder == denominator:  # a tie: the even neighbour
        assert rounded_ratio(numerator, denominator) % 2 == 0


def test_trailing_grid_at_61_steps_on_vp_is_decreasing_and_ancestral_keeps_the_std():
    """The defect: torch.arange(1000, 0, -1000 / 61) has a 62nd element near 1e-13, which
    rounded to index -1 put t = 1 at the end of the grid ([..., 0.033, 0.016, 1.0, 0.0]), and
    DDPM's sampler stepped back up to noise: with the exact score of N(0, 0.5^2) the samples
    collapsed to std 5e-6 at 61 steps (0.510 at 60)."""
    process = VPSDE()
    times = level_grid(process, 61, "trailing")
    assert len(times) == 62 and float(times[0]) == 1.0 and float(times[-1]) == 0.0
    assert bool((times[1:] < times[:-1]).all())

    def exact_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = process.marginal_coefficients(t)
        return -x / (alpha[:, None] ** 2 * 0.25 + sigma[:, None] ** 2)

    n = 20000
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    samples = ancestral(exact_score, process, x, steps=61, generator=generator, progress=False)
    assert abs(float(samples.samples.std()) - 0.5) < 5 * 0.5 / (2 * n) ** 0.5


def grid_cases() -> st.SearchStrategy:
    @st.composite
    def cases(draw: st.DrawFn) -> tuple[str, str, int, float | None]:
        name = draw(st.sampled_from(sde_configs()))
        process = process_from_config(name)
        grid = draw(st.sampled_from(GRIDS))
        steps = draw(st.integers(1, len(process.level_times())))
        noisy = process.level_times()[process.std(process.level_times()) > 0]
        t_min = draw(st.none() | st.floats(float(noisy.min()), 0.9))
        return name, grid, steps, t_min

    return cases()


@given(grid_cases())
def test_every_sampling_grid_runs_from_one_to_its_last_noisy_time(case):
    """``sampling_times`` (DDIM, Euler, Heun, EDM, DPM-Solver++): for every grid kind, every
    steps in [1, N] and any t_min, exactly ``steps`` strictly decreasing times, the first t = 1
    (one step included: the model is never evaluated only at t_min on prior noise), every
    one carrying noise, the last t_min for the bisected grids (for two steps or more)."""
    name, grid, steps, t_min = case
    process = process_from_config(name)
    times = sampling_times(process, steps, grid, t_min=t_min if grid != "levels" else None)
    assert len(times) == steps
    assert float(times[0]) == 1.0
    assert bool((times[1:] < times[:-1]).all()), times
    assert bool((process.std(times) > 0).all())
    if grid != "levels" and steps > 1 and t_min is not None:
        assert float(times[-1]) == pytest.approx(t_min, rel=1e-6)


@pytest.mark.parametrize("grid", ["logsnr", "karras", "uniform", "levels"])
def test_a_one_step_grid_evaluates_at_t_one(grid: str):
    """Found by reading: the one-step log-SNR and Karras grids were [t_min] (the ends were set
    with times[0], times[-1] = 1, t_min on a one-element tensor)."""
    process = VPSDE()
    assert sampling_times(process, 1, grid).tolist() == [1.0]


def test_quadratic_spacing_is_ddims_selection():
    """DDIM's App. D.2 / its code: (linspace(0, sqrt(0.8 N), S) ** 2) cast to int, as levels
    0-based, on N = 1000 at S = 10: 0, 9, 39, 88, 158, 246, 355, 483, 632, 800."""
    process = VPSDE(num_steps=1000)
    times = level_grid(process, 10, "quadratic")
    index = torch.searchsorted(process.level_times(), times[:-1]).tolist()
    assert index[::-1] == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    assert float(times[-1]) == 0.0
