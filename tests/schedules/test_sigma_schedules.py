"""Sigma schedules (Spagnoletti et al. sec. 7): exact end points, strictly decreasing, and each
equal to an independent evaluation of the paper's formula after the affine rescale (README errata)."""

import math

import numpy as np
import pytest
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.sde import VESDE
from diffusion_lab.schedules import sigma_schedule
from diffusion_lab.schedules.sigma import SIGMA_SCHEDULES

NAMES = ("geometric", "linear", "cosine", "squared_cosine", "sigmoid")
SETUPS = [(1.0, 0.01, 10), (30.0, 0.01, 200), (50.0, 0.01, 232), (5.0, 0.1, 2)]


def test_all_five_schedules_are_registered():
    assert set(SIGMA_SCHEDULES) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("sigma_max", "sigma_min", "num_levels"), SETUPS)
def test_end_points_exact_and_strictly_decreasing(name, sigma_max, sigma_min, num_levels):
    levels = sigma_schedule(name, sigma_max, sigma_min, num_levels)
    assert levels.dtype == torch.float64 and levels.shape == (num_levels,)
    assert levels[0].item() == sigma_max and levels[-1].item() == sigma_min
    assert bool((levels[1:] < levels[:-1]).all())


def test_geometric_has_a_constant_ratio():
    levels = sigma_schedule("geometric", 50.0, 0.01, 232)
    ratios = levels[:-1] / levels[1:]
    expected = (50.0 / 0.01) ** (1 / 231)
    assert torch.allclose(ratios, torch.full_like(ratios, expected), rtol=1e-12)


def _paper_shape(name: str, num_levels: int) -> np.ndarray:
    """Spagnoletti et al. sec. 7 written out with numpy, k = 0..L-1 (reading of schedules.py)."""
    k = np.arange(num_levels, dtype=np.float64)
    u = k / (num_levels - 1)
    if name == "cosine":
        return np.array([math.cos(v / 1.0064 * math.pi / 2) for v in u])
    if name == "squared_cosine":
        return np.array([math.cos(v / 1.068 * math.pi / 2) ** 2 for v in u])
    if name == "sigmoid":
        return np.array([1.009 - 1.0 / (1.0 + math.exp(-(10.0 * v - 2.5))) for v in u])
    if name == "linear":
        r = 1.0 / (num_levels - 1)
        return 1.0 - k * r  # sigma_k = sigma_0 - k r
    return 0.01**u  # geometric: sigma_k = sigma_0 r^k


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("sigma_max", "sigma_min", "num_levels"), SETUPS)
def test_matches_the_paper_formula_after_affine_rescale(name, sigma_max, sigma_min, num_levels):
    f = _paper_shape(name, num_levels)
    if name == "geometric":
        expected = sigma_max * (sigma_min / sigma_max) ** (np.arange(num_levels) / (num_levels - 1))
    else:
        expected = sigma_min + (sigma_max - sigma_min) * (f - f[-1]) / (f[0] - f[-1])
    got = sigma_schedule(name, sigma_max, sigma_min, num_levels).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * sigma_max)


def test_cosine_constants_end_near_one_percent_before_rescale():
    """The reading u = k / (L - 1) is the one under which the paper's alphas give sigma_L ~ 0.01."""
    assert _paper_shape("cosine", 10)[-1] == pytest.approx(0.01, rel=0.01)
    assert _paper_shape("squared_cosine", 10)[-1] == pytest.approx(0.01, rel=0.01)
    f = _paper_shape("sigmoid", 10)
    assert f[-1] / f[0] == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_vesde_levels_follow_the_schedule(name):
    process = VESDE(sigma_min=0.01, sigma_max=1.0, num_steps=10, schedule=name)
    levels = process.marginal_coefficients(process.level_times().flip(0))[1].double()
    torch.testing.assert_close(levels, sigma_schedule(name, 1.0, 0.01, 10), rtol=1e-5, atol=0)


def test_unknown_schedule_and_bad_range_are_config_errors():
    with pytest.raises(ConfigError, match="unknown sigma schedule"):
        sigma_schedule("exponential", 1.0, 0.01, 10)
    with pytest.raises(ConfigError, match="sigma_min < sigma_max"):
        sigma_schedule("cosine", 0.01, 1.0, 10)
