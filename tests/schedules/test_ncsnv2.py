"""NCSNv2 Techniques 1, 2 and 4 (Khungurn sec. 6) against independent computations."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.special import erf

from diffusion_lab.errors import ConfigError
from diffusion_lab.schedules.ncsnv2 import (
    common_ratio,
    langevin_step_size,
    langevin_variance_ratio,
    largest_pairwise_distance,
    level_overlap,
    ncsnv2_config,
    num_levels,
)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_largest_pairwise_distance_matches_pdist(chunk):
    data = torch.randn(53, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = pdist(data.reshape(53, -1).double().numpy()).max()
    assert largest_pairwise_distance(data, chunk) == pytest.approx(expected, rel=1e-12)


def _overlap_by_erf(gamma: float, dim: int) -> float:
    """The same criterion written with erf: Phi(x) = (1 + erf(x / sqrt 2)) / 2."""
    shift = math.sqrt(2 * dim) * (gamma - 1)
    return 0.5 * (erf((shift + 3 * gamma) / math.sqrt(2)) - erf((shift - 3 * gamma) / math.sqrt(2)))


@pytest.mark.parametrize("dim", [64, 784, 3072, 12288])
def test_common_ratio_is_the_root_of_the_criterion(dim):
    gamma = common_ratio(dim)
    # An independent root: bisection by hand on the erf form over a bracket found by a grid.
    grid = np.linspace(1.0, 3.0, 20001)
    values = np.array([_overlap_by_erf(g, dim) for g in grid])
    j = int(np.argmax(values < 0.5))
    lo, hi = grid[j - 1], grid[j]
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _overlap_by_erf(mid, dim) > 0.5 else (lo, mid)
    assert gamma == pytest.approx(0.5 * (lo + hi), rel=1e-9)
    assert level_overlap(gamma, dim) == pytest.approx(0.5, abs=1e-9)


def test_common_ratio_refuses_tiny_dimensions():
    with pytest.raises(ConfigError, match="no common ratio"):
        common_ratio(2)


def test_num_levels_is_the_smallest_sufficient_count():
    gamma = 1.0398
    levels = num_levels(50.0, 0.01, gamma)
    assert (5000.0) ** (1 / (levels - 1)) <= gamma < (5000.0) ** (1 / (levels - 2))


def test_variance_ratio_matches_the_gaussian_recursion():
    """s_t^2 = (1 - a / sigma_i^2)^2 s_{t-1}^2 + 2 a with a = eps sigma_i^2 / sigma_L^2."""
    eps, steps, gamma, sigma_min, sigma_i = 3e-6, 7, 1.05, 0.01, 2.0
    a = eps * sigma_i**2 / sigma_min**2
    var = (gamma * sigma_i) ** 2
    for _ in range(steps):
        var = (1 - a / sigma_i**2) ** 2 * var + 2 * a
    assert langevin_variance_ratio(eps, steps, gamma, sigma_min) == pytest.approx(var / sigma_i**2)


def test_step_size_reproduces_the_ncsnv2_settings():
    """Technique 4 with T = 5 gives the NCSNv2 configs' eps: 6.2e-6 (CIFAR-10: sigma 50 -> 0.01,
    L = 232) and 3.3e-6 (CelebA 64: sigma 90 -> 0.01, L = 500)."""
    cifar = langevin_step_size(5, 5000 ** (1 / 231), 0.01)
    celeba = langevin_step_size(5, 9000 ** (1 / 499), 0.01)
    assert cifar == pytest.approx(6.2e-6, rel=0.01)
    assert celeba == pytest.approx(3.3e-6, rel=0.02)
    gamma = 5000 ** (1 / 231)
    best = langevin_variance_ratio(cifar, 5, gamma, 0.01)
    for other in (0.5 * cifar, 2 * cifar):  # it is the minimum, and the minimum is above 1
        assert langevin_variance_ratio(other, 5, gamma, 0.01) > best > 1


def test_ncsnv2_config_on_a_small_set():
    data = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    config = ncsnv2_config(data, n_steps_each=5)
    assert config.dim == 64
    assert config.sigma_max == pytest.approx(pdist(data.reshape(40, -1).double().numpy()).max())
    assert config.gamma <= config.gamma_criterion
    assert config.sigma_max / config.sigma_min == pytest.approx(
        config.gamma ** (config.num_levels - 1)
    )
    assert "process.num_steps=" + str(config.num_levels) in config.overrides()


def test_noise_levels_entry_point_reproduces_the_digits_numbers(capsys):
    """``python -m diffusion_lab.noise_levels`` (data=digits, 8x8): the README's numbers."""
    from diffusion_lab.noise_levels import main

    config = main(["data=digits"])
    lines = capsys.readouterr().out.splitlines()
    assert (round(config.sigma_max, 3), round(config.gamma, 3), config.num_levels) == (
        4.815,
        1.342,
        22,
    )
    assert f"{config.step_lr:.3g}" == "2.35e-05" and config.n_steps_each == 5
    assert "sigma_max: 4.81493" in lines
    assert lines[-1] == "overrides: " + " ".join(config.overrides())
    assert "schedule=geometric" in config.overrides()
