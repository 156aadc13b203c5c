"""Soft Diffusion's processes (Daras et al. sec. 4, App. D, F.1.1): x_t = C_t x_0 + sigma_t z
with C_t a Gaussian blur (:class:`SoftBlurProcess`, ``operators.GaussianBlur``) or a centred
window mask (:class:`SoftMaskProcess`, ``operators.CentredWindowMask``), two stages on t (noise,
then corruption) and a prior fitted to the training data (:meth:`SoftCorruption.fit`).
"""

from __future__ import annotations

import abc
import logging
from functools import partial
from pathlib import Path

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.operators import (
    BLUR_METHODS,
    CentredWindowMask,
    GaussianBlur,
    LinearOperator,
)
from diffusion_lab.processes.corruption import LinearCorruption
from diffusion_lab.sample_streams import randint, randn
from diffusion_lab.schedules.soft import (
    BlurSchedule,
    BlurScheduleSettings,
    fit_schedule,
    gaussian_blur,
)

log = logging.getLogger("diffusion_lab")


#: The priors :meth:`SoftCorruption.fit` can estimate (see the class docstring).
SOFT_PRIORS = ("mean_colour", "blurred_data")


class SoftCorruption(LinearCorruption):
    """Soft Diffusion's process x_t = C_t x_0 + sigma_t eta, eta ~ N(0, I) (Daras et al. eq. 4;
    sec. 4, App. D and F.1.1), with a subclass's operator family C(level).

    Two stages on t in [0, 1] (sec. 4: "an initial stage that increases the noise (with no
    blur) and then we fix the noise"):

    - noise stage t in [0, f], f = ``noise_fraction``: sigma_t = sigma_min (sigma_max /
      sigma_min)^(t / f), geometric from 0.01 to 0.1, and C_t = C(first level) = the identity;
    - corruption stage t in (f, 1]: sigma_t = sigma_max while the level (a blur std, an observed
      fraction) follows ``levels``: K values placed at equal t, t_k = f + k (1 - f) / (K - 1),
      interpolated linearly in t (App. C: "we then use linear interpolation to extend to the
      continuous case"; the scheduler of sec. 3.3 produces such a list). ``levels`` is a fitted
      buffer (``register_fitted``), so checkpoints carry it: given to the constructor, or None
      for a subclass that computes it in :meth:`fit` from the training data.

    f = 0.15 by default: the paper says only that the noise stage takes "less than 20% of the
    total time" (sec. 4); 0.15 is the largest round value clearly below that bound, giving the
    one decade of noise (0.01 -> 0.1, geometric) 15% of the steps of an equal-t sampler (42 of
    280). It is a config value for the ablation. sigma_0 = sigma_min = 0.01, not 0 (the
    paper's sigma_0 = 0 would make eq. 12's weight 1/sigma_t^2 infinite): t = 0 carries the
    smallest noise, as the VE SDE's x(0) does here.

    The network is conditioned on t (``native_conditioning = "time"``): sigma is constant over
    the corruption stage, so it cannot tell the levels apart. ``level_times()``: the
    N = ``num_steps`` times k / N, k = 1..N, in (0, 1] (1/N is the cleanest level; samplers
    append t = 0). ``provides`` is ``linear_mean`` and ``noisy_at_zero`` only: these are not
    SDEs with Gaussian marginals alpha(t) x0 + sigma(t) z, so SDE samplers (DDIM, PC, ancestral, ...) are refused
    when the run is built (``samplers.base.check_sampler``), while annealed Langevin, which needs
    only the score of each level and noise at the last one, runs.

    The prior p_1 is not specified by the paper, and App. D's "noise on top of (almost) a single
    colour" is not what zero padding gives (a blurred constant image is bright in the centre and
    dark at the corners). It is estimated from the training data by :meth:`fit` into buffers
    (``register_fitted``), so it travels in checkpoints and a checkpoint samples without data;
    sampling before fitting is a ConfigError. ``prior``:

    - ``"mean_colour"``: C_1 (c 1) + sigma_1 eta with the colour c ~ N(mu, Sigma), mu and Sigma
      the mean and covariance of the training images' per-channel mean colours (C x C; the
      Cholesky factor is stored);
    - ``"blurred_data"``: C_1 x0 + sigma_1 eta for x0 drawn uniformly from a bank of
      ``prior_bank_size`` training images (a fixed random subset) stored already corrupted:
      the empirical q_1 itself, the reference against which the mean-colour approximation is
      compared in the ablation (it keeps the spatial structure C_1 x0 still has; its cost is
      the bank in the checkpoint: 1024 x 3 x 64 x 64 floats = 50 MB for CelebA-64).
    """

    native_conditioning = "time"
    provides = LinearCorruption.provides | {"noisy_at_zero"}

    def __init__(
        self,
        levels: list[float] | None,
        num_steps: int = 1000,
        sigma_min: float = 0.01,
        sigma_max: float = 0.1,
        noise_fraction: float = 0.15,
        prior: str = "mean_colour",
        prior_bank_size: int = 1024,
        conditioning: str | None = None,
    ) -> None:
        super().__init__(num_steps, conditioning)
        if not 0 < sigma_min <= sigma_max:
            raise ConfigError(
                f"process.sigma_min and sigma_max must satisfy 0 < sigma_min <= sigma_max, "
                f"got {sigma_min} and {sigma_max}"
            )
        if not 0 < noise_fraction < 1:
            raise ConfigError(f"process.noise_fraction must lie in (0, 1), got {noise_fraction}")
        if prior not in SOFT_PRIORS:
            raise ConfigError(f"process.prior must be one of {SOFT_PRIORS}, got {prior!r}")
        if prior_bank_size < 1:
            raise ConfigError(f"process.prior_bank_size must be at least 1, got {prior_bank_size}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.noise_fraction = float(noise_fraction)
        self.prior, self.prior_bank_size = prior, int(prior_bank_size)
        for name in ("levels", "prior_colour_mean", "prior_colour_chol", "prior_bank"):
            self.register_fitted(name)
        if levels is not None:
            self.set_levels(levels)

    def set_levels(self, levels: list[float]) -> None:
        """Store ``levels`` (at least 2 values) in the ``levels`` buffer, float64."""
        levels = [float(v) for v in levels]
        if len(levels) < 2:
            raise ConfigError(f"{self._levels_key} needs at least 2 values, got {levels}")
        self.levels = torch.tensor(levels, dtype=torch.float64)

    _levels_key = "process levels"

    @abc.abstractmethod
    def operator_at_level(self, level: torch.Tensor) -> LinearOperator:
        """C(level) for per-example levels (shape (B,))."""

    def level(self, t: torch.Tensor) -> torch.Tensor:
        """The corruption level at t (shape (B,)): ``levels[0]`` over the noise stage, then the
        linear interpolation of ``levels`` placed at equal t across (f, 1]."""
        if self.levels.numel() == 0:
            raise ConfigError(
                f"{type(self).__name__} has no {self._levels_key} yet: fit it to training data "
                "(process.fit, done at the start of training) or load a checkpoint of a fitted run"
            )
        levels = self.levels.to(device=t.device, dtype=torch.float64)
        k = len(levels)
        u = ((t.to(torch.float64) - self.noise_fraction) / (1 - self.noise_fraction)).clamp(0, 1)
        u = u * (k - 1)
        index = u.floor().long().clamp(max=k - 2)
        weight = u - index
        value = levels[index] * (1 - weight) + levels[index + 1] * weight
        return value.to(t.dtype if t.is_floating_point() else torch.get_default_dtype())

    def std(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t: sigma_min (sigma_max / sigma_min)^(t / f) for t <= f, sigma_max after."""
        stage = (t.to(torch.float64) / self.noise_fraction).clamp(0, 1)
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** stage
        return sigma.to(t.dtype if t.is_floating_point() else torch.get_default_dtype())

    def operator(self, t: torch.Tensor) -> LinearOperator:
        """C_t for per-example times t (shape (B,)); its ``apply(x)`` acts on each example with
        its own time (the process maps times to levels, the operator knows nothing of time)."""
        return self.operator_at_level(self.level(t))

    def level_times(self) -> torch.Tensor:
        """k / N for k = 1..N (increasing, in (0, 1])."""
        return torch.arange(1, self.num_steps + 1, dtype=torch.float32) / self.num_steps

    # ------------------------------------------------------------------------------- prior
    def fit(self, data: torch.Tensor) -> None:
        """Estimate the prior (class docstring) from training images ``data`` (N, C, H, W) in
        model range: both priors' buffers are filled, so a checkpoint can switch ``prior``."""
        if data.ndim < 3 or data.shape[0] < 1:
            raise ConfigError(f"process.fit needs a batch of images, got shape {tuple(data.shape)}")
        data = data.detach()
        colours = data.flatten(2).mean(2).to(torch.float64)  # (N, C): each image's mean colour
        mean = colours.mean(0)
        centred = colours - mean
        cov = centred.T @ centred / max(len(colours) - 1, 1)
        jitter = 1e-10 * (1 + cov.diagonal().mean())  # a single image or a constant colour
        chol = torch.linalg.cholesky(cov + jitter * torch.eye(len(mean), dtype=cov.dtype))
        self.prior_colour_mean = mean.to(data.dtype)
        self.prior_colour_chol = chol.to(data.dtype)
        g = torch.Generator().manual_seed(0)
        index = torch.randperm(len(data), generator=g)[: self.prior_bank_size]
        bank = data[index.to(data.device)]
        ones = torch.ones(len(bank), dtype=data.dtype, device=data.device)
        self.prior_bank = torch.cat(
            [self.mean(chunk, o) for chunk, o in zip(bank.split(256), ones.split(256))]
        )

    def prior_mean(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """A draw of C_1 x0 under the fitted prior (without the noise sigma_1 eta)."""
        if self.prior_colour_mean.numel() == 0:
            raise ConfigError(
                f"{type(self).__name__} has no prior yet: fit it to training data "
                "(process.fit, done at the start of training) or load a checkpoint of a fitted run"
            )
        stored = tuple(self.prior_bank.shape[1:])
        if tuple(shape[1:]) != stored:
            raise ConfigError(
                f"the prior was fitted to images of shape {stored}, asked for {tuple(shape[1:])}"
            )
        n = shape[0]
        if self.prior == "blurred_data":
            index = randint(len(self.prior_bank), (n,), generator, device)
            return self.prior_bank.to(device)[index]
        mean = self.prior_colour_mean.to(device)
        chol = self.prior_colour_chol.to(device)
        z = randn((n, len(mean)), generator, device, mean.dtype)
        colour = mean + z @ chol.T
        flat = colour.reshape(n, len(mean), *(1,) * (len(shape) - 2)).expand(shape)
        ones = torch.ones(n, dtype=mean.dtype, device=device)
        return self.mean(flat.contiguous(), ones)

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """x_1 = C_1 x0 + sigma_1 eta with C_1 x0 from the fitted prior (class docstring)."""
        mean = self.prior_mean(shape, generator, device)
        noise = randn(mean.shape, generator, device, mean.dtype)
        return mean + self.sigma_max * noise


class SoftBlurProcess(SoftCorruption):
    """Soft Diffusion with Gaussian blur: C_t = G(blur std b_t), zero padding, kernel half size
    ``kernel_half_size`` (Daras et al. App. D: 80 for CelebA-64, 32 for CIFAR-10; blur std
    from ``blur_min`` = 0.01, the identity, to ``blur_max`` = 23 for CelebA-64, 18 for CIFAR-10).

    The blur stds placed at equal t across the blur stage: ``blur_levels`` if given, else those
    of the ``blur_schedule`` settings (``schedules.soft.BlurScheduleSettings``, linear by
    default), from blur_min to blur_max. A data-free schedule (``linear``, ``geometric``) is set
    here; a data-driven one (``wasserstein``: the shortest Wasserstein path, sec. 3.3 and App.
    C; ``mse_matched``: App. F.1.2, eq. 45) by :meth:`fit`, from the training images in model
    range, into the fitted ``levels`` buffer: a checkpoint then samples with no data and no
    cache. Linear by default: below std 0.3 the sampled kernel is nearly the identity (at 0.3
    a neighbour tap weighs exp(-1 / (2 * 0.09)) = 0.4% of the centre), so geometric spacing
    from 0.01 would spend about 40% of the blur stage (14 of 32 levels to std 23) on blurs too
    small to see, while linear spacing gives equal t to equal increments of std, and with linear
    interpolation b_t exactly linear in t over the blur stage, whatever the number of levels.
    See :class:`SoftCorruption` for the noise, the stages, the conditioning and the prior.
    """

    _levels_key = "process.blur_levels"

    def __init__(
        self,
        num_steps: int = 1000,
        sigma_min: float = 0.01,
        sigma_max: float = 0.1,
        noise_fraction: float = 0.15,
        kernel_half_size: int = 80,
        blur_min: float = 0.01,
        blur_max: float = 23.0,
        blur_levels: list[float] | None = None,
        blur_schedule: BlurScheduleSettings | None = None,
        blur_method: str | None = None,
        prior: str = "mean_colour",
        prior_bank_size: int = 1024,
        conditioning: str | None = None,
    ) -> None:
        if not isinstance(blur_schedule, BlurScheduleSettings):  # a config block (a mapping)
            blur_schedule = BlurScheduleSettings.from_mapping(blur_schedule or {})
        if blur_levels is None and not 0 < blur_min <= blur_max:
            raise ConfigError(
                f"process.blur_min and blur_max must satisfy 0 < blur_min <= blur_max, "
                f"got {blur_min} and {blur_max}"
            )
        if blur_levels is not None and min(blur_levels, default=1.0) <= 0:
            raise ConfigError(f"process.blur_levels must be positive stds, got {blur_levels}")
        if blur_method not in (None, *BLUR_METHODS):
            raise ConfigError(
                f"process.blur_method must be one of {BLUR_METHODS} or null, got {blur_method!r}"
            )
        if kernel_half_size < 0:
            raise ConfigError(
                f"process.kernel_half_size must be non-negative, got {kernel_half_size}"
            )
        super().__init__(
            blur_levels, num_steps, sigma_min, sigma_max, noise_fraction, prior,
            prior_bank_size, conditioning,
        )  # fmt: skip
        self.kernel_half_size = int(kernel_half_size)
        self.blur_method = blur_method
        self.blur_min, self.blur_max = float(blur_min), float(blur_max)
        self.blur_schedule = blur_schedule
        self.levels_fixed = blur_levels is not None or not blur_schedule.needs_data
        if blur_levels is None and not blur_schedule.needs_data:
            self.set_levels(self.find_levels(None)[0].levels)

    def find_levels(
        self, data: torch.Tensor | None, progress: bool = False
    ) -> tuple[BlurSchedule, Path | None]:
        """The ``blur_schedule`` schedule for training images ``data`` (model range; None for a
        data-free method) and the file it was read from or cached in
        (``schedules.soft.fit_schedule``, with this process's blur, range and sigma_max)."""
        blur = partial(gaussian_blur, half_size=self.kernel_half_size, method=self.blur_method)
        return fit_schedule(
            self.blur_schedule, data, blur, blur_min=self.blur_min, blur_max=self.blur_max,
            sigma=self.sigma_max, progress=progress,
            blur_key={"kernel_half_size": self.kernel_half_size, "method": self.blur_method},
        )  # fmt: skip

    def fit(self, data: torch.Tensor) -> None:
        """The blur levels of a data-driven ``blur_schedule`` from the first
        ``blur_schedule.num_images`` of ``data`` (N, C, H, W; model range), then the prior
        (:meth:`SoftCorruption.fit`, whose bank is blurred with the last of them)."""
        if not self.levels_fixed:
            schedule, path = self.find_levels(data)
            self.set_levels(schedule.levels)
            log.info("blur schedule %s: %d levels (%s)", schedule.name, len(schedule.levels), path)
        super().fit(data)

    def blur_std(self, t: torch.Tensor) -> torch.Tensor:
        """b_t, the blur std at t (shape (B,))."""
        return self.level(t)

    def operator_at_level(self, level: torch.Tensor) -> LinearOperator:
        return GaussianBlur(level, self.kernel_half_size, self.blur_method)


class SoftMaskProcess(SoftCorruption):
    """Soft Diffusion with masking: C_t = the centred square window of observed pixels
    (``operators.CentredWindowMask``) whose side is the fraction r_t of the image side, from r = 1 (all
    observed, C = I) over the noise stage to ``mask_min`` (0: nothing observed) at t = 1.

    Why this geometry (Fig. 5 leaves it open; sec. 4: "as diffusion time t becomes smaller ...
    the observed region grows and the model predicts bigger windows"): the windows are nested
    (the region observed at t contains the one at t' > t), so each reverse step only reveals a
    ring of pixels, C_{t-dt} x0_hat - C_t x0_hat in the Momentum sampler (Alg. 2) is the new
    ring; the mask is a deterministic function of t as eq. 4 requires (a random mask per draw
    would not be a fixed operator C_t); and centred, because the data are centred (CelebA
    crops are aligned on the face), so the first pixels revealed are the most informative. With
    mask_min = 0 the prior is pure noise sigma_1 eta (C_1 = 0) whatever ``prior`` says.

    ``mask_levels``: the observed fractions placed at equal t across the mask stage; by default
    ``num_mask_levels`` values linear from 1 to ``mask_min`` (the side shrinks linearly in t,
    one pixel on each edge at a time). See :class:`SoftCorruption` for the rest.
    """

    _levels_key = "process.mask_levels"

    def __init__(
        self,
        num_steps: int = 1000,
        sigma_min: float = 0.01,
        sigma_max: float = 0.1,
        noise_fraction: float = 0.15,
        mask_min: float = 0.0,
        mask_levels: list[float] | None = None,
        num_mask_levels: int = 32,
        prior: str = "mean_colour",
        prior_bank_size: int = 1024,
        conditioning: str | None = None,
    ) -> None:
        if mask_levels is None:
            if not 0 <= mask_min <= 1:
                raise ConfigError(f"process.mask_min must lie in [0, 1], got {mask_min}")
            if num_mask_levels < 2:
                raise ConfigError(
                    f"process.num_mask_levels must be at least 2, got {num_mask_levels}"
                )
            mask_levels = torch.linspace(
                1.0, mask_min, num_mask_levels, dtype=torch.float64
            ).tolist()
        if not all(0 <= v <= 1 for v in mask_levels):
            raise ConfigError(f"process.mask_levels must lie in [0, 1], got {mask_levels}")
        super().__init__(
            mask_levels, num_steps, sigma_min, sigma_max, noise_fraction, prior,
            prior_bank_size, conditioning,
        )  # fmt: skip

    def observed_fraction(self, t: torch.Tensor) -> torch.Tensor:
        """r_t, the side of the observed window over the image side (shape (B,))."""
        return self.level(t)

    def operator_at_level(self, level: torch.Tensor) -> LinearOperator:
        return CentredWindowMask(level)
