"""Every process config over the whole range of times: the SDEs' marginals agree with their SDE
(the moment equations integrated from f and g) and with their transitions for any t < s; each
capability a process declares holds numerically; the FP embedding, whose mean is a per-image
table, declares only what it offers, so the samplers that invert alpha(t) are refused at build
time in one line."""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import pytest
import torch
from helpers import CONF, cli
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from hypothesis import given
from hypothesis import strategies as st

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.base import CAPABILITIES, ForwardProcess
from diffusion_lab.processes.fp_embedding import FPEmbeddingProcess
from diffusion_lab.processes.sde import SDE, VESDE
from diffusion_lab.samplers.base import check_sampler

PROCESS_CONFIGS = sorted(path.stem for path in (CONF / "process").glob("*.yaml"))
SIGMA_SCHEDULES = ("geometric", "linear", "cosine", "squared_cosine", "sigmoid")
BETA_SCHEDULES = ("beta_linear", "beta_cosine")
#: (process config, schedule) of every SDE a run can build.
SDE_CASES = (
    [("ve", s) for s in SIGMA_SCHEDULES]
    + [("ve_ncsn", s) for s in SIGMA_SCHEDULES]
    + [(p, None) for p in ("ve_ncsnv2", "ve_ncsnv2_cifar10", "ve_ncsnv2_celeba")]
    + [(p, s) for p in ("vp", "subvp") for s in BETA_SCHEDULES]
    + [("fp_embedding", None)]
)
GAUSS_NODES, GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(8)


@functools.cache
def process_from_config(name: str, schedule: str | None = None) -> ForwardProcess:
    overrides = [f"process={name}"] + ([f"schedule={schedule}"] if schedule else [])
    overrides += ["process/blur_schedule=soft_linear"] if name == "soft_blur" else []
    with initialize_config_dir(str(CONF), version_base=None):
        return instantiate(compose("config", overrides=overrides).process)


def knots(process: SDE) -> torch.Tensor:
    """Where the schedule's interpolation may kink, in float64: VE's t_i = i / (N - 1), VP's
    and sub-VP's t_i = i / N (their docstrings); the FP embedding's are its base's."""
    process = process.base if isinstance(process, FPEmbeddingProcess) else process
    n = process.num_steps
    if isinstance(process, VESDE):
        return torch.arange(n, dtype=torch.float64) / (n - 1)
    return torch.arange(n + 1, dtype=torch.float64) / n


def integrate(fn, t: float, s: float, breaks: torch.Tensor) -> torch.Tensor:
    """int_t^s fn(u) du by 8-point Gauss-Legendre on each piece between the breaks."""
    inner = breaks[(breaks > t) & (breaks < s)]
    ends = torch.tensor([t, s], dtype=torch.float64)
    edges = torch.cat([ends[:1], inner, ends[1:]])
    left, width = edges[:-1, None], edges.diff()[:, None]
    nodes = left + width * (torch.as_tensor(GAUSS_NODES)[None, :] + 1) / 2
    values = fn(nodes.flatten()).reshape(nodes.shape)
    return (values * torch.as_tensor(GAUSS_WEIGHTS)[None, :] * width / 2).sum()


