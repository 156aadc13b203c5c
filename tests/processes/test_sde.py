"""The forward processes against closed forms and Monte-Carlo of their discretised chains."""

import math

import pytest
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.sde import VESDE, VPSDE, SubVPSDE
from diffusion_lab.schedules.beta import cosine_betas, linear_betas

DDPM_BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)


def test_vp_grid_is_ddpm_exactly():
    """On t_i = i/N the VP marginal is Ho et al.'s N(sqrt(abar_i) x0, (1 - abar_i) I) (eq. 4)."""
    vp = VPSDE()
    assert torch.allclose(vp.discrete_betas, DDPM_BETAS)
    alpha_bar = torch.cumprod(1 - DDPM_BETAS, 0)
    alpha, sigma = vp.marginal_coefficients(vp.level_times())
    assert torch.allclose(alpha.double() ** 2, alpha_bar, rtol=1e-5, atol=1e-7)
    assert torch.allclose(sigma.double() ** 2, 1 - alpha_bar, rtol=1e-5, atol=1e-7)


def test_vp_between_grid_points_follows_score_sde_beta():
    """beta(t) = -N log(1 - beta_i) is within O(1/N) of Score SDE's 0.1 + 19.9 t."""
    vp = VPSDE()
    t = torch.tensor([0.1, 0.5, 0.9])
    _, beta = vp.log_alpha_bar(t)
    assert torch.allclose(beta, 0.1 + 19.9 * t, rtol=0.02)


def ddpm_chain(x0, betas, steps, generator):
    """x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z: Ho et al.'s forward chain, literally."""
    x = x0.clone()
    for beta in betas[:steps]:
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(
            x.shape, generator=generator, dtype=x.dtype
        )
    return x


@pytest.mark.parametrize("steps", [1, 100, 1000])
def test_ddpm_marginal_matches_monte_carlo(steps):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 1.5, dtype=torch.float64)
    xt = ddpm_chain(x0, DDPM_BETAS, steps, g)
    vp = VPSDE()
    mean, std = vp.marginal_prob(x0[:1].float(), torch.tensor([steps / 1000]))
    se = std.item() / math.sqrt(len(xt))
    assert abs(xt.mean().item() - mean.item()) < 5 * se
    assert abs(xt.std().item() - std.item()) < 5 * std.item() / math.sqrt(2 * len(xt))


def test_ddpm_posterior_closed_form():
    """ancestral_step driven by the conditional score grad log q(x_t | x_0) gives q(x_{t-1} | x_t, x_0):
    mean sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t)(1 - abar_{t-1}) / (1 - abar_t) x_t,
    variance (1 - abar_{t-1}) / (1 - abar_t) beta_t (Ho et al. eq. 6-7)."""
    vp = VPSDE()
    g = torch.Generator().manual_seed(1)
    x0, xt = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    for i in (2, 10, 500, 1000):
        t, t_prev = torch.full((8,), i / 1000), torch.full((8,), (i - 1) / 1000)
        ab = torch.cumprod(1 - DDPM_BETAS, 0)
        ab_t, ab_prev, beta = ab[i - 1], ab[i - 2], DDPM_BETAS[i - 1]
        cond_score = -(xt - ab_t.sqrt().float() * x0) / (1 - ab_t).float()
        mean, std = vp.ancestral_step(xt, t, t_prev, cond_score, variance="posterior")
        expected_mean = (ab_prev.sqrt() * beta / (1 - ab_t)).float() * x0 + (
            (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t)
        ).float() * xt
        expected_var = (1 - ab_prev) / (1 - ab_t) * beta
        assert torch.allclose(mean, expected_mean, atol=2e-4, rtol=1e-3)
        assert torch.allclose(std.double() ** 2, expected_var.expand(8), rtol=1e-3)
        _, std_transition = vp.ancestral_step(xt, t, t_prev, cond_score)
        assert torch.allclose(std_transition.double() ** 2, beta.expand(8), rtol=1e-3)


def test_ve_sigma_and_diffusion_closed_form():
    ve = VESDE(sigma_min=0.01, sigma_max=50.0)
    t = torch.tensor([0.0, 0.3, 1.0])
    _, sigma = ve.marginal_coefficients(t)
    expected = 0.01 * (50 / 0.01) ** t
    assert torch.allclose(sigma, expected, rtol=1e-5)
    _, g = ve.sde(torch.zeros(3, 2), t)
    assert torch.allclose(g, expected * math.sqrt(2 * math.log(5000)), rtol=1e-4)
    assert torch.allclose(ve.sigmas[[0, -1]].float(), torch.tensor([50.0, 0.01]))


def test_subvp_variance_is_square_of_vp_variance():
    vp, sub = VPSDE(), SubVPSDE()
    t = torch.linspace(0.01, 1, 7)
    _, s_vp = vp.marginal_coefficients(t)
    a_sub, s_sub = sub.marginal_coefficients(t)
    assert torch.allclose(s_sub, s_vp**2, atol=1e-6)
    assert torch.allclose(a_sub, vp.marginal_coefficients(t)[0])


@pytest.mark.parametrize("process", [VPSDE(), SubVPSDE(), VESDE(sigma_max=5.0)])
def test_marginal_against_euler_maruyama_of_the_sde(process):
    """Each SDE's marginal against Monte-Carlo of its Euler-Maruyama discretisation."""
    g = torch.Generator().manual_seed(2)
    n, steps, t_end = 20000, 2000, 0.6
    x0 = torch.full((n, 1), 0.8, dtype=torch.float64)
    x = x0 + process.marginal_coefficients(torch.zeros(1))[1].double() * torch.randn(
        x0.shape, generator=g, dtype=torch.float64
    )  # VE's x(0) carries sigma_min (Score SDE's convention)
    dt = t_end / steps
    for k in range(steps):
        t = torch.full((n,), k * dt, dtype=torch.float64)
        drift, diffusion = process.sde(x, t.float())
        x = (
            x
            + drift * dt
            + diffusion.double()[:, None]
            * math.sqrt(dt)
            * torch.randn(x.shape, generator=g, dtype=torch.float64)
        )
    mean, std = process.marginal_prob(x0[:1].float(), torch.tensor([t_end]))
    assert abs(x.mean().item() - mean.item()) < 5 * std.item() / math.sqrt(n) + 2e-3
    assert abs(x.std().item() / std.item() - 1) < 0.02


def test_cosine_betas_match_nichol_dhariwal():
    betas = cosine_betas(1000)
    alpha_bar = torch.cumprod(1 - betas, 0)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert alpha_bar[499].item() == pytest.approx(f(500) / f(0), rel=1e-6)
    assert betas.max().item() <= 0.999


def test_linear_betas_endpoints():
    betas = linear_betas(1e-4, 0.02, 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


def test_bad_process_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="sigma_min"):
        VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ConfigError, match="num_steps"):
        VPSDE(num_steps=1)
    with pytest.raises(ConfigError, match="beta"):
        VPSDE(beta_max=5000.0, num_steps=10)
