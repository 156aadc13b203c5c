"""The Soft Diffusion samplers (samplers/soft.py), each against an independent computation.

- C_t = I (VE): Momentum (Alg. 2) is the VE reverse-diffusion predictor and eq. 44 the
  probability-flow discretisation of the VE SDE, to float precision, with the same generator.
- Constant sigma (blur stage): Alg. 2 and eq. 44 take the same step, x + (C_{t-dt} - C_t) x0_hat.
- A Gaussian oracle through a dense blur: Momentum and probability-flow Momentum recover mu and
  Sigma as dt shrinks, Naive loses about half the variance.
- NFE, the time grid, and which samplers a soft process refuses.
"""

import functools

import pytest
import torch
from helpers import CONF
from helpers.soft import DenseBlurProcess, GaussianOracle, smooth_gaussian
from hydra import compose, initialize_config_dir

from diffusion_lab.build import instantiate
from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.corruption import ScalarCorruption
from diffusion_lab.processes.sde import VESDE, VPSDE
from diffusion_lab.samplers.ancestral import ancestral
from diffusion_lab.samplers.annealed_langevin import annealed_langevin
from diffusion_lab.samplers.base import check_sampler
from diffusion_lab.samplers.ddim import ddim
from diffusion_lab.samplers.ode import probability_flow
from diffusion_lab.samplers.pc import predictor_corrector, reverse_diffusion
from diffusion_lab.samplers.soft import (
    momentum_step,
    probability_flow_momentum_step,
    soft_grid,
    soft_momentum,
    soft_naive,
    soft_pf_momentum,
)

SOFT = (soft_naive, soft_momentum, soft_pf_momentum)
EYE = functools.partial(torch.eye, dtype=torch.float64)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- C_t = I: the VE samplers -------------------------------------------------------------------


def ve_setup(dtype):
    """VE with 11 levels t = 0, 0.1, ..., 1 (sigma 0.01 .. 5), q_0 = N(mu, Sigma) on 4x4."""
    ve = VESDE(sigma_min=0.01, sigma_max=5.0, num_steps=11)
    mu, cov = smooth_gaussian(side=4, seed=1)
    oracle = GaussianOracle(ve, mu, cov, matrix=lambda t: EYE(16))
    x_init = ve.prior_sampling((64, 1, 4, 4), gen(5)).to(dtype)
    return ve, oracle, x_init


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wrap", [False, True], ids=["VESDE", "ScalarCorruption(VESDE)"])
def test_momentum_is_the_ve_reverse_diffusion_predictor(dtype, wrap):
    """Grid: the VE levels 1, 0.9, ..., 0.1, 0 (steps=11, trailing: ten steps, then x0_hat at
    t = 0). Predictor-corrector's continuous grid linspace(1, eps, 11) is the same grid when
    eps -> 0 (it must be > 0: eps = 1e-12 moves sigma(eps) from sigma_min by 1e-11 relative), and
    its final Tweedie step at eps is x0_hat. Both draw the same noise in the same order from
    the generator (one draw per step after the model call). Measured: max |diff| 8e-7 (float32,
    |x_init| up to 17) and 4e-7 (float64: PC computes its times and sigmas in float32)."""
    ve, oracle, x_init = ve_setup(dtype)
    process = ScalarCorruption(ve) if wrap else ve
    ours = soft_momentum(oracle, process, x_init, steps=11, generator=gen(9), progress=False)
    theirs = reverse_diffusion(
        oracle, ve, x_init, steps=10, eps=1e-12, generator=gen(9), progress=False
    )
    assert ours.nfe == theirs.nfe == 11
    assert ours.samples.dtype == dtype
    scale = x_init.abs().max()
    assert (ours.samples - theirs.samples).abs().max() < 1e-6 * scale
    # and not trivially: the samples moved from the prior to the data's scale
    assert ours.samples.std() < 0.5 * x_init.std()


