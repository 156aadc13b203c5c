"""Annealed Langevin dynamics driven by exact scores, and inpainting.

Mode weights (Song & Ermon 2019 sec. 3.2; Spagnoletti et al. sec. 3.1.2): ``two_modes`` puts
0.8 on N((5, 5), I) and 0.2 on N((-5, -5), I). Annealed Langevin with the exact score of the
mixture convolved with each sigma_i (GaussianMixture.score with alpha = 1, sigma = sigma_i)
must put a fraction of about 0.8 of its samples in the heavy mode; plain Langevin at the
smallest sigma only, started from a wide uniform, cannot: the score in each mode does not depend
on the weights, so each sample stays in the mode whose basin it starts in (about half and half).

Tolerance: with N = 2000 samples the binomial standard error of the fraction is
sqrt(0.8 * 0.2 / 2000) = 0.0089; we allow 4 standard errors (0.036) plus 0.02 for
discretisation (finite T = 100 steps per level and a step of 0.1 sigma_i^2 leave the transfer
of mass between the modes slightly incomplete at the level where they separate; measured with
seeds 0, 1, 2: 0.771, 0.792, 0.775, and 0.787 with T = 1000 and 4000 samples, i.e. a bias of
about 0.015): |f - 0.8| <= 0.056. Plain Langevin stays near 0.5, far outside that bound.
"""

import math

import pytest
import torch

from diffusion_lab.data.toy2d import make_toy2d
from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.sde import VESDE
from diffusion_lab.samplers.annealed_langevin import annealed_langevin, annealed_langevin_inpaint
from diffusion_lab.samplers.langevin import langevin_step

N = 2000
HEAVY = 0.8
TOLERANCE = 4 * math.sqrt(HEAVY * (1 - HEAVY) / N) + 0.02
SIGMA_MAX, SIGMA_MIN, LEVELS, T = 10.0, 0.1, 10, 100
STEP_LR = 0.1 * SIGMA_MIN**2  # alpha_i = 0.1 sigma_i^2 at every level


def heavy_fraction(x: torch.Tensor) -> float:
    return float((x.sum(1) > 0).double().mean())


def test_annealed_langevin_recovers_the_mode_weights():
    mixture = make_toy2d("two_modes")
    process = VESDE(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, num_steps=LEVELS)
    g = torch.Generator().manual_seed(0)
    result = annealed_langevin(
        mixture.score_fn(process), process, (N, 2), generator=g, n_steps_each=T, step_lr=STEP_LR,
        progress=False,
    )  # fmt: skip
    assert result.nfe == LEVELS * T + 1  # + the final denoising step
    assert abs(heavy_fraction(result.samples) - HEAVY) <= TOLERANCE


def test_plain_langevin_at_the_smallest_sigma_does_not():
    mixture = make_toy2d("two_modes")
    g = torch.Generator().manual_seed(0)
    x = 16 * torch.rand(N, 2, generator=g) - 8  # wide uniform over both modes
    step = 0.1 * (1 + SIGMA_MIN**2)  # the same relative step, for the smallest level
    for _ in range(LEVELS * T):
        noise = torch.randn(x.shape, generator=g)
        x, _ = langevin_step(x, mixture.score(x, 1.0, SIGMA_MIN), step, noise)
    fraction = heavy_fraction(x)
    assert abs(fraction - HEAVY) > TOLERANCE
    assert abs(fraction - 0.5) < 0.1  # each sample kept the basin it started in


def test_step_sizes_follow_alpha_i_and_the_trajectory_has_one_state_per_level():
    process = VESDE(sigma_min=0.01, sigma_max=1.0, num_steps=10)
    seen = []
    result = annealed_langevin(
        lambda x, t: -x, process, (4, 3), n_steps_each=2, step_lr=2e-5, denoise=False,
        return_trajectory=True, progress=False, callback=seen.append,
    )  # fmt: skip
    sigmas = process.sigmas.tolist()
    assert [s["sigma"] for s in seen] == pytest.approx(sigmas, rel=1e-5)
    expected = [2e-5 * s**2 / 0.01**2 for s in sigmas]
    assert [s["step_size"] for s in seen] == pytest.approx(expected, rel=1e-5)
    assert len(result.trajectory) == 10 and result.nfe == 20


def test_steps_subsample_levels_and_end_at_sigma_min():
    process = VESDE(sigma_min=0.01, sigma_max=1.0, num_steps=10)
    seen = []
    annealed_langevin(
        lambda x, t: -x, process, (2, 2), steps=4, n_steps_each=1, progress=False,
        callback=seen.append,
    )  # fmt: skip
    sigmas = [s["sigma"] for s in seen]
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(sigmas, sigmas[1:], strict=False))


def test_bad_options_are_config_errors():
    process = VESDE(sigma_min=0.01, sigma_max=1.0, num_steps=10)
    with pytest.raises(ConfigError, match="n_steps_each"):
        annealed_langevin(lambda x, t: -x, process, (2, 2), n_steps_each=0, progress=False)
    with pytest.raises(ConfigError, match="step_lr"):
        annealed_langevin(lambda x, t: -x, process, (2, 2), step_lr=0.0, progress=False)


@pytest.mark.parametrize("denoise", [True, False])
def test_inpainting_keeps_the_observed_pixels_exactly(denoise):
    process = VESDE(sigma_min=0.01, sigma_max=1.0, num_steps=10)
    g = torch.Generator().manual_seed(0)
    observed = torch.rand(3, 1, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1  # left half observed

    def score(x, t):  # pulls towards 0.5, so the completion differs from the observation
        sigma = process.marginal_coefficients(t)[1].reshape(-1, 1, 1, 1)
        return (0.5 - x) / (0.1 + sigma**2)

    result = annealed_langevin_inpaint(
        score, process, observed, mask, generator=g, n_steps_each=5, denoise=denoise,
        progress=False,
    )  # fmt: skip
    assert torch.equal(result.samples[..., :4], observed[..., :4])
    assert not torch.allclose(result.samples[..., 4:], observed[..., 4:])
    assert result.nfe == 50 + int(denoise)
