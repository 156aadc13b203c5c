"""DDPM's noise loss (diffusion_lab.losses.epsilon) against direct computations: L_simple, the
min-SNR-gamma weighting (Hang et al. 2023) and the noise error of a v-network."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.losses.base import sample_times
from diffusion_lab.losses.epsilon import EpsilonLoss
from diffusion_lab.processes.sde import VPSDE
from diffusion_lab.score_model import ScoreModel


class Fixed(torch.nn.Module):
    """An output that is a fixed function of x and the label."""

    def forward(self, x, label):
        return torch.tanh(2 * x) + 1e-3 * label[:, None]


def replay(loss: EpsilonLoss, model: ScoreModel, x0: torch.Tensor, seed: int):
    """The times and noise the loss draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    t = sample_times(model.process, x0, loss.time_sampling, loss.eps)
    return t, torch.randn_like(x0)


@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_the_loss_is_the_weighted_noise_error(weighting, parameterization):
    process = VPSDE(num_steps=100)
    model = ScoreModel(Fixed(), process, parameterization)
    loss = EpsilonLoss(weighting=weighting, snr_gamma=5.0)
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    t, z = replay(loss, model, x0, seed=1)
    alpha, sigma = (c[:, None] for c in process.marginal_coefficients(t))
    xt = alpha * x0 + sigma * z
    out = Fixed()(xt, process.noise_label(t))
    z_hat = {"eps": out, "v": sigma * xt + alpha * out, "x0": (xt - alpha * out) / sigma}
    snr = (alpha / sigma) ** 2
    w = torch.minimum(snr, torch.tensor(5.0)) / snr if weighting == "min_snr" else 1.0
    expected = (w * (z_hat[parameterization] - z) ** 2).mean()
    torch.manual_seed(1)
    torch.testing.assert_close(loss(model, x0), expected, rtol=1e-4, atol=0)


def test_min_snr_weights_cap_the_high_snr_levels_only():
    process = VPSDE(num_steps=1000)
    model = ScoreModel(Fixed(), process, "eps")
    t = torch.tensor([0.001, 0.05, 0.2, 0.5, 1.0])
    alpha, sigma = process.marginal_coefficients(t)
    snr = (alpha / sigma) ** 2
    weights = EpsilonLoss(weighting="min_snr", snr_gamma=5.0).weights(model, t)
    torch.testing.assert_close(weights, torch.where(snr > 5, 5 / snr, torch.ones_like(snr)))
    assert weights[0] < 0.01 and weights[-1] == 1.0  # t -> 0: SNR -> infinity


def test_the_noise_error_of_a_v_network_is_alpha_times_its_v_error():
    """On VP, eps_hat - z = alpha (v_hat - v) for v = alpha z - sigma x0 (Salimans & Ho 2022)."""
    process = VPSDE(num_steps=100)
    model = ScoreModel(Fixed(), process, "v")
    g = torch.Generator().manual_seed(3)
    x0, z = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    t = torch.linspace(0.05, 0.95, 16)
    alpha, sigma = (c[:, None] for c in process.marginal_coefficients(t))
    xt = alpha * x0 + sigma * z
    v_hat = Fixed()(xt, process.noise_label(t))
    v = alpha * z - sigma * x0
    torch.testing.assert_close(model.eps(xt, t) - z, alpha * (v_hat - v), rtol=1e-4, atol=1e-5)


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match="loss.weighting 'snr'.*uniform, min_snr"):
        EpsilonLoss(weighting="snr")
    with pytest.raises(ConfigError, match="snr_gamma must be positive"):
        EpsilonLoss(weighting="min_snr", snr_gamma=0)