def test_pf_momentum_is_the_ve_probability_flow_discretisation():
    """dx/dt = -1/2 g^2 s (the VE probability flow, eq. 40 with f = 0), discretised from t to
    t - dt with g^2 dt -> sigma_t^2 - sigma_{t-dt}^2: x_{t-dt} = x_t + 1/2 (sigma_t^2 -
    sigma_{t-dt}^2) s(x_t, t), the framework's ``ReverseSDE.discretize(probability_flow=True)``;
    eq. 44 with C_t = I and s = (x0_hat - x_t) / sigma_t^2 is that step. The whole sampler equals
    a hand loop of it (then x0_hat at t = 0) to float64 precision."""
    ve, oracle, x_init = ve_setup(torch.float64)
    ours = soft_pf_momentum(oracle, ve, x_init, steps=11, generator=gen(), progress=False)
    flow = ve.reverse(oracle, probability_flow=True)
    x = x_init
    for t, t_next in zip(
        torch.linspace(1, 0, 11)[:-1].tolist(), torch.linspace(1, 0, 11)[1:].tolist()
    ):
        t_b = torch.full((x.shape[0],), t, dtype=torch.float64)
        sigma_sq = ve.std(t_b[:1]) ** 2
        sigma_prev_sq = ve.std(torch.tensor([t_next], dtype=torch.float64)) ** 2
        by_hand = x + 0.5 * (sigma_sq - sigma_prev_sq) * oracle(x, t_b)
        drift, _ = flow.discretize(x, t_b, t - t_next)
        assert (by_hand - (x - drift)).abs().max() < 1e-5 * x.abs().max()
        x = by_hand
    x = oracle.denoised(x, torch.zeros(x.shape[0], dtype=torch.float64))
    assert ours.nfe == 11
    assert (ours.samples - x).abs().max() < 1e-10 * x_init.abs().max()


def test_the_finite_difference_step_is_euler_on_g_squared_to_first_order():
    """sigma_t^2 - sigma_{t-dt}^2 = g(t)^2 dt + O(dt^2): the eq. 44 step and the plain Euler step
    x + 1/2 g(t)^2 dt s differ by a relative O(dt) (measured ratio 10.0 for dt 0.1 -> 0.01)."""
    ve, oracle, x_init = ve_setup(torch.float64)
    t = torch.full((x_init.shape[0],), 0.5, dtype=torch.float64)
    x, s = 0.3 * x_init, oracle(0.3 * x_init, t)
    _, g = ve.sde(x, t)
    gaps = []
    for dt in (0.1, 0.01):
        step = probability_flow_momentum_step(ve, x, t, t - dt, oracle.denoised(x, t))
        euler = x + 0.5 * g[0] ** 2 * dt * s
        gaps.append(float((step - euler).norm() / (step - x).norm()))
    assert 8 < gaps[0] / gaps[1] < 12


# --- constant sigma: Alg. 2 and eq. 44 coincide -----------------------------------------------


def test_in_the_constant_sigma_stage_momentum_and_pf_momentum_take_the_same_step():
    """sigma_t = 0.1 at every t while the blur std grows 0 -> 3 on 8x8 images: both score terms
    and Alg. 2's noise vanish, and both samplers are x <- x + (C_{t-dt} - C_t) x0_hat, checked
    against that loop with the dense blur matrices (float64, to 1e-12)."""
    mu, cov = smooth_gaussian()
    process = DenseBlurProcess(num_steps=20, constant_sigma=True, noise_end=0.0)
    oracle = GaussianOracle(process, mu, cov)
    x_init = process.prior_sampling((32, 1, 8, 8), gen(1)) + 0.5
    kw = dict(steps=20, denoise=False, progress=False)
    a = soft_momentum(oracle, process, x_init, generator=gen(2), **kw).samples
    b = soft_pf_momentum(oracle, process, x_init, generator=gen(3), **kw).samples
    x = x_init.flatten(1)
    times = soft_grid(process, 20).tolist()
    assert times[0] == 1.0 and times[-1] == 0.0 and len(times) == 21
    for t, t_next in zip(times[:-1], times[1:]):
        x0_hat = oracle.denoised(x.reshape(x_init.shape), torch.full((32,), t, dtype=torch.float64))
        x = x + x0_hat.flatten(1) @ (process.matrix(t_next) - process.matrix(t)).T
    assert (a - b).abs().max() < 1e-12
    assert (a.flatten(1) - x).abs().max() < 1e-12
    # one step, any x: the two step functions agree and moved x
    t, t_prev = (
        torch.full((32,), 0.7, dtype=torch.float64),
        torch.full((32,), 0.65, dtype=torch.float64),
    )
    x0_hat = oracle.denoised(x_init, t)
    one = momentum_step(process, x_init, t, t_prev, x0_hat, gen())
    other = probability_flow_momentum_step(process, x_init, t, t_prev, x0_hat)
    assert (one - other).abs().max() < 1e-12 and (one - x_init).abs().max() > 1e-3


