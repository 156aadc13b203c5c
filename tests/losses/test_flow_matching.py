"""Conditional flow matching (loss=flow_matching) against closed forms: the loss of a zero
velocity, the zero loss of the exact velocity of a one-point data set, and paired noise."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.losses.edm import EDMLoss
from diffusion_lab.losses.epsilon import EpsilonLoss
from diffusion_lab.losses.flow_matching import FlowMatchingLoss
from diffusion_lab.processes.flow import FlowProcess
from diffusion_lab.processes.sde import VPSDE
from diffusion_lab.processes.soft import SoftBlurProcess
from diffusion_lab.score_model import ScoreModel


class Constant(torch.nn.Module):
    """u(x, t) = value (a float64 network)."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(value, dtype=torch.float64))

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) + self.value


@pytest.mark.parametrize(
    ("path", "scale"), [("linear", 1.0), ("cosine", math.pi**2 / 8)], ids=["linear", "cosine"]
)
def test_a_zero_velocity_costs_the_targets_second_moment(path: str, scale: float) -> None:
    """u = 0: the loss is E_t,z (alpha' x0 + sigma' z)^2 = E[alpha'^2] x0^2 + E[sigma'^2] per
    dimension: 1 + x0^2 on the linear path (alpha' = -1, sigma' = 1), pi^2 / 8 (1 + x0^2) on the
    cosine one (t ~ U(0, 1)); within 5 standard errors of 40000 draws."""
    torch.manual_seed(0)
    model = ScoreModel(Constant(), FlowProcess(path), "velocity")
    x0 = torch.full((40_000, 1), 0.6, dtype=torch.float64)
    loss = float(FlowMatchingLoss()(model, x0))
    expected = scale * (1 + 0.6**2)
    # per-draw std of the squared target: below 2.5 expected for both paths (Gaussian z)
    assert abs(loss - expected) < 5 * 2.5 * expected / math.sqrt(len(x0))


class OnePointVelocity(torch.nn.Module):
    """The exact marginal velocity of data at the single point c under the linear path:
    x0 = c, so z = (x - (1 - t) c) / t and u = z - c = (x - c) / t."""

    conditioned_on = "noise_label"

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return (x - self.c) / label[:, None] + self.anchor


def test_the_exact_velocity_of_a_one_point_data_set_costs_nothing() -> None:
    torch.manual_seed(1)
    model = ScoreModel(OnePointVelocity(0.3), FlowProcess("linear"), "velocity")
    x0 = torch.full((512, 2), 0.3, dtype=torch.float64)
    assert float(FlowMatchingLoss(eps=1e-3)(model, x0)) < 1e-20
    wrong = ScoreModel(OnePointVelocity(0.4), FlowProcess("linear"), "velocity")
    assert float(FlowMatchingLoss(eps=1e-3)(wrong, x0)) > 1e-3


def test_paired_noise_is_the_z_of_the_target() -> None:
    """With ``noise`` given (reflow's pairs), the target is alpha' x0 + sigma' noise at the
    drawn times: on the linear path noise - x0 whatever t, so a constant model that outputs
    it costs nothing."""
    x0 = torch.full((64, 3), -0.2, dtype=torch.float64)
    noise = torch.full((64, 3), 0.5, dtype=torch.float64)
    model = ScoreModel(Constant(0.7), FlowProcess("linear"), "velocity")
    assert float(FlowMatchingLoss()(model, x0, noise)) < 1e-24
    assert float(FlowMatchingLoss()(model, x0)) > 0.1


def test_every_gaussian_process_has_a_velocity_target_and_others_are_refused() -> None:
    torch.manual_seed(2)
    x0 = torch.randn(8, 2, dtype=torch.float64)
    assert math.isfinite(
        float(FlowMatchingLoss(eps=1e-3)(ScoreModel(Constant(), VPSDE(), "v"), x0))
    )
    blur = ScoreModel(Constant(), SoftBlurProcess(num_steps=10, blur_max=2.0), "x0")
    with pytest.raises(ConfigError, match="flow_matching regresses .*SoftBlurProcess"):
        FlowMatchingLoss()(blur, torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize(
    ("parameterization", "loss"),
    [("velocity", FlowMatchingLoss()), ("v", EpsilonLoss()),
     ("velocity", EpsilonLoss(weighting="min_snr")), ("edm", EDMLoss())],
    ids=["flow matching", "v, L_simple", "velocity, min-SNR", "EDM"],
)  # fmt: skip
def test_every_parameterisation_and_loss_is_finite_on_a_flow_at_pure_noise(parameterization, loss):
    """Two levels, t = 1/2 and t = 1 (alpha = 0): min-SNR's weight min(1, gamma / SNR) is 1
    there (SNR = 0), v and velocity read x0 and the noise without dividing by alpha, EDM's label
    saturates; the loss and its gradients are finite."""
    torch.manual_seed(3)
    network = torch.nn.Linear(2, 2).double()
    model = ScoreModel(Wrapped(network), FlowProcess("linear", num_steps=2), parameterization)
    value = loss(model, torch.randn(64, 2, dtype=torch.float64))
    value.backward()
    assert math.isfinite(float(value))
    assert all(torch.isfinite(p.grad).all() for p in network.parameters())


class Wrapped(torch.nn.Module):
    """A linear map of x, shifted by the label: a network that trains."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + label.to(x.dtype)[:, None]
