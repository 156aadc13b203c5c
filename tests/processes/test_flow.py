"""Flow-matching paths (diffusion_lab.processes.flow) and what the core gives every Gaussian
process: the marginal rates, the probability-flow velocity alpha' x0 + sigma' eps and the
velocity parameterisation, checked over whole time ranges against autograd and closed forms."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_lab.data.toy2d import GaussianMixture
from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.flow import FlowProcess
from diffusion_lab.processes.sde import VESDE, VPSDE, SubVPSDE
from diffusion_lab.samplers import ancestral, annealed_langevin, pc
from diffusion_lab.samplers.base import CountingModel, check_sampler
from diffusion_lab.score_model import ScoreModel

PROCESSES = {
    "ve": VESDE,
    "vp": VPSDE,
    "subvp": SubVPSDE,
    "flow_linear": functools.partial(FlowProcess, "linear"),
    "flow_cosine": functools.partial(FlowProcess, "cosine"),
}
GAUSSIAN = GaussianMixture([[0.7, -0.4]], 0.3)
times = st.floats(min_value=0.002, max_value=0.998)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(PROCESSES)), t=times)
def test_the_rates_are_the_time_derivatives_of_the_coefficients(name: str, t: float) -> None:
    """marginal_rates against autograd of marginal_coefficients (float64), at any t."""
    process = PROCESSES[name]()
    time = torch.tensor([t], dtype=torch.float64, requires_grad=True)
    alpha, sigma = process.marginal_coefficients(time)
    d_alpha, d_sigma = (
        torch.autograd.grad(c.sum(), time, retain_graph=True)[0]
        if c.requires_grad else torch.zeros_like(time)  # VE's alpha = 1: a constant
        for c in (alpha, sigma)
    )  # fmt: skip
    rate_alpha, rate_sigma = process.marginal_rates(time.detach())
    torch.testing.assert_close(rate_alpha, d_alpha, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rate_sigma, d_sigma, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(t=st.floats(min_value=0.0, max_value=1.0))
def test_the_paths_run_from_data_to_pure_noise(t: float) -> None:
    """linear: (1 - t, t); cosine: alpha^2 + sigma^2 = 1; both (1, 0) at t = 0 and exactly
    (0, 1) at t = 1."""
    time = torch.tensor([t, 0.0, 1.0], dtype=torch.float64)
    for path in ("linear", "cosine"):
        alpha, sigma = FlowProcess(path).marginal_coefficients(time)
        assert alpha[1:].tolist() == [1.0, 0.0] and sigma[1:].tolist() == [0.0, 1.0]
        if path == "linear":
            assert (float(alpha[0]), float(sigma[0])) == (1 - t, t)
        else:
            assert abs(float(alpha[0] ** 2 + sigma[0] ** 2) - 1) < 1e-12


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(PROCESSES)), t=times)
def test_the_probability_flow_velocity_is_the_sdes_f_minus_half_g2_score(
    name: str, t: float
) -> None:
    """alpha' x0 + sigma' eps = f - g^2 s / 2 (Khungurn sec. 7.3.3) with the exact score of a
    Gaussian, wherever both are finite (t < 1)."""
    process = PROCESSES[name]()
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    time = torch.full((6,), t, dtype=torch.float64)
    exact = GAUSSIAN.score_fn(process)
    velocity = process.probability_flow_velocity(CountingModel(exact, process), x, time)
    drift = process.reverse(exact, probability_flow=True).sde(x, time)[0]
    torch.testing.assert_close(velocity, drift, rtol=1e-7, atol=1e-9)


def test_a_flows_velocity_is_finite_at_pure_noise() -> None:
    """At t = 1 (alpha = 0) the SDE form is infinite; the velocity is x - mu on the linear path
    (D = mu, the data mean, and eps = x)."""
    process = FlowProcess("linear")
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one = torch.ones(5, dtype=torch.float64)
    exact = GAUSSIAN.score_fn(process)
    velocity = process.probability_flow_velocity(CountingModel(exact, process), x, one)
    torch.testing.assert_close(velocity, x - GAUSSIAN.means[0])
    assert not torch.isfinite(process.sde(x, one)[0]).all()


class _Fixed(torch.nn.Module):
    """A fixed smooth function of (x, label), to read through each parameterisation; a float64
    network (its one weight sets the dtype the model feeds it)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return torch.sin(3 * x) + label.to(x.dtype)[:, None] * 0.1 + self.anchor


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(PROCESSES)), t=times)
def test_the_velocity_parameterisation_against_a_direct_computation(name: str, t: float) -> None:
    """u = alpha' x0 + sigma' z read back: x0 = (sigma' x - sigma u) / det, z = (alpha u -
    alpha' x) / det (x - t u and x + (1 - t) u on the linear path), and ``velocity`` returns u."""
    process = PROCESSES[name]()
    model = ScoreModel(_Fixed(), process, "velocity")
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    time = torch.full((4,), t, dtype=torch.float64)
    u = _Fixed()(x, process.noise_label(time))
    alpha, sigma = process.marginal_coefficients(time)
    rate_alpha, rate_sigma = process.marginal_rates(time)
    det = (alpha * rate_sigma - sigma * rate_alpha)[:, None]
    x0 = (rate_sigma[:, None] * x - sigma[:, None] * u) / det
    eps = (alpha[:, None] * u - rate_alpha[:, None] * x) / det
    got_x0, got_eps = model.predictions(x, time)
    torch.testing.assert_close(got_x0, x0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_eps, eps, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model.velocity(x, time), u, rtol=1e-9, atol=1e-12)
    if name == "flow_linear":
        torch.testing.assert_close(got_x0, x - t * u, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got_eps, x + (1 - t) * u, rtol=1e-9, atol=1e-12)


