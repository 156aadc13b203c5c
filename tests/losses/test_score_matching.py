"""Implicit and sliced score matching, the energy parameterisation and Hutchinson's trace (issue 13).

Closed forms on a Gaussian p = N(mu, Sigma) and a linear score s(x) = A x + b:
grad log p(x) = -Sigma^-1 (x - mu), so the Fisher divergence is
F = 1/2 E|| (A + Sigma^-1) (x - mu) + A mu + b ||^2 and the data-only constant is
C = 1/2 E||grad log p||^2 = 1/2 tr(Sigma^-1); every estimator must average to F - C. The
Monte-Carlo bounds are 4 standard errors of the per-example values (a false alarm about once in
16,000 runs), from the same draws.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CONF
from hydra import compose, initialize_config_dir
from torch import nn

from diffusion_lab.build import instantiate
from diffusion_lab.errors import ConfigError
from diffusion_lab.jacobian_trace import exact_trace, hutchinson_trace, make_probe
from diffusion_lab.losses.dsm import DenoisingScoreMatching
from diffusion_lab.losses.score_matching import ImplicitScoreMatching, SlicedScoreMatching
from diffusion_lab.metrics.likelihood import log_likelihood, unnormalized_log_density
from diffusion_lab.networks.mlp import MLP
from diffusion_lab.processes.sde import VESDE, VPSDE
from diffusion_lab.score_model import ScoreModel

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SIGMA = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
CLEAN = {"perturb": False, "time_sampling": "fixed", "fixed_time": 0.0, "weighting": "none"}


def gaussian_draws(n: int, seed: int) -> torch.Tensor:
    z = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return MU + z @ torch.linalg.cholesky(SIGMA).T


class LinearScore(nn.Module):
    """s(x) = A x + b, whatever the noise label."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(a.clone()), nn.Parameter(b.clone())

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return x @ self.a.T + self.b


