"""Samplers driven by the exact score of a Gaussian mixture reproduce the mixture.

Bound: the sliced Wasserstein distance (SW_2) between two independent exact draws of n points
is the Monte-Carlo floor of the comparison; a sampler that reproduces the target lands near it,
while a systematic error (a lost or mis-weighted mode, a wrong spread) adds a term that does not
shrink with n. We allow twice the floor plus 0.03 (under 1% of the mixture's radius of 4) for
discretisation error, and check with a negative control (a score with the wrong weights) that
the bound does fail for a wrong sampler.
"""

import pytest
import torch

from diffusion_lab.data.toy2d import GaussianMixture, make_toy2d
from diffusion_lab.metrics.sliced_wasserstein import sliced_wasserstein
from diffusion_lab.processes.sde import VESDE, VPSDE, SubVPSDE
from diffusion_lab.samplers.ancestral import ancestral
from diffusion_lab.samplers.ddim import ddim
from diffusion_lab.samplers.grids import level_grid
from diffusion_lab.samplers.ode import probability_flow
from diffusion_lab.samplers.pc import euler_maruyama, predictor_corrector, reverse_diffusion

N = 2000
TARGET = GaussianMixture([[-3.0, 0.0], [3.0, 1.0], [0.0, -3.0]], [0.5, 0.7, 0.4], [0.5, 0.3, 0.2])


def sw(x, y, seed=0):
    return sliced_wasserstein(
        x, y, n_projections=256, generator=torch.Generator().manual_seed(seed)
    )


@pytest.fixture(scope="module")
def reference():
    exact, _ = TARGET.sample(N, torch.Generator().manual_seed(100))
    other, _ = TARGET.sample(N, torch.Generator().manual_seed(101))
    return exact, 2 * sw(exact, other) + 0.03


def run(sampler, process, mixture=TARGET, **options):
    generator = torch.Generator().manual_seed(7)
    return sampler(
        mixture.score_fn(process), process, (N, 2), generator=generator, progress=False, **options
    )


CASES = {
    "ddpm_ancestral": (ancestral, VPSDE, {}),
    "ddim_50": (ddim, VPSDE, {"steps": 50}),
    "ddim_eta1_100": (ddim, VPSDE, {"steps": 100, "eta": 1.0}),
    "ve_ancestral": (ancestral, VESDE, {"steps": 500}),
    "vp_euler_maruyama": (euler_maruyama, VPSDE, {"steps": 500}),
}
# Under each SDE: the reverse SDE (reverse diffusion), predictor-corrector and probability flow.
for _name, _cls in (("ve", VESDE), ("vp", VPSDE), ("subvp", SubVPSDE)):
    CASES[f"{_name}_reverse_diffusion"] = (reverse_diffusion, _cls, {"steps": 500})
    CASES[f"{_name}_pc"] = (predictor_corrector, _cls, {"steps": 300, "snr": 0.16})
    CASES[f"{_name}_ode"] = (probability_flow, _cls, {"rtol": 1e-4, "atol": 1e-4})


def make_process(cls):
    return cls(sigma_max=12.0) if cls is VESDE else cls()


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_reproduces_mixture(case, reference):
    sampler, cls, options = CASES[case]
    exact, bound = reference
    result = run(sampler, make_process(cls), **options)
    assert torch.isfinite(result.samples).all()
    distance = sw(result.samples, exact)
    assert distance < bound, f"{case}: SW {distance:.4f} >= bound {bound:.4f}"
    assert result.nfe > 0


def test_bound_rejects_a_wrong_score(reference):
    """Negative control: equal weights instead of (0.5, 0.3, 0.2) must exceed the bound."""
    exact, bound = reference
    wrong = GaussianMixture(TARGET.means, TARGET.stds, [1 / 3, 1 / 3, 1 / 3])
    result = run(ddim, VPSDE(), mixture=wrong, steps=50)
    assert sw(result.samples, exact) > bound


def test_nfe_counts():
    process = VPSDE()
    score = make_toy2d("gmm8").score_fn(process)
    assert ddim(score, process, (4, 2), steps=25, progress=False).nfe == 25
    assert ancestral(score, process, (4, 2), progress=False).nfe == 1000
    # VE: 200 steps + the final denoising evaluation
    ve = VESDE(sigma_max=10.0)
    assert ancestral(score, ve, (4, 2), steps=200, progress=False).nfe == 201
    pc = predictor_corrector(score, ve, (4, 2), steps=10, n_corrector_steps=2, progress=False)
    assert pc.nfe == 10 * 3 + 1


def test_ddim_eta0_is_deterministic():
    process = VPSDE()
    score = TARGET.score_fn(process)
    x_init = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    a = ddim(
        score, process, x_init, steps=20, generator=torch.Generator().manual_seed(1), progress=False
    )
    b = ddim(
        score, process, x_init, steps=20, generator=torch.Generator().manual_seed(2), progress=False
    )
    assert torch.equal(a.samples, b.samples)
    c = ddim(
        score,
        process,
        x_init,
        steps=20,
        eta=1.0,
        generator=torch.Generator().manual_seed(1),
        progress=False,
    )
    assert not torch.equal(a.samples, c.samples)


def test_same_seed_same_samples():
    process = VPSDE()
    score = TARGET.score_fn(process)
    a = ancestral(
        score,
        process,
        (32, 2),
        steps=50,
        generator=torch.Generator().manual_seed(5),
        progress=False,
    )
    b = ancestral(
        score,
        process,
        (32, 2),
        steps=50,
        generator=torch.Generator().manual_seed(5),
        progress=False,
    )
    assert torch.equal(a.samples, b.samples)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_level_grid_is_strictly_decreasing_and_ends_clean(spacing, steps):
    """No duplicated last level, no zero-length step (PITFALLS: diffusers #2585, k-diffusion #37)."""
    times = level_grid(VPSDE(), steps, spacing)
    assert (times[1:] < times[:-1]).all()
    assert times[-1] == 0
    assert len(times) == steps + 1
    if spacing != "leading":
        assert times[0] == 1.0  # starts at the noisiest level


def test_one_step_sampling_is_finite():
    process = VPSDE()
    result = ddim(TARGET.score_fn(process), process, (16, 2), steps=1, progress=False)
    assert torch.isfinite(result.samples).all()


def test_ve_grid_does_not_duplicate_sigma_min():
    ve = VESDE(num_steps=10)
    times = level_grid(ve, None)
    assert len(times) == 10 and times[-1] == 0  # level 0 is sigma_min itself: no extra step


def test_trajectory_and_callback():
    process = VPSDE()
    seen = []
    result = ddim(
        TARGET.score_fn(process),
        process,
        (8, 2),
        steps=5,
        callback=seen.append,
        return_trajectory=True,
        progress=False,
    )
    assert len(seen) == 5 and len(result.trajectory) == 5
    assert torch.equal(result.trajectory[-1], result.samples)