# --- the Gaussian oracle through a blur ---------------------------------------------------------

N_SAMPLES = 4000
STEPS = (10, 40, 160)


@pytest.fixture(scope="module")
def blur_gaussian():
    """q_0 = N(mu, Sigma) on 8x8 (smooth random Sigma, eigenvalues 0.002 .. 0.66, per-pixel
    variance 0.05); sigma 0.01 -> 0.1 geometric over t in [0, 0.2] with no blur, then 0.1 while
    the blur std grows linearly to 3 pixels; prior the exact q_1; 160 levels t = i/160."""
    mu, cov = smooth_gaussian()
    process = DenseBlurProcess(num_steps=160, mu=mu, cov=cov)
    return process, GaussianOracle(process, mu, cov), mu, cov


def propagate(process, mu, cov, kind, steps):
    """Exact mean and covariance of the sampler's output (no denoise), with the oracle:
    every step is affine-Gaussian, x0_hat = K x + c with K = Sigma C^T (C Sigma C^T + s^2 I)^-1,
    written out as matrices from Alg. 1, Alg. 2 and eq. 44 (independently of samplers/soft.py)."""
    eye = EYE(process.dim)
    m, p = process.matrix(1.0) @ mu, process.marginal_cov(1.0)
    times = soft_grid(process, steps).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        c, c_prev = process.matrix(t), process.matrix(t_next)
        s2 = float(process.std(torch.tensor([t], dtype=torch.float64))) ** 2
        s2_prev = float(process.std(torch.tensor([t_next], dtype=torch.float64))) ** 2
        k = cov @ c.T @ torch.linalg.inv(c @ cov @ c.T + s2 * eye)
        offset = mu - k @ c @ mu
        lam = (s2 - s2_prev) / s2 * (0.5 if kind == "pf" else 1.0)
        if kind == "naive":
            a, b, q = c_prev @ k, c_prev @ offset, s2_prev
        else:
            mix = lam * c + c_prev - c
            a, b = (1 - lam) * eye + mix @ k, mix @ offset
            q = 0.0 if kind == "pf" else s2 - s2_prev
        m, p = a @ m + b, a @ p @ a.T + q * eye
    return m, p


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("sample", "kind"), [(soft_momentum, "momentum"), (soft_pf_momentum, "pf")]
)
def test_the_momentum_samplers_recover_a_gaussian_through_a_blur(blur_gaussian, sample, kind):
    """Target at the last level t = 0 (C_0 = I, sigma_0 = 0.01): N(mu, Sigma + 1e-4 I).

    Exact moments of the discretisation (``propagate``): relative Frobenius error of the
    covariance 0.103 / 0.028 / 0.0071 (Momentum) and 0.108 / 0.030 / 0.0076 (pf) at 10 / 40 /
    160 steps, first order in dt; means exact. 4000 samples: Monte-Carlo floor of the relative
    covariance error 0.045-0.064 (exact draws and seeds 0-3), of the mean 0.014 (relative to
    sqrt(tr Sigma)). Measured on these draws (seed 0): sample covariance error 0.106 / 0.046 /
    0.045 (Momentum), 0.111 / 0.051 / 0.047 (pf); trace ratio 0.946 / 0.984 / 1.002 and
    0.888 / 0.973 / 0.997; sample against exact-discretisation covariance 0.045-0.050.
    """
    process, oracle, mu, cov = blur_gaussian
    target = cov + 1e-4 * EYE(64)
    exact_err, sample_err = [], []
    for steps in STEPS:
        out = sample(oracle, process, (N_SAMPLES, 1, 8, 8), steps=steps, generator=gen(0),
                     denoise=False, progress=False)  # fmt: skip
        assert out.nfe == steps
        x = out.samples.flatten(1)
        mean, sample_cov = x.mean(0), torch.cov(x.T)
        m, p = propagate(process, mu, cov, kind, steps)
        assert float((mean - mu).norm() / cov.trace().sqrt()) < 0.03
        assert float((m - mu).norm()) < 1e-8
        assert rel(sample_cov, p) < 0.08  # the sampler realises the discretisation
        exact_err.append(rel(p, target))
        sample_err.append(rel(sample_cov, target))
        trace_ratio = float(sample_cov.trace() / target.trace())
    # the discretisation error shrinks first-order in dt ...
    assert exact_err[0] > 0.08 and exact_err[1] < 0.035 and exact_err[2] < 0.01
    assert exact_err[0] / exact_err[1] > 3 and exact_err[1] / exact_err[2] > 3
    # ... and the samples show it until they reach the Monte-Carlo floor
    assert sample_err[0] > 0.09 and sample_err[1] < 0.8 * sample_err[0] and sample_err[2] < 0.07
    assert abs(trace_ratio - 1) < 0.04


