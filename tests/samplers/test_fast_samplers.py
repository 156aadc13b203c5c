"""Euler, Heun and the stochastic EDM sampler (Karras et al. 2022 Alg. 1-2), DPM-Solver++(2M) and
SDE-DPM-Solver++(2M) (Lu et al. 2022), and the shared time grids, driven by exact scores, under
VE, VP, sub-VP and the flow-matching paths (alpha(1) = 0)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from diffusion_lab.data.toy2d import GaussianMixture
from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.flow import FlowProcess
from diffusion_lab.processes.sde import SDE, VESDE, VPSDE, SubVPSDE
from diffusion_lab.samplers import ddim, dpm_solver, edm, ode, unipc
from diffusion_lab.samplers.base import CountingModel, check_sampler
from diffusion_lab.samplers.grids import GRIDS, noise_ratio, sampling_times, time_of_ratio

PROCESSES = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}
FLOWS = {
    "flow_linear": functools.partial(FlowProcess, "linear"),
    "flow_cosine": functools.partial(FlowProcess, "cosine"),
}
DETERMINISTIC = {
    "euler": (edm.euler, 35),
    "heun": (edm.heun, 18),
    "dpm_solver_pp": (dpm_solver.dpm_solver_pp, 35),
    "dpm_solver_pp_3m": (dpm_solver.dpm_solver_pp_3m, 35),
    "dpm_solver_pp_heun": (functools.partial(dpm_solver.dpm_solver_pp, solver_type="heun"), 35),
    "unipc": (unipc.unipc, 35),
    "unipc_bh1": (functools.partial(unipc.unipc, variant="bh1"), 35),
}
#: Mean distance to the exact flow map at 35 NFE allowed per sampler (default grid: the levels):
#: twice the largest measured over VE, VP, sub-VP and the linear and cosine flows (Euler 0.071 /
#: 0.063 / 0.062 / 0.048 / 0.051, Heun 0.036 / 0.040 / 0.023 / 0.015 / 0.012, DPM-Solver++(2M)
#: 0.007 / 0.007 / 0.020 / 0.007 / 0.011, (3M) 0.0025 / 0.012 / 0.012 / 0.006 / 0.012, 2M heun
#: 0.009 / 0.006 / 0.026 / 0.007 / 0.011; RK45 at 1e-4 below 0.0005 with 75 / 63 / 69 / 51 / 39
#: NFE, bound 0.01; UniPC-2 0.0026 / 0.0074 / 0.014 / 0.0020 / 0.0016, with bh1 0.0027 / 0.0032 /
#: 0.028 / 0.0044 / 0.0054). 3M and UniPC are not in the order test: their lower-order first
#: steps bound the global order (3M's error falls 3.0-3.5 times from 64 to 128 steps on the
#: Karras grid, irregularly below that).
FLOW_MAP_BOUND = {"euler": 0.15, "heun": 0.08, "dpm_solver_pp": 0.04, "dpm_solver_pp_3m": 0.025,
                  "dpm_solver_pp_heun": 0.06, "unipc": 0.03, "unipc_bh1": 0.06,
                  "rk45": 0.01}  # fmt: skip
#: The probability flow by scipy's adaptive RK45 (``ode.probability_flow``).
RK45 = functools.partial(ode.probability_flow, rtol=1e-4, atol=1e-4)
STOCHASTIC = {
    "edm_stochastic": (edm.edm_stochastic, 18),
    "sde_dpm_solver_pp": (dpm_solver.sde_dpm_solver_pp, 35),
    "sde_dpm_solver_pp_heun": (
        functools.partial(dpm_solver.sde_dpm_solver_pp, solver_type="heun"),
        35,
    ),
}
MIXTURE = GaussianMixture([[-2.0, 0.0], [2.0, 0.5]], [0.4, 0.6], [0.7, 0.3])


def prior_draws(process: SDE, n: int, seed: int = 0) -> torch.Tensor:
    return process.prior_sampling((n, 2), generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("kind", PROCESSES)
@pytest.mark.parametrize("grid", GRIDS)
def test_grids_run_from_one_to_the_smallest_noisy_time_and_decrease(kind: str, grid: str) -> None:
    process = PROCESSES[kind]()
    times = sampling_times(process, 12, grid)
    assert len(times) == 12 and float(times[0]) == 1.0
    assert bool((times[1:] < times[:-1]).all())
    assert float(process.std(times[-1:])) > 0
    if grid != "levels":  # the levels grid strides (trailing) and need not reach the lowest level
        lowest = process.level_times()[process.std(process.level_times()) > 0].min()
        assert float(times[-1]) == pytest.approx(float(lowest))


@pytest.mark.parametrize("kind", PROCESSES)
def test_karras_and_logsnr_grids_follow_their_formulas(kind: str) -> None:
    process = PROCESSES[kind]()
    n, rho = 9, 7.0
    ratios = {g: noise_ratio(process, sampling_times(process, n, g)).double() for g in GRIDS}
    r_max, r_min = float(ratios["karras"][0]), float(ratios["karras"][-1])
    i = torch.arange(n, dtype=torch.float64)
    karras = (r_max ** (1 / rho) + i / (n - 1) * (r_min ** (1 / rho) - r_max ** (1 / rho))) ** rho
    torch.testing.assert_close(ratios["karras"], karras, rtol=1e-5, atol=0)
    steps = ratios["logsnr"].log().diff()  # uniform in log-SNR = -2 log(ratio)
    torch.testing.assert_close(steps, steps.mean().expand(n - 1), rtol=1e-4, atol=0)


@pytest.mark.parametrize("kind", PROCESSES)
def test_time_of_ratio_inverts_the_noise_ratio(kind: str) -> None:
    process = PROCESSES[kind]()
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    torch.testing.assert_close(
        time_of_ratio(process, noise_ratio(process, t)), t, rtol=0, atol=1e-6
    )


def gaussian_flow_map(process: SDE, x: torch.Tensor, t_min: torch.Tensor) -> torch.Tensor:
    """The exact map of the probability flow of N(mu, s^2 I) from t = 1 to t_min followed by the
    exact clean-image estimate: the standardised (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2)
    is constant along the flow, and D(x; t) = mu + alpha s^2 / (alpha^2 s^2 + sigma^2)
    (x - alpha mu). Finite where alpha(1) = 0 (a flow)."""
    mu, s = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5
    ends = torch.cat([torch.ones(1), t_min]).double()
    (alpha_1, alpha), (sigma_1, sigma) = (c.tolist() for c in process.marginal_coefficients(ends))
    spread_1, spread = math.hypot(alpha_1 * s, sigma_1), math.hypot(alpha * s, sigma)
    return mu + (x - alpha_1 * mu) * alpha * s**2 / (spread * spread_1)


@pytest.mark.parametrize("kind", [*PROCESSES, *FLOWS])
@pytest.mark.parametrize(
    ("name", "order"),
    [("euler", 1), ("heun", 2), ("dpm_solver_pp", 2), ("dpm_solver_pp_heun", 2)],
)  # fmt: skip
def test_error_on_a_gaussian_falls_at_the_solvers_order(kind: str, name: str, order: int) -> None:
    """Halving the step divides the error by 2^order (measured 1.95-1.99 for Euler, 4.2-4.7 for
    Heun and DPM-Solver++(2M) between 16 -> 32 -> 64 steps, 4.2-4.9 for 2M with the heun
    weighting between 32 -> 64 -> 128, where it is past its first steps (6.6 from 16 to 32 on
    sub-VP); bounds 2^order -+ 30%). On a flow the grid is uniform in t: the Karras grid's first
    step, from r = infinity to r = 80, does not shrink with the number of steps."""
    process = {**PROCESSES, **FLOWS}[kind]()
    grid = "uniform" if kind in FLOWS else "karras"
    gaussian = GaussianMixture([[1.0, -0.5]], 0.5)
    x = prior_draws(process, 200)
    reference = gaussian_flow_map(process, x, sampling_times(process, 4, grid)[-1:])
    sample = DETERMINISTIC[name][0]
    errors = [
        float((sample(gaussian.score_fn(process), process, x, steps=n, grid=grid,
                      progress=False).samples - reference).abs().max())
        for n in ((32, 64, 128) if name == "dpm_solver_pp_heun" else (16, 32, 64))
    ]  # fmt: skip
    for coarse, fine in zip(errors, errors[1:]):
        assert 0.7 * 2**order < coarse / fine < 1.3 * 2**order, errors


@pytest.mark.parametrize("kind", [*PROCESSES, *FLOWS])
def test_first_order_dpm_solver_and_euler_equal_ddim_with_eta_zero(kind: str) -> None:
    process = {**PROCESSES, **FLOWS}[kind]()
    x = prior_draws(process, 300)
    score = MIXTURE.score_fn(process)
    options = {"steps": 10, "grid": "logsnr", "progress": False}
    first = dpm_solver.dpm_solver_pp(score, process, x.clone(), order=1, **options)
    reference = ddim.ddim(score, process, x.clone(), eta=0.0, **options)
    euler = edm.euler(score, process, x.clone(), **options)
    scale = float(x.abs().max())  # DDIM reads the process's coefficients in float32
    assert float((first.samples - reference.samples).abs().max()) < 1e-6 * scale
    assert float((euler.samples - first.samples).abs().max()) < 1e-6 * scale
    assert first.nfe == reference.nfe == euler.nfe == 10


def mode_weights(samples: torch.Tensor) -> torch.Tensor:
    """The fraction of samples nearest each component mean of ``MIXTURE``."""
    nearest = torch.cdist(samples.float(), MIXTURE.means.float()).argmin(1)
    return torch.bincount(nearest, minlength=2).double() / len(samples)


@pytest.mark.parametrize("kind", [*PROCESSES, *FLOWS])
@pytest.mark.parametrize("name", [*DETERMINISTIC, *STOCHASTIC, "rk45"])
def test_each_sampler_reproduces_a_mixture_with_its_exact_score(kind: str, name: str) -> None:
    """Mode weights within 4 Monte-Carlo standard deviations, 4 sqrt(0.21 / 4000) = 0.029, plus
    0.01 for the sampler (the components are 4 stds apart: nearest-mean labels misassign
    < 0.01%); the deterministic ones also land near the exact flow map of the same prior draws
    (scipy's RK45 at rtol 1e-9, then the exact clean-image estimate; ``FLOW_MAP_BOUND``), and
    the NFE equals the model calls: N for Euler and DPM-Solver++, 2N - 1 for Heun and Alg. 2
    (2N - 2 on a flow, whose first step, from r = infinity, is Euler's). RK45 is scipy's at
    rtol = atol = 1e-4, its own steps."""
    process = {**PROCESSES, **FLOWS}[kind]()
    n = 4000
    x = prior_draws(process, n, seed=1)
    sample, steps = {**DETERMINISTIC, **STOCHASTIC, "rk45": (RK45, None)}[name]
    exact, calls = MIXTURE.score_fn(process), []

    class Counted:  # the exact model, each evaluation recorded
        def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return exact(x, t)

        def denoised(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return exact.denoised(x, t)

    result = sample(Counted(), process, x.clone(), steps=steps, progress=False,
                    generator=torch.Generator().manual_seed(2))  # fmt: skip
    if name != "rk45":
        heun_like = 2 * steps - (2 if kind in FLOWS else 1)
        assert (
            result.nfe == len(calls) == (heun_like if name in ("heun", "edm_stochastic") else steps)
        )
    weights = mode_weights(result.samples)
    assert float((weights - MIXTURE.weights).abs().max()) < 4 * math.sqrt(0.21 / n) + 0.01
    if name in DETERMINISTIC or name == "rk45":
        t_min = float(sampling_times(process, 4, "karras")[-1])
        exact = CountingModel(MIXTURE.score_fn(process), process)
        end = ode.solve_probability_flow(exact, process, x.clone(), 1.0, t_min, 1e-9, 1e-9)
        flow_map = exact.denoised(end, torch.full((n,), t_min, dtype=torch.float64))
        assert float((result.samples - flow_map).norm(dim=1).mean()) < FLOW_MAP_BOUND[name]


@pytest.mark.parametrize("kind", [*PROCESSES, *FLOWS])
def test_unipc_without_its_corrector_is_dpm_solver_pp_2m(kind: str) -> None:
    """UniP-2 with B(h) = e^{-h} - 1 and rho = 1/2 is DPM-Solver++(2M)'s update (Zhao et al.
    sec. 3.2); the corrector then changes the result and costs no evaluation."""
    process = {**PROCESSES, **FLOWS}[kind]()
    x = prior_draws(process, 300)
    score = MIXTURE.score_fn(process)
    options = {"steps": 12, "grid": "logsnr", "progress": False}
    predictor = unipc.unipc(score, process, x.clone(), corrector=False, **options)
    reference = dpm_solver.dpm_solver_pp(score, process, x.clone(), **options)
    corrected = unipc.unipc(score, process, x.clone(), **options)
    scale = float(x.abs().max())
    assert float((predictor.samples - reference.samples).abs().max()) < 1e-9 * scale
    assert float((corrected.samples - reference.samples).abs().max()) > 1e-4
    assert predictor.nfe == corrected.nfe == reference.nfe == 12


def test_the_stochastic_samplers_draw_fresh_noise_and_repeat_with_a_seed() -> None:
    process = VPSDE()
    x = prior_draws(process, 64)
    for sample in (edm.edm_stochastic, dpm_solver.sde_dpm_solver_pp):
        runs = [sample(MIXTURE.score_fn(process), process, x.clone(), steps=8, progress=False,
                       generator=torch.Generator().manual_seed(seed)).samples
                for seed in (0, 0, 1)]  # fmt: skip
        assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


def test_bad_grid_options_and_processes_stop_with_one_line() -> None:
    import functools

    from diffusion_lab.processes.soft import SoftBlurProcess

    process = VPSDE()
    with pytest.raises(ConfigError, match="grid must be one of"):
        check_sampler(functools.partial(edm.heun, grid="cosine"), process)
    with pytest.raises(ConfigError, match="steps >= 1"):
        check_sampler(functools.partial(dpm_solver.dpm_solver_pp, steps=0, grid="uniform"), process)
    with pytest.raises(ConfigError, match=r"steps must lie in \[1, 1000\]"):
        check_sampler(functools.partial(edm.heun, steps=1001), process)
    with pytest.raises(ConfigError, match="order must be one of"):
        dpm_solver.dpm_solver_pp(MIXTURE.score_fn(process), process, (4, 2), order=4)
    with pytest.raises(ConfigError, match="order 3 is the ODE solver's"):
        dpm_solver.dpm_solver_pp(MIXTURE.score_fn(process), process, (4, 2), order=3,
                                 stochastic=True)  # fmt: skip
    with pytest.raises(ConfigError, match="needs a process that"):
        check_sampler(edm.heun, SoftBlurProcess(blur_max=6.0))