class QuadraticEnergy(nn.Module):
    """E(x) = 1/2 x^T P x - q^T x (score -(P + P^T) x / 2 + q), one output per example."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.eye(2, dtype=torch.float64))
        self.q = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x @ self.p) * x).sum(1) - x @ self.q


def clean_model(network: nn.Module, parameterization: str = "score") -> ScoreModel:
    return ScoreModel(network, VESDE(sigma_min=0.01, sigma_max=1.0), parameterization)


WRONG_A = torch.tensor([[-0.3, 0.2], [0.1, -1.5]], dtype=torch.float64)
WRONG_B = torch.tensor([0.4, -0.7], dtype=torch.float64)


def fisher_minus_constant(a: torch.Tensor, b: torch.Tensor) -> float:
    """F - C in closed form for the linear score under N(MU, SIGMA)."""
    precision = torch.linalg.inv(SIGMA)
    m = a + precision
    offset = a @ MU + b
    fisher = 0.5 * (torch.trace(m @ SIGMA @ m.T) + offset @ offset)
    return float(fisher - 0.5 * torch.trace(precision))


ESTIMATORS = {
    "ism exact": ImplicitScoreMatching(trace="exact", **CLEAN),
    "ism hutchinson rademacher": ImplicitScoreMatching(trace="hutchinson", **CLEAN),
    "ism hutchinson gaussian, 3 probes": ImplicitScoreMatching(
        trace="hutchinson", probe="gaussian", num_probes=3, **CLEAN
    ),
    "ssm gaussian": SlicedScoreMatching(variance_reduced=False, projection="gaussian", **CLEAN),
    "ssm rademacher, 2 projections": SlicedScoreMatching(
        variance_reduced=False, projection="rademacher", num_projections=2, **CLEAN
    ),
    "ssm-vr": SlicedScoreMatching(**CLEAN),
}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_each_estimator_is_the_fisher_divergence_less_the_data_constant(name):
    torch.manual_seed(0)
    model = clean_model(LinearScore(WRONG_A, WRONG_B))
    values = ESTIMATORS[name].weighted(model, gaussian_draws(40_000, seed=1)).detach()
    bound = 4 * values.std() / math.sqrt(len(values))
    assert abs(values.mean() - fisher_minus_constant(WRONG_A, WRONG_B)) < bound


def test_the_true_score_minimises_the_objective():
    """At s = grad log p the Fisher divergence is 0, so the objective is -C = -tr(Sigma^-1)/2."""
    precision = torch.linalg.inv(SIGMA)
    assert fisher_minus_constant(-precision, precision @ MU) == pytest.approx(
        -0.5 * float(torch.trace(precision)), abs=1e-12
    )
    model = clean_model(LinearScore(-precision, precision @ MU))
    exact = ESTIMATORS["ism exact"].weighted(model, gaussian_draws(20_000, seed=2)).detach()
    # tr(A) is constant, so only 1/2 ||s||^2 varies: its mean is C up to the Monte-Carlo error.
    bound = 4 * exact.std() / math.sqrt(len(exact))
    assert abs(exact.mean() + 0.5 * torch.trace(precision)) < bound


@pytest.mark.parametrize("process", [VESDE(sigma_min=0.05, sigma_max=3.0), VPSDE()],
                         ids=["ve", "vp"])  # fmt: skip
def test_variance_weighted_ism_is_dsm_less_half_the_dimension(process):
    """Stein's lemma: 1/2 E||sigma s(x_t) + z||^2 = sigma^2 E[tr grad s + 1/2||s||^2] + D/2, for
    a nonlinear network at every level (the module docstring of losses.score_matching)."""
    torch.manual_seed(0)
    network = MLP(dim=2, hidden=32, depth=2, embedding="fourier").double()
    nn.init.normal_(network.out.weight, std=0.3)
    model = ScoreModel(network, process, "score")
    x0 = gaussian_draws(30_000, seed=3)
    t = torch.full((len(x0),), 0.3, dtype=torch.float64)
    ism = ImplicitScoreMatching(trace="exact", time_sampling="fixed", fixed_time=0.3)
    ism_values = ism.weighted(model, x0).detach()
    with torch.no_grad():
        noise = torch.randn_like(x0)
        dsm_values = DenoisingScoreMatching.variance_weighted(model, x0, t, noise)
    bound = 4 * math.sqrt(ism_values.var() / len(x0) + dsm_values.var() / len(x0))
    assert abs(ism_values.mean() + 1.0 - dsm_values.mean()) < bound  # D / 2 = 1


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_trace_is_unbiased_for_the_exact_trace(probe):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(4, 3, dtype=torch.float64).repeat(20_000, 1).requires_grad_(True)
    y = net(x)
    estimates = hutchinson_trace(y, x, make_probe(x, probe), create_graph=True)
    estimates = estimates.detach().reshape(20_000, 4)
    exact = exact_trace(y, x)[:4]
    bound = 4 * estimates.std(0) / math.sqrt(20_000)
    assert ((estimates.mean(0) - exact).abs() < bound).all()
    assert (estimates.std(0) > 0).all()  # the estimate is random, the bound is not vacuous


def test_exact_trace_matches_the_jacobian():
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    jacobians = torch.stack([torch.autograd.functional.jacobian(net, row) for row in x.detach()])
    torch.testing.assert_close(exact_trace(net(x), x), jacobians.diagonal(dim1=1, dim2=2).sum(1))


@pytest.mark.parametrize("parameterization", ["energy", "energy_over_sigma"])
def test_an_energy_models_score_is_minus_the_gradient_of_its_energy(parameterization):
    torch.manual_seed(0)
    network = MLP(dim=2, hidden=32, depth=2, embedding="fourier", out_dim=1).double()
    nn.init.normal_(network.out.weight, std=0.5)
    model = ScoreModel(network, VESDE(sigma_min=0.01, sigma_max=5.0), parameterization)
    x = torch.randn(6, 2, dtype=torch.float64)
    t = torch.full((6,), 0.4, dtype=torch.float64)
    h = 1e-5
    differences = []
    for i in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[i] = h
        with torch.no_grad():
            differences.append((model.energy(x + step, t) - model.energy(x - step, t)) / (2 * h))
    with torch.no_grad():
        score = model.score(x, t)
    assert score.grad_fn is None  # sampling gets a plain tensor
    torch.testing.assert_close(score, -torch.stack(differences, 1), atol=1e-7, rtol=1e-6)
    assert model.score(x, t).grad_fn is not None  # a loss keeps the graph (create_graph)


def test_an_energy_model_trains_with_dsm_and_samples_inside_inference_mode():
    torch.manual_seed(0)
    network = MLP(dim=2, hidden=16, depth=2, embedding="fourier", out_dim=1).double()
    model = ScoreModel(network, VESDE(sigma_min=0.01, sigma_max=5.0), "energy_over_sigma")
    loss = DenoisingScoreMatching(time_sampling="uniform")(model, gaussian_draws(64, seed=4))
    loss.backward()
    assert network.out.weight.grad.abs().sum() > 0
    with torch.inference_mode():  # Lightning's validation
        x = torch.randn(8, 2, dtype=torch.float64)
        assert torch.isfinite(model.denoised(x, torch.full((8,), 0.5))).all()
        value = ImplicitScoreMatching(time_sampling="uniform")(model, x)
    assert torch.isfinite(value)


def test_a_vector_network_is_refused_as_an_energy():
    model = clean_model(MLP(dim=2, hidden=8, depth=1), "energy")
    with pytest.raises(ConfigError, match="one network output per example"):
        model.score(torch.randn(3, 2), torch.full((3,), 0.5))
    with pytest.raises(ConfigError, match="has no energy"):
        clean_model(MLP(dim=2, hidden=8, depth=1), "score").energy(torch.randn(3, 2), 0.5)


class GaussianEnergy(nn.Module):
    """The exact energy |x|^2 / (2 v(t)), v = alpha^2 s^2 + sigma^2, of N(0, s^2 I) diffused by
    ``process`` (conditioned on t itself)."""

    def __init__(self, process: VPSDE, s: float) -> None:
        super().__init__()
        self.process, self.s = process, s
        self.unused = nn.Parameter(torch.zeros(()))

    def variance(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.process.marginal_coefficients(t)
        return alpha**2 * self.s**2 + sigma**2

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.pow(2).sum(1) / (2 * self.variance(t)) + self.unused


def test_the_unnormalised_log_density_differs_from_the_likelihood_by_one_constant():
    """VP's p_1 is N(0, I) to 1e-4 here, so the flow's log p_eps is exact and the gap is
    -log Z = -D/2 log(2 pi v(eps)) for every x."""
    process = VPSDE(conditioning="time")
    network = GaussianEnergy(process, 0.7)
    model = ScoreModel(network, process, "energy")
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    eps = 1e-3
    exact = log_likelihood(model, process, x, eps=eps, rtol=1e-8, atol=1e-8, divergence="exact")
    gap = exact.logp - unnormalized_log_density(model, x, eps)
    variance = float(network.variance(torch.tensor([eps], dtype=torch.float64)))
    torch.testing.assert_close(gap, torch.full_like(gap, -math.log(2 * math.pi * variance)),
                               atol=1e-4, rtol=0)  # fmt: skip


def train(model: ScoreModel, loss, x0: torch.Tensor, steps: int = 1500) -> None:
    """Full-batch Adam with the learning rate decayed 100-fold (the objectives' minimiser)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.01 ** (1 / steps))
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model, x0).backward()
        optimizer.step()
        schedule.step()