def test_the_naive_sampler_loses_half_the_variance(blur_gaussian):
    """Alg. 1 re-corrupts a conditional mean with fresh noise at every step: its covariance
    is about half of Sigma whatever dt (exact: trace ratio 0.502 / 0.491 / 0.492 at 10 / 40 /
    160 steps; samples 0.50 / 0.49 / 0.49), while the mean stays right: the loss of diversity
    of sec. 4 (Fig. 4)."""
    process, oracle, mu, cov = blur_gaussian
    target = cov + 1e-4 * EYE(64)
    for steps in STEPS:
        x = soft_naive(oracle, process, (N_SAMPLES, 1, 8, 8), steps=steps, generator=gen(0),
                       denoise=False, progress=False).samples.flatten(1)  # fmt: skip
        sample_cov = torch.cov(x.T)
        _, p = propagate(process, mu, cov, "naive", steps)
        assert float((x.mean(0) - mu).norm() / cov.trace().sqrt()) < 0.03
        assert 0.4 < float(sample_cov.trace() / target.trace()) < 0.6
        assert 0.4 < float(p.trace() / target.trace()) < 0.6
        assert rel(sample_cov, target) > 0.4
        assert rel(sample_cov, p) < 0.08


# --- grid, NFE, denoise and what a soft process accepts -----------------------------------------


@pytest.mark.parametrize("sample", SOFT)
@pytest.mark.parametrize("denoise", [False, True])
def test_one_network_evaluation_per_step_plus_one_to_denoise(sample, denoise):
    mu, cov = smooth_gaussian()
    process = DenseBlurProcess(num_steps=30)
    oracle = GaussianOracle(process, mu, cov)
    out = sample(oracle, process, (8, 1, 8, 8), steps=12, denoise=denoise, generator=gen(4),
                 progress=False)  # fmt: skip
    assert out.nfe == 12 + denoise
    full = sample(oracle, process, (8, 1, 8, 8), steps=None, denoise=denoise, progress=False)
    assert full.nfe == 30 + denoise  # 30 levels i/30, then t = 0 (sigma 0.01)
    if denoise:
        raw = sample(oracle, process, (8, 1, 8, 8), steps=12, denoise=False, generator=gen(4),
                     progress=False).samples  # fmt: skip
        x0_hat = oracle.denoised(raw, torch.zeros(8, dtype=torch.float64))
        assert (out.samples - x0_hat).abs().max() < 1e-12


