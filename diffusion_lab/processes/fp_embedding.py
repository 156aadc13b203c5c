"""FP score embedding (Na, Gao, Wan 2024, sec. 3.4): a process whose mean is a precomputed table.

Before training, each training image x^0 is embedded once (:meth:`FPEmbeddingProcess.fit`): the
log-density Fokker-Planck equation of the base SDE is solved on the image's pixel grid and its
score transports the image forward in time (eq. 21 with the velocity of eq. 3;
:mod:`diffusion_lab.processes.fokker_planck`), giving x^n at t_n = n / N, n = 0..N. Training
perturbs the embedded image with the base SDE's noise level, x_t = x^n + lambda(t) z with
lambda(t) = sigma(t) of the base SDE (the paper leaves lambda open; the base's sigma makes the
"no embedding" limit the base SDE's own DSM, ``losses.score_embedding``). Between grid times the
table is interpolated linearly.

Reverse time uses the base SDE's drift and diffusion with the learned score (eq. 4; the paper
samples with the probability-flow ODE): the process provides ``sde`` and ``probability_flow``,
which the predictor-corrector and probability-flow samplers need, and not ``gaussian_sde``,
since its mean is not alpha(t) x0.

Several images: each has its own table. ``separate_intervals`` gives image k its own time
interval, as the paper does for CelebA generation (sec. 4.4): the network's time label is k + t.
Which image an example is comes with it, as an index (a training example's label, see
``data.few``; sample b is image b mod K): the table is read and the label formed from that
index (:meth:`table_at`, :meth:`perturb`, :meth:`noise_label`, :class:`ImageScoreModel`), never
by matching x^0 against the images. The solver works on images in [0, 1] (its
KDE's Scott bandwidth does not depend on the data's spread, so the range is fixed there):
``value_range`` is the model range the images arrive in, mapped to [0, 1] for the solver and the
table mapped back. ``embedding: zero_score`` is the study's control: the same table with
grad m = 0 (x^n = x^{n-1} + dt f(x^{n-1}), so for VE the image stays put) and no PDE solve.

The embedding of each image is cached on disk (``<cache>/fp_embeddings/``, keyed by the image,
the base SDE's coefficients on the grid and the solver settings) and kept in checkpoints, with
the seconds it took to compute (``precompute_seconds``): a run that reuses a cached embedding
still counts them in its training time (``callbacks.time_to_target``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffusion_lab.cache import cache_dir
from diffusion_lab.errors import ConfigError
from diffusion_lab.processes import fokker_planck
from diffusion_lab.processes.sde import HAS_SDE, PROBABILITY_FLOW, SDE
from diffusion_lab.score_model import ScoreModel
from diffusion_lab.utils import append_dims

log = logging.getLogger("diffusion_lab")

EMBEDDINGS = ("fokker_planck", "zero_score")
PRIORS = ("base", "embedded")
CACHE_FORMAT = 1


class FPEmbeddingProcess(SDE):
    """x_t = x^n(x_0) + sigma_base(t) z, x^n the FP score embedding of x_0 (Na et al. eq. 21).

    ``base``: the SDE whose f and g enter the FP equation and whose sigma perturbs the table.
    ``num_steps``: N, the PDE's time steps on [0, 1] (the table has N + 1 entries).
    ``tol``, ``max_iterations``, ``stencil``, ``iteration``, ``velocity``: the solver's (see
    :func:`fokker_planck.solve_embedding`). ``prior``: sampling starts from the base SDE's prior
    (``base``: unconditional, as the paper's single-image runs) or from x^N_k + sigma(1) z of the
    embedded images in turn (``embedded``: the paper's conditional multi-image denoising).
    """

    def __init__(
        self,
        base: SDE,
        num_steps: int = 10,
        embedding: str = "fokker_planck",
        tol: float = 1e-6,
        max_iterations: int = 100,
        stencil: str = "derived",
        iteration: str = "per_step",
        velocity: str = "previous",
        separate_intervals: bool = False,
        prior: str = "base",
        value_range: Sequence[float] = (0.0, 1.0),
        cache: bool = True,
    ) -> None:
        super().__init__(num_steps, conditioning="time")
        if not isinstance(base, SDE):
            raise ConfigError("process.base must be an SDE (VE, VP or sub-VP)")
        if embedding not in EMBEDDINGS:
            raise ConfigError(f"process.embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        if prior not in PRIORS:
            raise ConfigError(f"process.prior must be one of {PRIORS}, got {prior!r}")
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ConfigError(f"process.value_range must be increasing, got {value_range}")
        self.base = base
        # Not gaussian_sde: the mean is the table x^n(x0), not alpha(t) x0, so the samplers
        # whose clean-image estimate inverts alpha(t) (DDIM, DPM-Solver++, EDM, ancestral) do
        # not apply; the reverse SDE and the probability flow (eq. 4) do.
        self.provides = frozenset({HAS_SDE, PROBABILITY_FLOW})
        self.embedding = embedding
        self.solver_options = {
            "tol": tol,
            "max_iterations": max_iterations,
            "stencil": stencil,
            "iteration": iteration,
            "velocity": velocity,
        }
        self.separate_intervals = separate_intervals
        self.prior = prior
        self.value_range = (lo, hi)
        self.cache = cache
        self.register_fitted("images")  # (K, C, H, W): x^0, in the order of their index
        self.register_fitted("table")  # (K, N + 1, C, H, W): x^n in model range
        self.register_fitted("precompute_seconds")  # scalar: the embedding's compute time

    # ------------------------------------------------------------------ the base SDE
    def marginal_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.marginal_coefficients(t)

    def marginal_rates(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.marginal_rates(t)

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.sde(x, t)

    def probability_flow_velocity(
        self, model: Any, x: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """f - g^2 s / 2 (the reverse SDE of eq. 4 without its noise) from the score: the marginals are not Gaussian, so
        the base's alpha' x0 + sigma' eps form does not hold."""
        return self.reverse(model, probability_flow=True).sde(x, t)[0]

    def prior_std(self) -> float:
        return self.base.prior_std()

    def level_times(self) -> torch.Tensor:
        """The table's times t_n = n / N, n = 1..N (Alg. 2 visits these)."""
        return torch.arange(1, self.num_steps + 1, dtype=torch.float32) / self.num_steps

    # ------------------------------------------------------------------ the table
    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def mean(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Not a function of x0 alone: the mean is the table of the example's image, read by
        its index (:meth:`table_at`)."""
        raise ConfigError(
            "the FP embedding's mean is a per-image table read by each example's image index "
            "(process.table_at(index, t)): train it with method=fp_embedding, which reads the "
            "index from the batch"
        )

    def table_at(self, index: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The table of images ``index`` (B,) at times t (B,), interpolated linearly."""
        position = t.double().clamp(0, 1) * self.num_steps
        lower = position.floor().long().clamp(max=self.num_steps - 1)
        frac = append_dims((position - lower).to(self.table.dtype), self.table.ndim - 1)
        rows = self.table[index]
        arange = torch.arange(len(index), device=index.device)
        return (1 - frac) * rows[arange, lower] + frac * rows[arange, lower + 1]

    def perturb(self, index: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = x^n + lambda(t) z for examples of images ``index`` (B,), lambda = sigma of the
        base SDE (eq. 24's input)."""
        return self.table_at(index, t) + append_dims(self.std(t), noise.ndim) * noise

    def marginal_prob(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(x0, t), self.std(t)

    # ------------------------------------------------------------------ labels
    def noise_label(self, t: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """The network's label at times t (B,) for examples of images ``index`` (B,): t, or with
        ``separate_intervals`` index + t (sec. 4.4). Without ``index``, example b is sample b,
        image b mod K (:meth:`sample_images`), as in :meth:`prior_sampling`."""
        if not self.separate_intervals:
            return t
        if index is None:
            index = self.sample_images(len(t)).to(t.device)
        return t + index.to(t)

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """The base SDE's prior, or (``prior: embedded``) x^N of the images in turn plus
        sigma(1) z."""
        noise = self.base.prior_sampling(shape, generator=generator, device=device)
        if self.prior == "base":
            return noise
        index = self.sample_images(shape[0]).to(device)
        ones = torch.ones(shape[0], device=device)
        return self.table_at(index, ones) + noise / self.base.prior_std() * self.std(ones)[0]

    def sample_images(self, num_samples: int) -> torch.Tensor:
        """Which image sample b belongs to: b mod K."""
        return torch.arange(num_samples) % max(self.num_images, 1)

    # ------------------------------------------------------------------ the precomputation
    def fit(self, data: torch.Tensor) -> None:
        """Embed each distinct training image (at most a few: the method is per image)."""
        images = distinct_in_order(data.detach().cpu().double())
        if len(images) > 64:
            raise ConfigError(
                f"the FP embedding is computed per image and the training set holds {len(images)} "
                "distinct images: use a few images (data=single_image, an image folder, or "
                "data=few_images)"
            )
        lo, hi = self.value_range
        tables, seconds = [], 0.0
        for image in images:
            table, took = self.embed((image - lo) / (hi - lo))
            tables.append(torch.from_numpy(table) * (hi - lo) + lo)
            seconds += took
        self.images = images.to(self.images.device, torch.float32)
        self.table = torch.stack(tables).to(self.images.device, torch.float32)
        self.precompute_seconds = torch.tensor(seconds)
        log.info(
            "FP embedding of %d image(s) %s: %.2f s (counted in the training time)",
            len(images), tuple(images.shape[1:]), seconds,
        )  # fmt: skip

    def grid(self) -> np.ndarray:
        return np.arange(self.num_steps + 1) / self.num_steps

    def embed(self, image: torch.Tensor) -> tuple[np.ndarray, float]:
        """(N + 1, C, H, W) table of one image in [0, 1] and the seconds it took to compute,
        from the disk cache when the same image and settings were embedded before."""
        array = image.numpy().astype(np.float64)
        path = cache_dir() / "fp_embeddings" / f"{self.cache_key(array)}.pt"
        if self.cache and path.is_file():
            saved = torch.load(path, weights_only=True)
            return saved["table"].numpy(), float(saved["seconds"])
        start = time.perf_counter()
        drift, diffusion = fokker_planck.sde_coefficients(self.base)
        if self.embedding == "zero_score":
            table = zero_score_table(array, drift, self.grid())
            stats = {}
        else:
            solution = fokker_planck.solve_embedding(
                array, drift, diffusion, num_steps=self.num_steps, **self.solver_options
            )
            table = solution.x
            stats = {
                "iterations": [int(i) for i in solution.iterations],
                "solver_seconds": {k: float(v) for k, v in solution.seconds.items()},
            }
        seconds = time.perf_counter() - start
        if stats:
            log.info("FP solve: iterations per step %s", stats["iterations"])
        if self.cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"table": torch.from_numpy(table), "seconds": seconds, **stats}, path)
        return table, seconds

    def cache_key(self, image: np.ndarray) -> str:
        """Hash of the image, the base SDE's coefficients on the grid and the settings."""
        t = torch.from_numpy(self.grid()).float()
        alpha, sigma = self.base.marginal_coefficients(t)
        g = self.base.sde(torch.zeros(len(t), 1), t)[1]
        settings = {
            "format": CACHE_FORMAT,
            "base": type(self.base).__name__,
            "coefficients": [alpha.tolist(), sigma.tolist(), g.tolist()],
            "num_steps": self.num_steps,
            "embedding": self.embedding,
            **self.solver_options,
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
        return digest.hexdigest()[:20]


class ImageScoreModel(ScoreModel):
    """``model``'s network for examples of the embedded images ``index`` (B,): its label is
    :meth:`FPEmbeddingProcess.noise_label` of those images (index + t with
    ``separate_intervals``, sec. 4.4), the network and parameterisation are ``model``'s."""

    def __init__(self, model: ScoreModel, index: torch.Tensor) -> None:
        if not isinstance(model.process, FPEmbeddingProcess):
            raise ConfigError("an image score model needs process=fp_embedding")
        super().__init__(model.network, model.process, model.parameterization)
        self.index = index

    def label(self, t: torch.Tensor) -> torch.Tensor:
        if self._per_level:
            return super().label(t)
        return self.process.noise_label(t, self.index)


def distinct_in_order(data: torch.Tensor) -> torch.Tensor:
    """The distinct rows of ``data`` in the order of their first occurrence (dataset order, so
    that sample b, which belongs to image b mod K, pairs with the K-th reference image)."""
    _, inverse = torch.unique(data, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(data), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(data)), reduce="amin")
    return data[first.sort().values]


def zero_score_table(
    image: np.ndarray, drift: fokker_planck.DriftFn, times: np.ndarray
) -> np.ndarray:
    """The control's table: eq. 21 with grad m = 0, x^n = x^{n-1} + dt f(x^{n-1}, t_{n-1})."""
    table = [image]
    zero = np.zeros_like(image)
    for t_prev, t_next in zip(times[:-1], times[1:]):
        drift_prev = drift(table[-1], float(t_prev))
        table.append(
            fokker_planck.transport_step(table[-1], drift_prev, 0.0, zero, t_next - t_prev)
        )
    return np.stack(table)