def recovered_moments(model: ScoreModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the Gaussian whose score is the learned s = A x + b."""
    x = torch.zeros(1, 2, dtype=torch.float64)
    with torch.no_grad():
        b = model.score(x, torch.zeros(1))[0]
        a = torch.stack([model.score(torch.eye(2, dtype=torch.float64)[i : i + 1], torch.zeros(1))[0] - b
                         for i in range(2)], 1)  # fmt: skip
    covariance = -torch.linalg.inv(a)
    return covariance @ b, covariance


DSM_SIGMA = 0.5
OBJECTIVES = {
    "ism exact": (ImplicitScoreMatching(trace="exact", **CLEAN), "linear"),
    "ism hutchinson": (ImplicitScoreMatching(trace="hutchinson", **CLEAN), "linear"),
    "ssm": (SlicedScoreMatching(variance_reduced=False, num_projections=2, **CLEAN), "linear"),
    "ssm-vr": (SlicedScoreMatching(**CLEAN), "linear"),
    "ism exact, energy": (ImplicitScoreMatching(trace="exact", **CLEAN), "energy"),
    "ssm-vr, energy": (SlicedScoreMatching(**CLEAN), "energy"),
    "dsm at sigma 0.5": (
        DenoisingScoreMatching(time_sampling="fixed", fixed_time=0.0, weighting="variance"),
        "linear",
    ),
}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_training_by_each_objective_recovers_the_gaussians_moments(name):
    """Bound: the sample moments of the 8000 draws are within ~0.07 (4 standard errors of
    Sigma_11 = 2) of the truth; the stochastic objectives add their gradient noise; 0.12."""
    torch.manual_seed(0)
    loss, kind = OBJECTIVES[name]
    x0 = gaussian_draws(8000, seed=6)
    zero, zeros = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    network = QuadraticEnergy() if kind == "energy" else LinearScore(zero - torch.eye(2), zeros)
    process = VESDE(sigma_min=DSM_SIGMA if name.startswith("dsm") else 0.01, sigma_max=1.0)
    model = ScoreModel(network, process, "energy" if kind == "energy" else "score")
    train(model, loss, x0)
    mean, covariance = recovered_moments(model)
    if name.startswith("dsm"):  # DSM matches p_sigma = N(mu, Sigma + sigma^2 I)
        covariance = covariance - DSM_SIGMA**2 * torch.eye(2)
    torch.testing.assert_close(mean, MU, atol=0.12, rtol=0)
    torch.testing.assert_close(covariance, SIGMA, atol=0.12, rtol=0)


def test_the_loss_configs_build_and_reject_bad_values():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ism = instantiate(compose("config", overrides=["loss=ism"]).loss)
        ssm = instantiate(compose("config", overrides=["loss=ssm"]).loss)
    assert isinstance(ism, ImplicitScoreMatching) and ism.trace == "exact"
    assert isinstance(ssm, SlicedScoreMatching) and ssm.variance_reduced
    with pytest.raises(ConfigError, match="unknown trace"):
        ImplicitScoreMatching(trace="approximate")
    with pytest.raises(ConfigError, match="fixed_time"):
        ImplicitScoreMatching(time_sampling="fixed")(clean_model(LinearScore(WRONG_A, WRONG_B)),
                                                     gaussian_draws(4, 0))  # fmt: skip


SAMPLERS = sorted(
    p.stem for p in (CONF / "sampler").glob("*.yaml") if not p.stem.startswith("soft")
)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_gaussian_sampler_samples_an_energy_model(name):
    """An energy model is a score model for every sampler of the Gaussian processes (Soft
    Diffusion's samplers need its own process): finite samples, NFE as the sampler counts."""
    from diffusion_lab.samplers.base import check_sampler

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        options = compose("config", overrides=[f"sampler={name}"]).sampler
    sample = instantiate(options)
    for process in (VPSDE(num_steps=100), VESDE(sigma_min=0.01, sigma_max=5.0, num_steps=100)):
        try:
            check_sampler(sample, process)
        except ConfigError:
            continue
        break
    torch.manual_seed(0)
    network = MLP(dim=2, hidden=16, depth=2, embedding="fourier", out_dim=1)
    nn.init.normal_(network.out.weight, std=0.1)
    model = ScoreModel(network, process, "energy_over_sigma")
    steps = {} if options.steps is None else {"steps": 4}
    extra = {"n_steps_each": 2} if "n_steps_each" in options else {}
    result = sample(model, process, (16, 2), generator=torch.Generator().manual_seed(0),
                    progress=False, **steps, **extra)  # fmt: skip
    assert result.samples.shape == (16, 2) and torch.isfinite(result.samples).all()
    assert result.nfe > 0