def drift_and_diffusion(process: SDE, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f(u) (the drift is f(u) x) and g(u) at times u."""
    drift, g = process.sde(torch.ones(len(u), 1, dtype=torch.float64), u)
    return drift[:, 0], g


times_in_order = st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)).filter(
    lambda ts: ts[1] - ts[0] > 1e-6
)


@pytest.mark.parametrize("name, schedule", SDE_CASES)
@given(times=times_in_order)
def test_the_marginal_solves_the_moment_equations_of_the_sde(name, schedule, times):
    """For a linear SDE dx = f x dt + g dW: alpha(s) / alpha(t) = exp(int_t^s f) and
    sigma(s)^2 = a^2 sigma(t)^2 + int_t^s (alpha(s) / alpha(u))^2 g(u)^2 du, for any t < s."""
    process = process_from_config(name, schedule)
    t, s = times
    ends = torch.tensor([t, s], dtype=torch.float64)
    (alpha_t, alpha_s), (sigma_t, sigma_s) = process.marginal_coefficients(ends)
    breaks = knots(process)
    log_ratio = integrate(lambda u: drift_and_diffusion(process, u)[0], t, s, breaks)
    torch.testing.assert_close(alpha_s / alpha_t, log_ratio.exp(), rtol=1e-9, atol=0)

    def injected(u: torch.Tensor) -> torch.Tensor:
        alpha_u = process.marginal_coefficients(u)[0]
        return (alpha_s / alpha_u) ** 2 * drift_and_diffusion(process, u)[1] ** 2

    variance = (alpha_s / alpha_t) ** 2 * sigma_t**2 + integrate(injected, t, s, breaks)
    torch.testing.assert_close(variance, sigma_s**2, rtol=1e-7, atol=1e-14)


@pytest.mark.parametrize("name, schedule", SDE_CASES)
@given(times=times_in_order)
def test_the_transition_composes_the_marginals_with_a_real_variance(name, schedule, times):
    """(a, b) of t -> s: alpha(s) = a alpha(t) and sigma(s)^2 = a^2 sigma(t)^2 + b^2 with
    b^2 >= 0 before any clamp (the noise-to-signal ratio never falls with time)."""
    process = process_from_config(name, schedule)
    t, s = (torch.tensor([v], dtype=torch.float64) for v in times)
    a, b = process.transition_coefficients(t, s)
    (alpha_t, sigma_t), (alpha_s, sigma_s) = (process.marginal_coefficients(v) for v in (t, s))
    torch.testing.assert_close(a * alpha_t, alpha_s, rtol=1e-12, atol=0)
    unclamped = sigma_s**2 - a**2 * sigma_t**2
    assert float(unclamped) >= -1e-12 * float(sigma_s**2)
    torch.testing.assert_close(a**2 * sigma_t**2 + b**2, sigma_s**2, rtol=1e-10, atol=1e-15)


# ----------------------------------------------------------------- capabilities tell the truth
def fitted_fp(base: SDE | None = None) -> FPEmbeddingProcess:
    process = FPEmbeddingProcess(base or VESDE(sigma_min=0.01, sigma_max=5.0), num_steps=5,
                                 embedding="fokker_planck", cache=False)  # fmt: skip
    images = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    process.fit(images)
    return process


def claimed_processes() -> list[tuple[str, ForwardProcess, torch.Tensor]]:
    """(name, process, x0) for every process config (the soft ones fitted on random images,
    the FP embedding on its own two training images)."""
    cases = []
    x0 = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name in PROCESS_CONFIGS:
        if name == "fp_embedding":
            process = fitted_fp()
            cases.append((name, process, process.images.double()))
            continue
        process = process_from_config(name)
        if process.needs_fit:
            process.fit(x0.float())
        cases.append((name, process, x0))
    return cases


@pytest.fixture(scope="module")
def processes():
    return claimed_processes()


class _Predictions:
    """A model giving fixed (x0, eps) estimates and a fixed score, for the velocity check."""

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor, score: torch.Tensor) -> None:
        self.x0, self.eps, self.score = x0, eps, score

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.score

    def predictions(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x0, self.eps


def test_each_declared_capability_holds(processes):
    """gaussian_sde: mean = alpha(t) x0 and std = sigma(t); linear_mean: the mean is linear in
    x0; unit_mean: alpha = 1; noisy_at_zero: std(0) > 0; sde: a drift f x and a diffusion g;
    invertible_mean: alpha > 0; probability_flow: a finite velocity for t in (0, 1)."""
    t = torch.tensor([0.0, 0.013, 0.5, 0.77, 1.0], dtype=torch.float64).repeat_interleave(1)
    checked = set()
    for name, process, x0 in processes:
        assert process.provides <= set(CAPABILITIES), name
        x = x0[:1].expand(len(t), *x0.shape[1:])
        y = torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
        if "gaussian_sde" in process.provides:
            alpha, sigma = process.marginal_coefficients(t)
            torch.testing.assert_close(process.mean(x, t), alpha[:, None, None, None] * x)
            torch.testing.assert_close(process.std(t), sigma)
        if "linear_mean" in process.provides:
            torch.testing.assert_close(
                process.mean(2.0 * x - 3.0 * y, t).double(),
                (2.0 * process.mean(x, t) - 3.0 * process.mean(y, t)).double(),
                rtol=1e-5, atol=1e-5,
            )  # fmt: skip
        if "unit_mean" in process.provides:
            torch.testing.assert_close(process.mean(x, t), x)
        if "noisy_at_zero" in process.provides:
            assert float(process.std(torch.zeros(1, dtype=torch.float64))) > 0, name
        if "sde" in process.provides:
            drift, g = process.sde(x, t)
            assert drift.shape == x.shape and g.shape == t.shape, name
            assert bool(torch.isfinite(drift).all() and (g[1:] > 0).all() and g[0] >= 0), name
        if "invertible_mean" in process.provides:
            assert bool((process.marginal_coefficients(t)[0] > 0).all()), name
        if "probability_flow" in process.provides:  # a finite velocity from a finite model
            model = _Predictions(torch.zeros_like(x), torch.ones_like(x), y)
            interior = (t > 0) & (t < 1)
            velocity = process.probability_flow_velocity(model, x, t)
            assert velocity.shape == x.shape, name
            assert bool(torch.isfinite(velocity[interior]).all()), name
        checked |= process.provides
    assert checked == set(CAPABILITIES)


def test_the_fp_embedding_mean_is_its_table_not_alpha_x0(processes):
    """The reason the FP process is not gaussian_sde: its mean at t > 0 is x^n(x0), which on
    VE is not x0 (= alpha(t) x0); at t = 0 it is the image itself."""
    _, process, images = next(case for case in processes if case[0] == "fp_embedding")
    index = torch.arange(len(images))  # the images in the order of their index
    t = torch.full((len(images),), 0.6, dtype=torch.float64)
    alpha = process.marginal_coefficients(t)[0][:, None, None, None]
    assert float((process.table_at(index, t) - alpha * images).abs().max()) > 1e-3
    zero = torch.zeros(len(images), dtype=torch.float64)
    at_zero = process.table_at(index, zero).double()
    torch.testing.assert_close(at_zero, images, rtol=1e-5, atol=1e-6)
    assert "gaussian_sde" not in process.provides and "linear_mean" not in process.provides


def sampler_from_config(name: str, **overrides):
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=[f"sampler={name}"])
    return functools.partial(instantiate(cfg.sampler), **overrides)


REFUSED_ON_FP = ["ddim", "dpm_solver_pp", "sde_dpm_solver_pp", "euler", "heun",
                 "edm_stochastic", "ancestral", "annealed_langevin", "soft_momentum",
                 "soft_naive", "soft_pf_momentum"]  # fmt: skip


@pytest.mark.parametrize("name", REFUSED_ON_FP)
def test_samplers_that_invert_alpha_are_refused_on_the_fp_embedding(name):
    process = FPEmbeddingProcess(VESDE(), num_steps=10, cache=False)
    with pytest.raises(ConfigError, match="needs a process that") as refusal:
        check_sampler(sampler_from_config(name), process)
    assert "\n" not in str(refusal.value)


def test_the_probability_flow_and_the_reverse_sde_serve_the_fp_embedding():
    process = FPEmbeddingProcess(VESDE(), num_steps=10, cache=False)
    for name in ("ode", "pc"):
        check_sampler(sampler_from_config(name), process)
    with pytest.raises(ConfigError, match="predictor_corrector with predictor=ancestral"):
        check_sampler(sampler_from_config("pc", predictor="ancestral"), process)


def test_an_fp_run_with_ddim_stops_before_the_embedding_with_one_line(tmp_path):
    """As a user would: the experiment's offline line with sampler=ddim ends at build time
    (exit 2, one line), before the FP solve and before any checkpoint."""
    command = [sys.executable, "-m", "diffusion_lab.run", "+experiment=fp_embed_cifar10_single",
               "data=single_image", "data.image_size=32", "network=unet_small", "sampler=ddim",
               f"hydra.run.dir={tmp_path}"]  # fmt: skip
    result = cli.run(command, capture_output=True, text=True, timeout=300,
                     env=os.environ.copy())  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if "diffusion_lab: error:" in line]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and "sampler ddim needs a process that" in errors[0], errors
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