def test_the_grid_ends_at_t_0_only_where_the_process_is_noisy_there():
    blur = DenseBlurProcess(num_steps=30)  # levels i/30, sigma(0) = 0.01: t = 0 kept
    assert soft_grid(blur, 12)[-1] == 0 and len(soft_grid(blur, 12)) == 13
    ve = VESDE(num_steps=100)  # t = 0 is the sigma_min level
    assert soft_grid(ve, 10)[-1] == 0 and len(soft_grid(ve, 10)) == 11
    vp = VPSDE(num_steps=100)  # sigma(0) = 0: t = 0 is the data, not a level; ends at t = 1/N
    grid = soft_grid(vp, 10)
    assert grid[-2] == pytest.approx(0.1) and grid[-1] == pytest.approx(0.01) and len(grid) == 11
    full = soft_grid(vp, None)  # every level: 1/N already there, so the 0 is just dropped
    assert full[-1] == pytest.approx(0.01) and len(full) == 100
    score = lambda x, t: -x  # noqa: E731  (N(0, I) data: the VP score is -x)
    out = soft_momentum(score, vp, (16, 2), steps=10, generator=gen(), progress=False)
    assert out.nfe == 11 and torch.isfinite(out.samples).all()


def test_a_score_alone_does_not_serve_a_corruption_without_an_inverse():
    process = DenseBlurProcess(num_steps=10)
    with pytest.raises(ConfigError, match="clean-image estimate"):
        soft_momentum(lambda x, t: -x, process, (4, 1, 8, 8), steps=5, progress=False)


def test_a_soft_process_refuses_the_sde_samplers_and_accepts_the_soft_ones():
    process = DenseBlurProcess(num_steps=10)
    check_sampler(functools.partial(annealed_langevin, steps=5), process)  # a score is enough
    for refused in (ddim, ancestral, predictor_corrector, probability_flow):
        with pytest.raises(ConfigError, match="needs a process that"):
            check_sampler(
                functools.partial(refused, steps=None if refused is probability_flow else 5),
                process,
            )
    for sample in SOFT:
        check_sampler(functools.partial(sample, steps=5), process)
        check_sampler(functools.partial(sample, steps=5), VESDE(num_steps=10))
        with pytest.raises(ConfigError, match="steps must lie"):
            check_sampler(functools.partial(sample, steps=11), process)


@pytest.mark.parametrize("name", ["soft_naive", "soft_momentum", "soft_pf_momentum"])
def test_the_sampler_configs_build_the_samplers(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"sampler={name}", "process=ve"])
    sample = instantiate(cfg.sampler)
    assert sample.func.__name__ == name and sample.keywords["steps"] is None
    check_sampler(sample, instantiate(cfg.process))


def test_annealed_langevin_runs_on_the_blur_process_from_its_scores(blur_gaussian):
    """NCSN's sampler needs only each level's score (eq. 8 of the oracle's x0_hat) and noise at
    its last level: on the blur process, 40 levels x 40 steps with eps = 1e-4 (the step at the
    last level, sigma_0 = 0.01, is eps: below 2 sigma_0^2 = 2e-4, where Langevin diverges) recover
    the data's mean and total variance (measured: mean error 0.018, trace ratio 1.016; with
    20 x 20 steps and eps = 2e-5 the chain barely moves: 0.50 and 0.86). Its final step is the
    model's own x0_hat (one more evaluation)."""
    process, oracle, mu, cov = blur_gaussian
    out = annealed_langevin(oracle, process, (2000, 1, 8, 8), steps=40, n_steps_each=40,
                            step_lr=1e-4, generator=gen(0), progress=False)  # fmt: skip
    assert out.nfe == (40 + 1) * 40 + 1  # 40 levels, then t = 0 (sigma_0 = 0.01), then x0_hat
    x = out.samples.flatten(1)
    assert float((x.mean(0) - mu).norm() / cov.trace().sqrt()) < 0.04
    assert abs(float(torch.cov(x.T).trace() / cov.trace()) - 1) < 0.06
