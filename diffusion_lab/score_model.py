"""A network plus the meaning of its output: the score, the noise and the clean-image estimate."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.base import ForwardProcess
from diffusion_lab.utils import append_dims, batch_time


class Marginal:
    """The marginal x_t = alpha(t) x_0 + sigma(t) z at a batch's times, each coefficient
    broadcast against the batch x and in its dtype: what a parameterisation reads its output
    with. ``alpha`` is computed when a reading first asks for it, so that processes without a
    scalar mean (Soft Diffusion's blur, where the mean is an operator on x_0) serve every
    output that needs only sigma; an output that reads alpha says so (``needs_alpha``) and is
    refused on them when the model is built."""

    def __init__(self, process: ForwardProcess, t: torch.Tensor, x: torch.Tensor) -> None:
        self.process, self.t, self.x = process, t, x
        self.sigma = append_dims(process.std(t), x.ndim).to(x.dtype)

    @functools.cached_property
    def alpha(self) -> torch.Tensor:
        alpha = self.process.marginal_coefficients(self.t)[0]  # type: ignore[attr-defined]
        return append_dims(alpha, self.x.ndim).to(self.x.dtype)

    @functools.cached_property
    def rates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha'(t), sigma'(t)), broadcast as alpha and sigma."""
        rates = self.process.marginal_rates(self.t)  # type: ignore[attr-defined]
        return tuple(append_dims(r, self.x.ndim).to(self.x.dtype) for r in rates)  # type: ignore[return-value]


# (output, x, marginal) -> the quantity.
Reading = Callable[[torch.Tensor, torch.Tensor, Marginal], torch.Tensor]


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
    #: Read with alpha(t) as well as sigma(t): needs a process with Gaussian marginals.
    needs_alpha: bool = False
    #: What the network is fed instead of x (a preconditioned input), and conditioned on
    #: instead of the process's label ((B,)), for outputs that precondition (EDM).
    network_input: Callable[[torch.Tensor, Marginal], torch.Tensor] | None = None
    label: Callable[[torch.Tensor, Marginal], torch.Tensor] | None = None


def _scalar(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The network's output as one energy per example (B,)."""
    if out.numel() != x.shape[0]:
        raise ConfigError(
            f"an energy parameterization needs one network output per example, got shape "
            f"{tuple(out.shape)} for {x.shape[0]} examples: use a scalar network such as "
            f"network=mlp_energy (network.out_dim=1)"
        )
    return out.reshape(x.shape[0])


#: What a network's output means (the ``parameterization`` of a method), read with the marginal m
#: of x_t = alpha x_0 + sigma z (m.alpha, m.sigma):
#:   eps: the noise z (DDPM, Ho et al. eq. 14); score = -eps / sigma (Khungurn sec. 7.1.2).
#:   score: the score itself (NCSN, Khungurn sec. 5).
#:   score_over_sigma: score = output / sigma (NCSNv2 Technique 3, Khungurn sec. 6.3).
#:   x0: the clean image h(x_t, t) (Soft Diffusion, Daras et al. eq. 8).
#:   x0_residual: the residual to it, h = phi(x_t, t) + x_t (Daras et al. eq. 10).
#:   v: v = alpha z - sigma x_0 (Salimans & Ho 2022, sec. 4 and App. D), so that
#:     x_0 = (alpha x - sigma v) / (alpha^2 + sigma^2) and z = (sigma x + alpha v) / (alpha^2 +
#:     sigma^2): alpha x - sigma v and sigma x + alpha v on VP, where alpha^2 + sigma^2 = 1.
#:   velocity: the flow u = dx_t/dt = alpha' x_0 + sigma' z (flow matching, Lipman et al. 2023
#:     sec. 4; z - x_0 on the linear path), so with det = alpha sigma' - sigma alpha':
#:     x_0 = (sigma' x - sigma u) / det and z = (alpha u - alpha' x) / det (x - t u and x + (1 - t)
#:     u on the linear path, where det = 1).
#:   edm: Karras et al. 2022's preconditioning (Table 1, "Ours"), in the coordinates x / alpha
#:     with noise level r = sigma / alpha: D = c_skip(r) x / alpha + c_out(r) F(c_in(r) x / alpha;
#:     c_noise(r)), c_skip = s^2 / (r^2 + s^2), c_out = r s / sqrt(r^2 + s^2), c_in = 1 /
#:     sqrt(r^2 + s^2), c_noise = ln(r) / 4, s = sigma_data = 0.5; written with d = sqrt(sigma^2 +
#:     alpha^2 s^2): F sees x / d, D = s^2 alpha x / d^2 + sigma s F / d (no division by alpha).
#:   energy: an energy E(x, t), p_t(x) proportional to exp(-E) (Khungurn sec. 2, the energy-based
#:     model); score = -grad_x E.
#:   energy_over_sigma: E = output / sigma, so score = -grad_x output / sigma (NCSNv2's
#:     s(x) / sigma, Technique 3, for an energy).
#: sigma_data of EDM's preconditioning: the std of data in [-1, 1] (Karras et al. sec. 5).
EDM_SIGMA_DATA = 0.5
#: Where c_noise = ln(r) / 4 saturates: past r = 1e4 (a flow near t = 1, where alpha = 0 and r is
#: infinite) the data's weight in x / alpha is below 1e-8 and the label stays ln(1e4) / 4 = 2.3.
EDM_MAX_RATIO = 1e4


def _velocity_det(m: Marginal) -> torch.Tensor:
    """alpha sigma' - sigma alpha', the determinant of (x, u) in terms of (x_0, z)."""
    rate_alpha, rate_sigma = m.rates
    return m.alpha * rate_sigma - m.sigma * rate_alpha


def _edm_scale(m: Marginal) -> torch.Tensor:
    """d = sqrt(sigma^2 + alpha^2 sigma_data^2) = alpha sqrt(r^2 + sigma_data^2)."""
    return (m.sigma**2 + m.alpha**2 * EDM_SIGMA_DATA**2).sqrt()


OUTPUT_KINDS: dict[str, OutputKind] = {
    "eps": OutputKind(score=lambda out, x, m: -out / m.sigma, eps=lambda out, x, m: out),
    "score": OutputKind(score=lambda out, x, m: out),
    "score_over_sigma": OutputKind(
        score=lambda out, x, m: out / m.sigma, eps=lambda out, x, m: -out
    ),
    "x0": OutputKind(x0=lambda out, x, m: out),
    "x0_residual": OutputKind(x0=lambda out, x, m: out + x),
    "v": OutputKind(
        x0=lambda out, x, m: (m.alpha * x - m.sigma * out) / (m.alpha**2 + m.sigma**2),
        eps=lambda out, x, m: (m.sigma * x + m.alpha * out) / (m.alpha**2 + m.sigma**2),
        needs_alpha=True,
    ),
    "velocity": OutputKind(
        x0=lambda out, x, m: (m.rates[1] * x - m.sigma * out) / _velocity_det(m),
        eps=lambda out, x, m: (m.alpha * out - m.rates[0] * x) / _velocity_det(m),
        needs_alpha=True,
    ),
    "edm": OutputKind(
        x0=lambda out, x, m: (
            EDM_SIGMA_DATA**2 * m.alpha * x / _edm_scale(m) ** 2
            + m.sigma * EDM_SIGMA_DATA * out / _edm_scale(m)
        ),
        needs_alpha=True,
        network_input=lambda x, m: x / _edm_scale(m),
        label=lambda x, m: (
            (m.sigma / m.alpha).clamp(max=EDM_MAX_RATIO).reshape(x.shape[0]).log() / 4
        ),
    ),
    "energy": OutputKind(energy=lambda out, x, m: _scalar(out, x)),
    "energy_over_sigma": OutputKind(
        energy=lambda out, x, m: _scalar(out, x) / m.sigma.reshape(x.shape[0])
    ),
}
PARAMETERIZATIONS = tuple(OUTPUT_KINDS)


def _ends_in_pure_noise(process: ForwardProcess) -> bool:
    """Whether alpha(1) = 0 (a flow-matching path): x_1 then holds nothing of x_0."""
    coefficients = getattr(process, "marginal_coefficients", None)
    return coefficients is not None and float(coefficients(torch.ones(1))[0]) == 0.0


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
        # the classes the next evaluations are conditioned on, and the guidance scale
        self.classes: torch.Tensor | None = None
        self.guidance_scale = 1.0
        if parameterization not in OUTPUT_KINDS:
            raise ConfigError(
                f"unknown parameterization {parameterization!r}: use one of {PARAMETERIZATIONS}"
            )
        self.network = network
        self.process = process
        self.parameterization = parameterization
        self.kind = OUTPUT_KINDS[parameterization]
        if self.kind.needs_alpha and not hasattr(process, "marginal_coefficients"):
            raise ConfigError(
                f"parameterization {parameterization!r} reads alpha(t), which "
                f"{type(process).__name__} does not have (its mean is not alpha(t) x0): use "
                "eps, score, x0 or x0_residual"
            )
        if self.kind.x0 is None and _ends_in_pure_noise(process):
            raise ConfigError(
                f"parameterization {parameterization!r} has no clean-image estimate where "
                f"alpha(t) = 0 ({type(process).__name__} at t = 1), which the samplers read: use "
                "velocity, v, x0 or edm"
            )
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

    def _output_and_marginal(
        self, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, Marginal, torch.Tensor]:
        t = batch_time(t, x)
        marginal = Marginal(self.process, t, x)
        label = self.label(t) if self.kind.label is None else self.kind.label(x, marginal)
        label = label.to(x.dtype) if label.is_floating_point() else label
        precondition = self.kind.network_input
        x_in = x if precondition is None else precondition(x, marginal)
        # the network in its own dtype (bf16-true, 64-true), the process's arithmetic in x's
        inputs = x_in.to(self.network_dtype)
        if self.channels_last and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        out = self._network(inputs, label)
        return out.to(x.dtype), marginal, t

    @contextmanager
    def conditioned(
        self, classes: torch.Tensor | None, guidance_scale: float = 1.0
    ) -> Iterator[None]:
        """Evaluate the network conditioned on ``classes`` (B,) (class -1: none) inside the
        block; with ``guidance_scale`` w other than 1, classifier-free guidance (Ho & Salimans
        2022): the output is uncond + w (cond - uncond), the conditional and unconditional
        passes batched as one. Every parameterisation here reads the output affinely (or, for
        an energy, differentiates it linearly), so the denoised estimate, the noise and the
        score are guided alike: w = 0 is the unconditional model, w = 1 the conditional."""
        saved = self.classes, self.guidance_scale
        self.classes, self.guidance_scale = classes, float(guidance_scale)
        try:
            yield
        finally:
            self.classes, self.guidance_scale = saved

    def _network(self, inputs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The network's output, conditioned and guided as :meth:`conditioned` set."""
        classes, w = self.classes, self.guidance_scale
        if classes is None:
            return self.network(inputs, label)
        classes = classes.to(inputs.device)
        if w == 1.0:
            return self.network(inputs, label, classes)
        none = torch.full_like(classes, -1)
        both = self.network(
            torch.cat([inputs, inputs]), torch.cat([label, label]), torch.cat([classes, none])
        )
        cond, uncond = both.chunk(2)
        return uncond + w * (cond - uncond)

    @property
    def network_dtype(self) -> torch.dtype:
        """The dtype of the network's weights (float32 for a network without any)."""
        return next((p.dtype for p in self.network.parameters() if p.is_floating_point()),
                    torch.float32)  # fmt: skip

    def _score(self, out: torch.Tensor, x: torch.Tensor, marginal: Marginal, t: torch.Tensor):
        if self.kind.score is not None:
            return self.kind.score(out, x, marginal)
        if self.kind.eps is not None:  # score = -z / sigma
            return -self.kind.eps(out, x, marginal) / marginal.sigma
        return self.process.score_from_denoised(x, t, self.kind.x0(out, x, marginal))

    def energy(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E_theta(x, t) per example (B,) of an energy parameterization: -log p_t(x) up to the
        unknown log-partition log Z(t) (Khungurn sec. 2)."""
        if self.kind.energy is None:
            raise ConfigError(
                f"parameterization {self.parameterization!r} has no energy: use energy or "
                f"energy_over_sigma"
            )
        out, marginal, _ = self._output_and_marginal(x, t)
        return self.kind.energy(out, x, marginal)

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
        out, marginal, t = self._output_and_marginal(x, t)
        return self._score(out, x, marginal, t)

    def predictions(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from one evaluation: the estimated clean image E[x_0 | x_t = x] and
        noise, each read from the output where the parameterisation gives it, else derived:
        eps = (x - mean(x0_hat, t)) / sigma, or x0 by Tweedie's formula (``process.denoise``,
        which needs an invertible mean) with eps = -sigma score."""
        if self.kind.energy is not None:
            t = batch_time(t, x)
            return self._from_score(x, t, self._energy_score(x, t))
        out, marginal, t = self._output_and_marginal(x, t)
        x0 = None if self.kind.x0 is None else self.kind.x0(out, x, marginal)
        eps = None if self.kind.eps is None else self.kind.eps(out, x, marginal)
        if x0 is None:
            return self._from_score(x, t, self._score(out, x, marginal, t), eps)
        if eps is None:
            eps = (x - self.process.mean(x0, t)) / marginal.sigma
        return x0, eps

    def _from_score(
        self, x: torch.Tensor, t: torch.Tensor, score: torch.Tensor, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if eps is None:
            eps = -append_dims(self.process.std(t), x.ndim).to(x.dtype) * score
        return self.process.denoise(x, t, score), eps

    def denoised(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Estimated clean image E[x_0 | x_t = x] (:meth:`predictions`)."""
        return self.predictions(x, t)[0]

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Estimated noise z = -sigma(t) score (:meth:`predictions`)."""
        return self.predictions(x, t)[1]

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Estimated flow dx_t/dt = alpha' x0_hat + sigma' eps_hat (the target of flow matching,
        ``losses.flow_matching``)."""
        x0, eps = self.predictions(x, t)
        rate_alpha, rate_sigma = Marginal(self.process, batch_time(t, x), x).rates
        return rate_alpha * x0 + rate_sigma * eps

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.score(x, t)