def test_outputs_without_a_clean_image_estimate_are_refused_on_a_flow() -> None:
    """eps, score and energies give x0 only by dividing by alpha, which is 0 at a flow's t = 1:
    refused when the model is built; velocity, v, x0 and edm are finite there."""
    for parameterization in ("eps", "score", "score_over_sigma", "energy"):
        with pytest.raises(ConfigError, match="no clean-image estimate where alpha"):
            ScoreModel(_Fixed(), FlowProcess(), parameterization)
    x, one = torch.randn(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for parameterization in ("velocity", "v", "x0", "edm"):
        with torch.no_grad():
            x0, eps = ScoreModel(_Fixed(), FlowProcess(), parameterization).predictions(x, one)
        assert torch.isfinite(x0).all() and torch.isfinite(eps).all(), parameterization


def test_samplers_that_need_a_finite_sde_or_an_invertible_mean_are_refused() -> None:
    """The reverse SDE of a flow diverges at t = 1 (no ``sde``), DDPM's ancestral step divides
    by alpha (no ``invertible_mean``), annealed Langevin needs noise at t = 0: one line each."""
    refused = [functools.partial(pc.predictor_corrector, steps=5),
               functools.partial(pc.euler_maruyama, steps=5),
               functools.partial(ancestral.ancestral, steps=5),
               functools.partial(annealed_langevin.annealed_langevin, steps=5)]  # fmt: skip
    for sample in refused:
        with pytest.raises(ConfigError, match="needs a process that .*FlowProcess is not one"):
            check_sampler(sample, FlowProcess())


def test_edm_preconditioning_keeps_a_finite_label_at_pure_noise() -> None:
    """c_noise = ln(r) / 4 saturates at ln(1e4) / 4 where r = sigma / alpha is infinite."""
    labels = []

    class Recording(_Fixed):
        def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            labels.append(label)
            return super().forward(x, label)

    model = ScoreModel(Recording(), FlowProcess(), "edm")
    model.predictions(torch.randn(2, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(labels[0], torch.full((2,), math.log(1e4) / 4, dtype=torch.float64))
