"""The forward-process contract every loss and sampler reads.

A forward process corrupts clean data x_0 into x_t = mean(x_0, t) + std(t) z, z ~ N(0, I), on
continuous time t in [0, 1] (t = 0 clean). The corrupted mean is whatever the family needs:
alpha(t) x_0 for the SDEs (``processes.sde``), C_t x_0 for a linear corruption such as a blur
or a mask (``processes.corruption``; Soft Diffusion, Daras et al. eq. 4), a precomputed table for
a score embedding. Whatever only needs the noise level reads ``std(t)``.

What a process offers beyond this contract is named in ``provides`` (capabilities declared
with :func:`declare_capability`; see ``samplers.base.check_sampler``), so that a sampler paired with a process it cannot serve stops
when the run is built, not mid-training.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from diffusion_lab.errors import ConfigError
from diffusion_lab.utils import append_dims

#: What a process can offer a sampler, and how a refusal explains it: each capability is
#: declared (:func:`declare_capability`) next to the code that provides it.
CAPABILITIES: dict[str, str] = {}


def declare_capability(name: str, meaning: str) -> str:
    """Register capability ``name``; ``meaning`` completes "needs a process that ..." in the
    refusal of a sampler that requires it. Returns the name."""
    if CAPABILITIES.setdefault(name, meaning) != meaning:
        raise ValueError(f"capability {name!r} is already declared with another meaning")
    return name


LINEAR_MEAN = declare_capability(
    "linear_mean",
    "has a mean linear in any x0, alpha(t) x0 or C_t x0 (the SDEs, flows, the soft processes)",
)
NOISY_AT_ZERO = declare_capability(
    "noisy_at_zero", "keeps noise at t = 0 (sigma(0) > 0: VE, the soft processes)"
)


class ForwardProcess(nn.Module, abc.ABC):
    """x_t = mean(x0, t) + std(t) z on t in [0, 1], with N discrete levels ``level_times()``.

    A module so that what :meth:`fit` estimates from training data lives in buffers and travels
    in checkpoints: sampling from a checkpoint then needs no data. ``conditioning`` chooses what
    :meth:`noise_label` gives a network: the process's own label (``native_conditioning``: sigma
    for VE, DDPM's step index for VP) or ``"time"``, t itself (needed where sigma does not
    identify the level, e.g. during a blur stage of constant noise).
    """

    #: Capabilities (keys of ``CAPABILITIES``) that samplers may require.
    provides: frozenset[str] = frozenset()
    #: The label networks get by default.
    native_conditioning = "time"

    def __init__(self, num_steps: int, conditioning: str | None = None) -> None:
        super().__init__()
        if num_steps < 2:
            raise ConfigError(f"process.num_steps must be at least 2, got {num_steps}")
        conditioning = conditioning or self.native_conditioning
        choices = sorted({self.native_conditioning, "time"})
        if conditioning not in choices:
            raise ConfigError(
                f"process.conditioning must be one of {choices} for {type(self).__name__}, "
                f"got {conditioning!r}"
            )
        self.num_steps = num_steps
        self.conditioning = conditioning
        self._fitted_names: set[str] = set()

    @abc.abstractmethod
    def mean(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The corrupted mean E[x_t | x_0 = x0], shaped like x0 (t of shape (B,))."""

    @abc.abstractmethod
    def std(self, t: torch.Tensor) -> torch.Tensor:
        """The noise level sigma(t), shape (B,)."""

    @abc.abstractmethod
    def prior_sampling(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """A draw from the distribution sampling starts from (t = 1)."""

    @abc.abstractmethod
    def level_times(self) -> torch.Tensor:
        """The N discrete levels as increasing times in [0, 1]."""

    def fixed_table(
        self, name: str, device: torch.device | str, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """A table fixed at construction (``"level_times"``, or a tensor attribute such as a
        schedule) on ``device`` in ``dtype`` (None: its own), copied there once and kept: looked
        up at every step or model call, a CPU table cost a blocking host-to-device copy each
        time on a GPU. Callers must not modify it in place."""
        key = (name, torch.device(device), dtype)
        copies = self.__dict__.setdefault("_fixed_table_copies", {})
        if key not in copies:
            table = self.level_times() if name == "level_times" else getattr(self, name)
            copies[key] = table.to(device=device, dtype=dtype)
        return copies[key]

    def native_noise_label(self, t: torch.Tensor) -> torch.Tensor:
        """The process's own network label at time t (t itself unless a subclass says otherwise)."""
        return t

    def noise_label(self, t: torch.Tensor) -> torch.Tensor:
        """What a network is conditioned on at time t (``conditioning``)."""
        return t if self.conditioning == "time" else self.native_noise_label(t)

    def level_index(self, t: torch.Tensor) -> torch.Tensor:
        """Index of the level nearest to t, counted from the noisiest (0 at t = 1).

        The label of networks with one embedding per level (NCSN's CIN++ RefineNet: index 0 is
        sigma_1 = sigma_max, the labels of the authors' code).

        Ties are decided the same on every machine: each |t - t_i| is one IEEE subtraction in t's
        dtype (correctly rounded on any CPU or GPU; no sum whose order could vary), and a t exactly
        halfway between two levels goes to the lower time, the less noisy level (``argmin``
        returns the first of equal minima; levels increase). Callers pass level times
        (``time_sampling="levels"``, the level grids), possibly in another dtype, which are their
        level (levels lie 1/N apart, far above float32 rounding), or continuous times.
        """
        levels = self.fixed_table("level_times", t.device, t.dtype)
        nearest = (t[:, None] - levels[None, :]).abs().argmin(dim=1)
        return len(levels) - 1 - nearest

    def sample_marginal(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """x_t = mean(x0, t) + std(t) noise."""
        return self.mean(x0, t) + append_dims(self.std(t), x0.ndim) * noise

    def score_from_denoised(
        self, x: torch.Tensor, t: torch.Tensor, x0_hat: torch.Tensor
    ) -> torch.Tensor:
        """grad log p_t(x) ~ (mean(x0_hat, t) - x) / std(t)^2 (Daras et al. eq. 8; for the SDEs
        Tweedie's formula read backwards)."""
        sigma = append_dims(self.std(t), x.ndim).to(x.dtype)
        return (self.mean(x0_hat, t) - x) / sigma**2

    def reverse_step(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor,
        x0_hat: torch.Tensor,
        step_std: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """x at t_prev < t from x at t and a clean-image estimate: DDIM's step (Song et al. 2020
        eq. 12) for any mean, mean(x0_hat, t_prev) + sqrt(sigma_prev^2 - s^2) eps_hat + s noise,
        with eps_hat = (x - mean(x0_hat, t)) / sigma and s = ``step_std`` (shape (B,)).

        Given x0, it keeps the marginal N(mean(x0, t_prev), sigma_prev^2 I) for every
        s <= sigma_prev; s = 0 is deterministic, and for C_t = alpha(t) I with s the posterior std
        it is DDPM's ancestral step (``SDE.ancestral_step``, variance "posterior").
        """
        sigma, sigma_prev = self.std(t), self.std(t_prev)
        eps_hat = (x - self.mean(x0_hat, t)) / append_dims(sigma, x.ndim)
        direction = (sigma_prev**2 - step_std**2).clamp(min=0).sqrt()
        return (
            self.mean(x0_hat, t_prev)
            + append_dims(direction, x.ndim) * eps_hat
            + append_dims(step_std, x.ndim) * noise
        )

    def fit(self, data: torch.Tensor) -> None:
        """Estimate what the process takes from the training data (a schedule, a prior, an
        embedding) into buffers declared by :meth:`register_fitted`; ``data`` are the training
        examples in model range. Nothing here."""

    def register_fitted(self, name: str) -> None:
        """Declare a buffer that :meth:`fit` fills: saved in checkpoints and restored from them
        whatever its shape, so that sampling from a checkpoint needs no data."""
        self._fitted_names.add(name)
        self.register_buffer(name, torch.empty(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        for name in self._fitted_names:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                self._buffers[name] = torch.empty_like(saved, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def needs_fit(self) -> bool:
        """Whether :meth:`fit` does anything (so that data are only gathered when it does)."""
        return type(self).fit is not ForwardProcess.fit
