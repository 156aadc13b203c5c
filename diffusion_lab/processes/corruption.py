"""Linear corruptions: x_t = C_t x_0 + sigma_t z with C_t a linear operator (Daras et al. eq. 4).

The forward-process contract with an operator-valued mean: a blur or a mask (Soft Diffusion)
has no inverse, so nothing here divides by C_t; a model of such a process predicts the clean
image (``ScoreModel`` parameterisations ``x0`` / ``x0_residual``) and its score follows from
eq. 8, ``ForwardProcess.score_from_denoised``. The SDEs are the scalar case C_t = alpha(t) I,
:class:`ScalarCorruption`, which reproduces them through this generic path. Soft Diffusion's
blur and mask are in ``processes.soft``.
"""

from __future__ import annotations

import abc

import torch

from diffusion_lab.operators import (
    LinearOperator,
    ScaleOperator,
)
from diffusion_lab.processes.base import LINEAR_MEAN, ForwardProcess
from diffusion_lab.processes.sde import SDE


class LinearCorruption(ForwardProcess):
    """x_t = C_t x_0 + sigma_t z; subclasses give ``operator(t)`` (C_t for a batch of times)."""

    provides = frozenset({LINEAR_MEAN})

    @abc.abstractmethod
    def operator(self, t: torch.Tensor) -> LinearOperator:
        """C_t for per-example times t (shape (B,)); its ``apply`` keeps the shape of x."""

    def mean(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """C_t x0."""
        return self.operator(t).apply(x0)


class ScalarCorruption(LinearCorruption):
    """C_t = alpha(t) I with the alpha, sigma, levels, labels and prior of ``sde``.

    Any linear SDE's marginals as a corruption: the reference a new corruption is checked
    against (the generic path reproduces VE and VP to float precision, tests/processes/test_forward_process.py).
    """

    def __init__(self, sde: SDE) -> None:
        super().__init__(sde.num_steps)
        self.sde = sde

    def operator(self, t: torch.Tensor) -> LinearOperator:
        return ScaleOperator(self.sde.marginal_coefficients(t)[0])

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return self.sde.std(t)

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        return self.sde.prior_sampling(shape, generator, device)

    def level_times(self) -> torch.Tensor:
        return self.sde.level_times()

    def noise_label(self, t: torch.Tensor) -> torch.Tensor:
        return self.sde.noise_label(t)
