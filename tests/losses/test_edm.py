"""EDM's preconditioning (parameterization=edm) and loss (loss=edm) against Karras et al. 2022
Table 1, computed directly."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.losses.edm import EDMLoss
from diffusion_lab.processes.sde import VESDE, VPSDE
from diffusion_lab.samplers.grids import noise_ratio, time_of_ratio
from diffusion_lab.score_model import ScoreModel

S = 0.5  # sigma_data


class Recording(torch.nn.Module):
    """F(x; c_noise) = tanh(x) + c_noise / 10, keeping what it was fed."""

    def forward(self, x, label):
        self.fed, self.label = x, label
        return torch.tanh(x) + label[:, None] / 10


@pytest.mark.parametrize("process", [VESDE(sigma_max=80.0, num_steps=50), VPSDE(num_steps=100)],
                         ids=["ve", "vp"])  # fmt: skip
def test_the_preconditioning_is_table_1_in_the_coordinates_x_over_alpha(process):
    network = Recording()
    model = ScoreModel(network, process, "edm")
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0.02, 1.0, 9, dtype=torch.float64)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64) * 3
    alpha, sigma = (c[:, None] for c in process.marginal_coefficients(t))
    r = sigma / alpha  # Karras et al.'s sigma
    c_skip = S**2 / (r**2 + S**2)
    c_out = r * S / (r**2 + S**2).sqrt()
    c_in = 1 / (r**2 + S**2).sqrt()
    c_noise = r.log().squeeze(1) / 4
    x_tilde = x / alpha
    denoised = model.denoised(x, t)
    # the network runs in float32 (its weights'), the rest in float64
    torch.testing.assert_close(network.fed.double(), c_in * x_tilde, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(network.label.double(), c_noise, rtol=1e-6, atol=1e-6)
    expected = c_skip * x_tilde + c_out * (torch.tanh(c_in * x_tilde) + c_noise[:, None] / 10)
    torch.testing.assert_close(denoised, expected, rtol=1e-5, atol=1e-6)


def test_the_loss_is_lambda_weighted_denoising_error_at_log_normal_levels():
    process = VESDE(sigma_min=0.002, sigma_max=80.0, num_steps=50)
    model = ScoreModel(Recording(), process, "edm")
    x0 = torch.randn(256, 3, generator=torch.Generator().manual_seed(1))
    loss = EDMLoss()
    torch.manual_seed(2)
    value = loss(model, x0)
    torch.manual_seed(2)
    drawn = (-1.2 + 1.2 * torch.randn(256)).exp()
    t = time_of_ratio(process, drawn)
    r = noise_ratio(process, t)
    torch.testing.assert_close(r, drawn.clamp(0.002, 80.0), rtol=1e-5, atol=0)  # VE: r = sigma
    xt = process.sample_marginal(x0, t, torch.randn_like(x0))
    weight = ((r**2 + S**2) / (r * S) ** 2)[:, None]
    expected = (weight * (model.denoised(xt, t) - x0) ** 2).mean()
    torch.testing.assert_close(value, expected)
    assert math.isfinite(float(value))


def test_the_loss_needs_a_gaussian_process():
    from diffusion_lab.processes.soft import SoftBlurProcess

    model = ScoreModel(Recording(), SoftBlurProcess(num_steps=10, blur_max=2.0), "x0")
    with pytest.raises(ConfigError, match="loss=edm.*SoftBlurProcess.*process=ve"):
        EDMLoss()(model, torch.randn(2, 1, 8, 8))
