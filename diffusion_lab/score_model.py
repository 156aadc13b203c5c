"""A network plus the meaning of its output: the score, the noise and the clean-image estimate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.base import ForwardProcess
from diffusion_lab.utils import append_dims, batch_time

# (output, x, sigma) -> the quantity; sigma broadcast against x.
Reading = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class OutputKind:
    """How one parameterisation is read: as a score (``score``) or as a clean image (``x0``).

    Exactly one of ``score``, ``x0`` and ``energy`` is given; the other quantities follow from
    the process (Tweedie's formula for the SDEs, Daras et al. eq. 8 for any corruption) or, for
    an energy E (one number per example), from score = -grad_x E. ``eps`` reads the noise
    directly where the output gives it without arithmetic (else it is -sigma score).
    """

    score: Reading | None = None
    x0: Reading | None = None
    eps: Reading | None = None
    energy: Reading | None = None


def _scalar(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The network's output as one energy per example (B,)."""
    if out.numel() != x.shape[0]:
        raise ConfigError(
            f"an energy parameterization needs one network output per example, got shape "
            f"{tuple(out.shape)} for {x.shape[0]} examples: use a scalar network such as "
            f"network=mlp_energy (network.out_dim=1)"
        )
    return out.reshape(x.shape[0])


#: What a network's output means (the ``parameterization`` of a method):
#:   eps: the noise z of x_t = alpha x_0 + sigma z (DDPM, Ho et al. eq. 14); score = -eps / sigma
#:     (Khungurn sec. 7.1.2).
#:   score: the score itself (NCSN, Khungurn sec. 5).
#:   score_over_sigma: score = output / sigma (NCSNv2 Technique 3, Khungurn sec. 6.3).
#:   x0: the clean image h(x_t, t) (Soft Diffusion, Daras et al. eq. 8).
#:   x0_residual: the residual to it, h = phi(x_t, t) + x_t (Daras et al. eq. 10).
#:   energy: an energy E(x, t), p_t(x) proportional to exp(-E) (Khungurn sec. 2, the energy-based
#:     model); score = -grad_x E.
#:   energy_over_sigma: E = output / sigma, so score = -grad_x output / sigma (NCSNv2's
#:     s(x) / sigma, Technique 3, for an energy).
OUTPUT_KINDS: dict[str, OutputKind] = {
    "eps": OutputKind(score=lambda out, x, sigma: -out / sigma, eps=lambda out, x, sigma: out),
    "score": OutputKind(score=lambda out, x, sigma: out),
    "score_over_sigma": OutputKind(
        score=lambda out, x, sigma: out / sigma, eps=lambda out, x, sigma: -out
    ),
    "x0": OutputKind(x0=lambda out, x, sigma: out),
    "x0_residual": OutputKind(x0=lambda out, x, sigma: out + x),
    "energy": OutputKind(energy=lambda out, x, sigma: _scalar(out, x)),
    "energy_over_sigma": OutputKind(
        energy=lambda out, x, sigma: _scalar(out, x) / sigma.reshape(x.shape[0])
    ),
}
PARAMETERIZATIONS = tuple(OUTPUT_KINDS)


class ScoreModel(nn.Module):
    """``network`` read through ``parameterization`` under ``process``.

    The network is called as ``network(x, label)``; the label is ``process.noise_label(t)``, or
    ``process.level_index(t)`` for networks with one embedding per level (those whose
    ``conditioned_on`` attribute is ``"level_index"``, e.g. NCSN's conditional RefineNet). The
    model is itself a ``score(x, t)`` callable for every sampler, and gives ``denoised(x, t)``.
    """

    def __init__(
        self,
        network: nn.Module,
        process: ForwardProcess,
        parameterization: str = "eps",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        if parameterization not in OUTPUT_KINDS:
            raise ConfigError(
                f"unknown parameterization {parameterization!r}: use one of {PARAMETERIZATIONS}"
            )
        self.network = network
        self.process = process
        self.parameterization = parameterization
        self.kind = OUTPUT_KINDS[parameterization]
        levels = getattr(network, "num_levels", None)
        if self._per_level and levels != len(process.level_times()):
            raise ConfigError(
                f"the network has {levels} level embeddings but the process has "
                f"{len(process.level_times())} levels: set network.num_levels=${{process.num_steps}}"
            )

    @property
    def _per_level(self) -> bool:
        return getattr(self.network, "conditioned_on", "noise_label") == "level_index"

    def label(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is conditioned on at times t (shape (B,))."""
        if self._per_level:
            return self.process.level_index(t)
        return self.process.noise_label(t)

    def _output_and_sigma(
        self, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = batch_time(t, x)
        sigma = append_dims(self.process.std(t), x.ndim).to(x.dtype)
        label = self.label(t)
        label = label.to(x.dtype) if label.is_floating_point() else label
        # the network in its own dtype (bf16-true, 64-true), the process's arithmetic in x's
        inputs = x.to(self.network_dtype)
        if self.channels_last and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        out = self.network(inputs, label)
        return out.to(x.dtype), sigma, t

    @property
    def network_dtype(self) -> torch.dtype:
        """The dtype of the network's weights (float32 for a network without any)."""
        return next((p.dtype for p in self.network.parameters() if p.is_floating_point()),
                    torch.float32)  # fmt: skip

    def _score(self, out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor):
        if self.kind.score is not None:
            return self.kind.score(out, x, sigma)
        return self.process.score_from_denoised(x, t, self.kind.x0(out, x, sigma))

    def energy(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E_theta(x, t) per example (B,) of an energy parameterization: -log p_t(x) up to the
        unknown log-partition log Z(t) (Khungurn sec. 2)."""
        if self.kind.energy is None:
            raise ConfigError(
                f"parameterization {self.parameterization!r} has no energy: use energy or "
                f"energy_over_sigma"
            )
        out, sigma, _ = self._output_and_sigma(x, t)
        return self.kind.energy(out, x, sigma)

    def _energy_score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """-grad_x E by autograd. Where the caller records gradients (a loss), the result keeps
        its graph (create_graph: the loss differentiates it in theta, and implicit or sliced
        score matching in x as well, when x itself requires grad); elsewhere (sampling under
        ``no_grad`` or Lightning's ``inference_mode``) it is a plain tensor."""
        create_graph = torch.is_grad_enabled()
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().clone().requires_grad_(True)
            t_in = t.detach().clone() if torch.is_tensor(t) else t
            (grad,) = torch.autograd.grad(
                self.energy(x_in, t_in).sum(), x_in, create_graph=create_graph
            )
        return -grad if create_graph else -grad.detach()

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Estimated grad_x log p_t(x)."""
        if self.kind.energy is not None:
            return self._energy_score(x, t)
        out, sigma, t = self._output_and_sigma(x, t)
        return self._score(out, x, sigma, t)

    def denoised(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Estimated clean image E[x_0 | x_t = x] (for score and energy outputs, Tweedie's
        formula ``process.denoise``, which needs a process with an invertible mean)."""
        if self.kind.x0 is None:
            return self.process.denoise(x, batch_time(t, x), self.score(x, t))
        out, sigma, _ = self._output_and_sigma(x, t)
        return self.kind.x0(out, x, sigma)

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Estimated noise z = -sigma(t) score."""
        if self.kind.eps is not None:
            out, sigma, _ = self._output_and_sigma(x, t)
            return self.kind.eps(out, x, sigma)
        sigma = append_dims(self.process.std(batch_time(t, x)), x.ndim)
        return -sigma.to(x.dtype) * self.score(x, t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.score(x, t)
