"""NCSN's loss (conf/loss/dsm_levels.yaml): DSM with lambda(sigma) = sigma^2, one level per example.

The target is grad log q_sigma(x_tilde | x) = -(x_tilde - x) / sigma^2 (Khungurn sec. 5.1;
Spagnoletti et al. sec. 5), so a network that returns exactly that has loss 0; for a fixed wrong
score the loss is 1/2 E_i E_z ||sigma_i s + z||^2 (Khungurn eq. 5, halved as the loss documents).
"""

import pytest
import torch
from helpers import CONF
from hydra import compose, initialize_config_dir
from torch import nn

from diffusion_lab.build import instantiate
from diffusion_lab.processes.sde import VESDE
from diffusion_lab.score_model import ScoreModel
from diffusion_lab.utils import append_dims


def dsm_levels_loss():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["loss=dsm_levels"])
    return instantiate(cfg.loss)


class Oracle(nn.Module):
    """Returns -(x_tilde - x0) / sigma^power for a known clean batch x0 (the DSM target)."""

    def __init__(self, x0: torch.Tensor, power: int) -> None:
        super().__init__()
        self.x0, self.power = x0, power

    def forward(self, x_tilde: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return -(x_tilde - self.x0) / append_dims(sigma, x_tilde.ndim) ** self.power


class Constant(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.value.expand_as(x)


@pytest.mark.parametrize(("parameterization", "power"), [("score", 2), ("score_over_sigma", 1)])
def test_the_dsm_target_is_minus_x_tilde_minus_x_over_sigma_squared(parameterization, power):
    process = VESDE(sigma_min=0.01, sigma_max=1.0, num_steps=10)
    x0 = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = ScoreModel(Oracle(x0, power), process, parameterization)
    torch.manual_seed(0)
    assert dsm_levels_loss()(model, x0).item() == pytest.approx(0.0, abs=1e-8)


def test_a_fixed_wrong_score_gives_the_closed_form():
    process = VESDE(sigma_min=0.01, sigma_max=1.0, num_steps=10)
    dim, batch = 4, 200_000
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    model = ScoreModel(Constant(c), process, "score")
    torch.manual_seed(0)
    loss = dsm_levels_loss()(model, torch.zeros(batch, dim, dtype=torch.float64)).item()
    # 1/2 E ||sigma c + z||^2 = 1/2 (D + ||c||^2 mean_i sigma_i^2), the level uniform over the L.
    mean_sq_sigma = process.sigmas.double().pow(2).mean().item()
    expected = 0.5 * (dim + c.pow(2).sum().item() * mean_sq_sigma)
    # Standard error: per-example std of the summand / sqrt(batch), well under 1% here.
    assert loss == pytest.approx(expected, rel=0.02)
    assert expected > 0.5 * dim * 1.5  # the level draw matters: not just 1/2 E ||z||^2
