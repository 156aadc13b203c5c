"""Test-local Soft Diffusion pieces: a dense Gaussian-blur corruption on small images and the exact
clean-image estimate of a Gaussian q_0 under it.

Independent of the project's blur operator (built in parallel): C_t is an explicit (D, D) matrix,
the Kronecker product of two 1-D zero-padded Gaussian-blur matrices of std b(t), so every
quantity below is plain dense linear algebra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffusion_lab.operators import LinearOperator
from diffusion_lab.processes.corruption import LinearCorruption


def blur_matrix_1d(n: int, std: float, dtype=torch.float64) -> torch.Tensor:
    """(n, n) zero-padded Gaussian blur: B[i, j] = k(i - j), k normalised over |d| <= n - 1.

    std <= 0 (or so small that the taps underflow) is the identity."""
    if std <= 0:
        return torch.eye(n, dtype=dtype)
    d = torch.arange(-(n - 1), n, dtype=torch.float64)
    k = torch.exp(-(d**2) / (2 * std**2))
    k = k / k.sum()
    i = torch.arange(n)
    return k[(i[:, None] - i[None, :]) + (n - 1)].to(dtype)


def blur_matrix_2d(side: int, std: float, dtype=torch.float64) -> torch.Tensor:
    """(side^2, side^2) separable blur acting on row-major flattened side x side images."""
    b = blur_matrix_1d(side, std, dtype)
    return torch.kron(b, b)


@dataclass
class BatchMatrixOperator(LinearOperator):
    """Per-example matrices acting on flattened x, reshaped back to x's shape: example b gets
    ``matrices[index[b]]`` ((K, D, D) distinct matrices, ``index`` of shape (B,))."""

    matrices: torch.Tensor
    index: torch.Tensor

    def _act(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        flat = x.flatten(1)
        out = torch.empty_like(flat)
        for k, m in enumerate(self.matrices.to(x)):
            rows = self.index == k
            out[rows] = flat[rows] @ (m if transpose else m.T)
        return out.reshape(x.shape)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._act(x, transpose=False)

    def adjoint(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._act(v, transpose=True).reshape(like.shape)


class DenseBlurProcess(LinearCorruption):
    """x_t = C_t x_0 + sigma_t z on (1, side, side) images, with the soft process's two stages.

    sigma grows geometrically from ``sigma_min`` at t = 0 to ``sigma_max`` at ``noise_end`` with
    no blur, then stays there while the blur std grows linearly from 0 to ``blur_max`` at t = 1
    (Daras et al. sec. 4, App. D). ``constant_sigma`` keeps sigma = sigma_max at every t (a
    process that is all blur stage). Levels are t = i/N, i = 1..N (t = 0 is not one, but
    sigma(0) = sigma_min > 0). The prior is the exact q_1 when ``mu`` and ``cov`` are given
    (N(C_1 mu, C_1 Sigma C_1^T + sigma_1^2 I)), else C_1 0 + sigma_1 z.
    """

    provides = frozenset(
        {"linear_mean", "noisy_at_zero"}
    )  # sigma(0) = sigma_min > 0, as the soft process

    def __init__(
        self,
        side: int = 8,
        num_steps: int = 160,
        sigma_min: float = 0.01,
        sigma_max: float = 0.1,
        noise_end: float = 0.2,
        blur_max: float = 3.0,
        constant_sigma: bool = False,
        mu: torch.Tensor | None = None,
        cov: torch.Tensor | None = None,
    ) -> None:
        super().__init__(num_steps)
        self.side, self.dim = side, side * side
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.noise_end, self.blur_max = noise_end, blur_max
        self.constant_sigma = constant_sigma
        self.mu, self.cov = mu, cov

    def blur_std(self, t: float) -> float:
        return self.blur_max * max(0.0, (t - self.noise_end) / (1 - self.noise_end))

    def matrix(self, t: float) -> torch.Tensor:
        return blur_matrix_2d(self.side, self.blur_std(t))

    def operator(self, t: torch.Tensor) -> BatchMatrixOperator:
        values, inverse = torch.unique(t.detach().double().cpu(), return_inverse=True)
        mats = torch.stack([self.matrix(float(v)) for v in values])
        return BatchMatrixOperator(mats, inverse.to(t.device))

    def std(self, t: torch.Tensor) -> torch.Tensor:
        if self.constant_sigma:
            return torch.full_like(t, self.sigma_max)
        ratio = math.log(self.sigma_max / self.sigma_min)
        grow = self.sigma_min * torch.exp(ratio * (t / self.noise_end).clamp(max=1.0))
        return grow

    def level_times(self) -> torch.Tensor:
        return torch.arange(1, self.num_steps + 1, dtype=torch.float64) / self.num_steps

    def marginal_cov(self, t: float) -> torch.Tensor:
        c = self.matrix(t)
        sigma = float(self.std(torch.tensor([t], dtype=torch.float64))[0])
        return c @ self.cov @ c.T + sigma**2 * torch.eye(self.dim, dtype=torch.float64)

    def prior_sampling(self, shape, generator=None, device="cpu"):
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        one = torch.ones(1, dtype=torch.float64)
        if self.mu is None:
            return (
                self.mean(torch.zeros(shape, dtype=torch.float64), one.expand(shape[0]))
                + float(self.std(one)[0]) * z
            )
        mean = self.matrix(1.0) @ self.mu
        chol = torch.linalg.cholesky(self.marginal_cov(1.0))
        return (mean + z.flatten(1) @ chol.T).reshape(shape)


class GaussianOracle:
    """The exact E[x_0 | x_t] of q_0 = N(mu, Sigma) under a linear corruption with matrices:

    E[x_0 | x_t] = mu + Sigma C^T (C Sigma C^T + sigma^2 I)^{-1} (x_t - C mu); calling it gives
    the exact score -(C Sigma C^T + sigma^2 I)^{-1} (x_t - C mu), which is eq. 8 of the former.
    ``matrix(t)`` (a float) gives C_t as a dense (D, D) matrix.
    """

    def __init__(self, process, mu: torch.Tensor, cov: torch.Tensor, matrix=None) -> None:
        self.process, self.mu, self.cov = process, mu, cov
        self.matrix = matrix or process.matrix

    def _parts(self, x: torch.Tensor, t: torch.Tensor):
        if not bool((t == t[0]).all()):
            raise ValueError("the oracle takes one time per batch")
        c = self.matrix(float(t[0])).to(x)
        sigma = float(self.process.std(t[:1].double())[0])
        gram = c @ self.cov.to(x) @ c.T + sigma**2 * torch.eye(len(c), dtype=x.dtype)
        u = torch.linalg.solve(gram, (x.flatten(1) - c @ self.mu.to(x)).T).T  # (B, D)
        return c, u

    def denoised(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c, u = self._parts(x, t)
        return (self.mu.to(x) + u @ (c @ self.cov.to(x))).reshape(x.shape)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, u = self._parts(x, t)
        return (-u).reshape(x.shape)


def smooth_gaussian(side: int = 8, seed: int = 0, scale: float = 0.05, floor: float = 2e-3):
    """A smooth random mean in about [0.2, 0.8] and a smooth random covariance (per-pixel
    variance about ``scale``, smallest eigenvalue ``floor``)."""
    g = torch.Generator().manual_seed(seed)
    dim = side * side
    smooth = blur_matrix_2d(side, 1.0)
    mu = 0.5 + 0.3 * torch.tanh(3 * smooth @ torch.randn(dim, generator=g, dtype=torch.float64))
    a = smooth @ torch.randn(dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.T
    cov = scale * cov / cov.diagonal().mean() + floor * torch.eye(dim, dtype=torch.float64)
    return mu, cov
