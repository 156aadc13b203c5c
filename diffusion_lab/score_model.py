"""Turn a network's output into a score, a noise prediction or a clean-image prediction."""

from __future__ import annotations

import torch
from torch import nn

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.sde import SDE
from diffusion_lab.utils import append_dims, batch_time

PARAMETERIZATIONS = ("eps", "score", "score_over_sigma")


class ScoreModel(nn.Module):
    """A network plus the meaning of its output under ``process``.

    ``parameterization``:
      - ``"eps"``: the network predicts the noise z of x_t = alpha x_0 + sigma z (DDPM, Ho et al.
        eq. 14); score = -eps / sigma (Khungurn sec. 7.1.2).
      - ``"score"``: the network output is the score itself (NCSN, Khungurn sec. 5).
      - ``"score_over_sigma"``: score = output / sigma (NCSNv2 Technique 3, Khungurn sec. 6.3).
    The network is called as ``network(x, process.noise_label(t))``.
    """

    def __init__(self, network: nn.Module, process: SDE, parameterization: str = "eps") -> None:
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ConfigError(
                f"unknown parameterization {parameterization!r}: use one of {PARAMETERIZATIONS}"
            )
        self.network = network
        self.process = process
        self.parameterization = parameterization

    def _output_and_sigma(
        self, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = batch_time(t, x.shape[0], x.device)
        sigma = append_dims(self.process.marginal_coefficients(t)[1], x.ndim).to(x.dtype)
        return self.network(x, self.process.noise_label(t).to(x.dtype)), sigma

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Estimated grad_x log p_t(x); a ``score(x, t)`` callable for every sampler."""
        out, sigma = self._output_and_sigma(x, t)
        if self.parameterization == "eps":
            return -out / sigma
        if self.parameterization == "score_over_sigma":
            return out / sigma
        return out

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Estimated noise z = -sigma(t) score."""
        out, sigma = self._output_and_sigma(x, t)
        if self.parameterization == "eps":
            return out
        if self.parameterization == "score_over_sigma":
            return -out
        return -sigma * out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.score(x, t)
