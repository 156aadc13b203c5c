"""Linear operators on batches: the measurement A of a linear inverse problem (y = A x + n) and
the corruption C_t of Soft Diffusion (x_t = C_t x0 + sigma_t z: a blur, a mask, alpha(t) I).

A subclass gives ``apply``; the adjoint defaults to autograd (a vector-Jacobian product, valid
because the map is linear) and the per-example solve of (gamma A A^T + lam I) u = rhs to
conjugate gradients; subclasses with a closed form override them. Plain PyTorch, no Lightning.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.utils import append_dims


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    iters: int,
    tol: float = 1e-10,
) -> torch.Tensor:
    """Solve the symmetric positive definite systems matvec(u) = rhs, batched over rows."""
    u = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(1, keepdim=True)
    for _ in range(iters):
        ap = matvec(p)
        step = rs / (p * ap).sum(1, keepdim=True).clamp_min(1e-30)
        u, r = u + step * p, r - step * ap
        rs_new = (r * r).sum(1, keepdim=True)
        if float(rs_new.max()) < tol:
            break
        p = r + rs_new / rs.clamp_min(1e-30) * p
        rs = rs_new
    return u


class LinearOperator(abc.ABC):
    """A linear map A on batches: apply(x) -> A x (shape (B, ...)); adjoint(v, like) -> A^T v
    shaped like ``like``."""

    #: Iterations of the default (conjugate-gradient) :meth:`gram_solve`.
    cg_iters: int = 50

    @abc.abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A x for a batch x of shape (B, ...)."""

    def adjoint(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A^T v (v shaped like ``apply``'s output), shaped like ``like``: the vector-Jacobian
        product of ``apply`` at zeros_like(like), also inside ``no_grad`` / ``inference_mode``."""
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.zeros_like(like).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.apply(x), x, grad_outputs=v.detach().clone())
        return grad.detach()

    def gram_solve(
        self, rhs: torch.Tensor, like: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        """u with (gamma A A^T + lam I) u = rhs per example (rhs shaped like ``apply``'s output,
        gamma and lam of shape (B,)), by ``cg_iters`` conjugate-gradient iterations."""
        gamma, lam = append_dims(gamma.to(rhs), rhs.ndim), append_dims(lam.to(rhs), rhs.ndim)

        def matvec(u: torch.Tensor) -> torch.Tensor:
            u = u.reshape(rhs.shape)
            return (gamma * self.apply(self.adjoint(u, like)) + lam * u).flatten(1)

        return conjugate_gradient(matvec, rhs.flatten(1), self.cg_iters).reshape(rhs.shape)


@dataclass
class MatrixOperator(LinearOperator):
    """A (M, D) matrix acting on flattened x: apply gives (B, M); the solve is direct."""

    matrix: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.matrix.to(x).T

    def adjoint(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (v @ self.matrix.to(v)).reshape(like.shape)

    def gram_solve(
        self, rhs: torch.Tensor, like: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        """u with (gamma A A^T + lam I) u = rhs per example, by ``torch.linalg.solve``."""
        a = self.matrix.to(rhs)
        eye = torch.eye(a.shape[0], dtype=rhs.dtype, device=rhs.device)
        system = append_dims(gamma.to(rhs), 3) * (a @ a.T) + append_dims(lam.to(rhs), 3) * eye
        return torch.linalg.solve(system, rhs)


@dataclass
class FunctionOperator(LinearOperator):
    """A linear callable ``function(x) -> (B, ...)``; apply flattens its output to (B, M)."""

    function: Callable[[torch.Tensor], torch.Tensor]
    cg_iters: int = 50

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x).flatten(1)


@dataclass
class ScaleOperator(LinearOperator):
    """A x = scale x, ``scale`` a float or one per example (B,): C_t = alpha(t) I. Self-adjoint;
    the solve is a division."""

    scale: torch.Tensor | float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return append_dims(torch.as_tensor(self.scale).to(x), x.ndim) * x

    def adjoint(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.apply(v).reshape(like.shape)

    def gram_solve(
        self, rhs: torch.Tensor, like: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        """rhs / (gamma scale^2 + lam), per example."""
        scale = torch.as_tensor(self.scale).to(rhs)
        return rhs / append_dims(gamma.to(rhs) * scale**2 + lam.to(rhs), rhs.ndim)


# ------------------------------------------------------------------ Soft Diffusion's corruptions
#: How :class:`GaussianBlur` convolves by default: the fastest on the benchmark
#: ``experiments/blur_benchmark.py`` (64x64, half size 80, batch 128, 3 channels, float32, CPU:
#: separable 25 ms, FFT 75 ms (x3.0), grouped conv2d 134 ms (x5.4), median of 15, one thread;
#: ``experiments/results/blur_benchmark.json``). All give the same zero-padded result. Not
#: measured on a GPU, where the order may differ: pass ``method`` (``process.blur_method``).
DEFAULT_BLUR_METHOD = "separable"
BLUR_METHODS = ("separable", "separable_conv", "fft")


def gaussian_kernel1d(std: torch.Tensor, half_size: int) -> torch.Tensor:
    """The sampled Gaussian exp(-i^2 / (2 std^2)), i = -half_size..half_size, normalised to sum
    1: shape (B, 2 half_size + 1) for ``std`` of shape (B,).

    The sampled kernel is not the continuous one (Daras et al. sec. 3.3): for small std only
    the centre tap survives, so std = 0.01 (exp(-5000) = 0 at the neighbours) is the identity to
    float precision, as Soft Diffusion's t = 0 must be (C_0 = I, Daras et al. eq. 4).
    """
    offsets = torch.arange(-half_size, half_size + 1, dtype=std.dtype, device=std.device)
    logits = -(offsets[None, :] ** 2) / (2 * std[:, None] ** 2)
    return torch.softmax(logits, dim=1)  # exp(logits) / sum: the same, without underflow to 0/0


def _fft_size(minimum: int) -> int:
    """The smallest 2^a 3^b 5^c >= minimum (sizes the FFT handles fastest)."""
    size = minimum
    while True:
        rest = size
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return size
        size += 1


class GaussianBlur(LinearOperator):
    """C x: a per-example Gaussian blur with zero padding and 'same' output shape.

    ``std`` has shape (B,) (one blur per example: the operator C_t of a batch of times, see
    ``SoftBlurProcess.operator``); the kernel has a fixed half size h (support 2h + 1: 161 for
    CelebA-64, 65 for CIFAR-10, Daras et al. App. D and Fig. 6) and is the sampled Gaussian
    normalised to sum 1 over its 2h + 1 taps (:func:`gaussian_kernel1d`). Acts on (B, ..., H, W)
    images, each channel alike; the 2-D kernel is the outer product of the 1-D one with itself,
    so the blur is separable.

    Zero padding means y_i = sum_j k_{j-i} x_j over the pixels j of the image only: a pixel
    near the border loses the mass of the kernel that falls outside, so a blurred constant image
    is bright in the centre and dark at the corners, and G_a G_b is not G_c at the border (no
    semigroup). Taps further than n - 1 from the centre only ever meet padding, so the
    kernel is cropped to half size min(h, n - 1) after normalising: an exact saving that matters
    for h = 80 on 64x64 images, where the 161-tap kernel is larger than the image.

    ``method`` (all three give the same result, tests to 1e-12 in float64; the default is the
    fastest on the project's benchmark, ``DEFAULT_BLUR_METHOD``):

    - ``"separable"``: the 1-D zero-padded convolution along each axis written as its (n, n)
      banded Toeplitz matrix T_ij = k_{j-i}, applied by a batched matrix product: y = T_H x T_W^T;
    - ``"separable_conv"``: the same two 1-D convolutions as grouped ``conv2d`` calls (one group
      per example and channel, since every example has its own kernel);
    - ``"fft"``: each axis zero-padded before the FFT to a size L >= n + h' (the smallest
      2^a 3^b 5^c at least that), so that the circular convolution has no wrap-around on the
      'same' output: for output pixel i in [0, n) the taps reach i - h' .. i + h', and an index
      below 0 wraps to L - h' or beyond, which is padding exactly when L >= n + h'. (n + 2 h',
      the full linear-convolution length, is more than the 'same' output needs.)

    The matrix of a zero-padded 'same' convolution with a symmetric kernel is symmetric
    (C_ij = k_{j-i} = k_{i-j}), so the blur is self-adjoint; the tests check <C x, y> =
    <x, C y> and the autograd adjoint rather than assume it.
    """

    def __init__(
        self,
        std: torch.Tensor,
        half_size: int,
        method: str | None = None,
        cg_iters: int = 50,
    ) -> None:
        method = method or DEFAULT_BLUR_METHOD
        if method not in BLUR_METHODS:
            raise ConfigError(f"blur method must be one of {BLUR_METHODS}, got {method!r}")
        if half_size < 0:
            raise ConfigError(f"blur kernel half size must be non-negative, got {half_size}")
        self.std = torch.as_tensor(std)
        if self.std.ndim != 1:
            raise ValueError(f"blur std must have shape (B,), got {tuple(self.std.shape)}")
        self.half_size = int(half_size)
        self.method = method
        self.cg_iters = cg_iters

    def kernel(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """The normalised 1-D kernels (B, 2 h' + 1) cropped to h' = min(h, n - 1)."""
        full = gaussian_kernel1d(self.std.to(device=like.device, dtype=like.dtype), self.half_size)
        crop = self.half_size - min(self.half_size, n - 1)
        return full[:, crop : full.shape[1] - crop]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:
            raise ValueError(f"GaussianBlur acts on (B, ..., H, W) images, got {tuple(x.shape)}")
        if self.std.shape[0] != x.shape[0]:
            raise ValueError(
                f"blur std has {self.std.shape[0]} entries for a batch of {x.shape[0]}"
            )
        blur = {"separable": self._toeplitz, "separable_conv": self._conv, "fft": self._fft}
        return blur[self.method](x)

    def adjoint(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """C^T v = C v (a symmetric kernel with zero padding: a symmetric matrix)."""
        return self.apply(v.reshape(like.shape))

    def toeplitz(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """The (B, n, n) matrices T_ij = k_{j-i} of the 1-D zero-padded 'same' convolution."""
        k = self.kernel(n, like)
        half = (k.shape[1] - 1) // 2
        i = torch.arange(n, device=like.device)
        offsets = i[None, :] - i[:, None]  # j - i, within [-(n-1), n-1]
        inside = offsets.abs() <= half
        return k[:, (offsets.clamp(-half, half) + half)] * inside

    def _toeplitz(self, x: torch.Tensor) -> torch.Tensor:
        lead = (1,) * (x.ndim - 3)
        h, w = x.shape[-2:]
        t_h = self.toeplitz(h, x).reshape(-1, *lead, h, h)
        t_w = self.toeplitz(w, x).reshape(-1, *lead, w, w)
        return t_h @ x @ t_w.transpose(-1, -2)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        b, (h, w) = shape[0], shape[-2:]
        y = x.reshape(1, -1, h, w)  # every (example, channel) is its own group
        per_example = y.shape[1] // b
        for axis, n in ((-2, h), (-1, w)):
            k = self.kernel(n, x)
            half = (k.shape[1] - 1) // 2
            k = k.repeat_interleave(per_example, dim=0)[:, None, :]
            weight = k[..., :, None] if axis == -2 else k[..., None, :]
            padding = (half, 0) if axis == -2 else (0, half)
            y = torch.nn.functional.conv2d(y, weight, padding=padding, groups=y.shape[1])
        return y.reshape(shape)

    def _fft(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        spectra = []
        for n, transform in ((h, torch.fft.fft), (w, torch.fft.rfft)):
            k = self.kernel(n, x)
            half = (k.shape[1] - 1) // 2
            size = _fft_size(n + half)  # circular = linear convolution on [0, n): no wrap-around
            wrapped = torch.zeros(k.shape[0], size, dtype=x.dtype, device=x.device)
            wrapped[:, : half + 1] = k[:, half:]  # offsets 0..h' at 0..h'
            if half:
                wrapped[:, -half:] = k[:, :half]  # offsets -h'..-1 at the end
            spectra.append((transform(wrapped, dim=-1), size))
        (k_h, size_h), (k_w, size_w) = spectra
        lead = (1,) * (x.ndim - 3)
        spectrum = k_h.reshape(-1, *lead, size_h, 1) * k_w.reshape(-1, *lead, 1, k_w.shape[-1])
        y = torch.fft.irfft2(torch.fft.rfft2(x, s=(size_h, size_w)) * spectrum, s=(size_h, size_w))
        return y[..., :h, :w]


class Mask(LinearOperator):
    """C x = m * x: a per-example diagonal 0/1 mask (1 on the observed pixels).

    ``mask`` broadcasts against x (e.g. (B, 1, H, W): the same pixels observed in every
    channel). Diagonal, so self-adjoint, and idempotent (C C = C); the solve of
    (gamma C C^T + lam I) u = rhs is a division. :class:`CentredWindowMask` is Soft Diffusion's
    (Daras et al. sec. 4, Fig. 1 and 5).
    """

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    @classmethod
    def centred_window(cls, fraction: torch.Tensor, height: int, width: int) -> Mask:
        """Observed: a centred window whose side is the fraction ``fraction`` (shape (B,), in
        [0, 1]) of each image side, rounded down to keep it centred (a side of the parity of
        the image side, so it grows by one pixel on each edge at a time). 0 observes nothing,
        1 the whole image. Mask of shape (B, 1, height, width)."""
        fraction = torch.as_tensor(fraction)

        def axis(n: int) -> torch.Tensor:
            # Pixel i is inside a centred window of side s iff 2 |i - (n - 1) / 2| + 1 <= s.
            extent = (2 * (torch.arange(n, device=fraction.device) - (n - 1) / 2).abs() + 1) / n
            return extent[None, :] <= fraction.to(torch.float64)[:, None] + 1e-6  # float32 levels

        inside = axis(height)[:, :, None] & axis(width)[:, None, :]
        dtype = fraction.dtype if fraction.is_floating_point() else torch.get_default_dtype()
        return cls(inside[:, None].to(dtype))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x)

    def adjoint(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.apply(v.reshape(like.shape))

    def gram_solve(
        self, rhs: torch.Tensor, like: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        """rhs / (gamma m + lam) (m^2 = m), per example."""
        gamma, lam = append_dims(gamma.to(rhs), rhs.ndim), append_dims(lam.to(rhs), rhs.ndim)
        return rhs / (gamma * self.mask.to(rhs) + lam)


class CentredWindowMask(Mask):
    """:meth:`Mask.centred_window` of per-example ``fraction`` (B,), built for the height and
    width of the images it is applied to (so that ``process.operator(t)`` needs no image size)."""

    def __init__(self, fraction: torch.Tensor) -> None:
        super().__init__(torch.empty(0))
        self.fraction = torch.as_tensor(fraction)

    def window(self, like: torch.Tensor) -> Mask:
        """The mask for images shaped like ``like`` (B, ..., H, W)."""
        fraction = self.fraction.to(device=like.device)
        window = Mask.centred_window(fraction, like.shape[-2], like.shape[-1]).mask
        return Mask(window.reshape(len(window), *(1,) * (like.ndim - 3), *like.shape[-2:]))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.window(x).apply(x)

    def adjoint(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.window(like).adjoint(v, like)

    def gram_solve(
        self, rhs: torch.Tensor, like: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        return self.window(like).gram_solve(rhs, like, gamma, lam)
