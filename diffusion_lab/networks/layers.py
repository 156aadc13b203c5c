"""Building blocks shared by the project's networks (DDPM U-Net, MLP, and later NCSN++ / RefineNet).

References: Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM), App. B and the
authors' ``diffusion_tf/models/unet.py``; Song et al. 2021, "Score-Based Generative Modeling through
SDEs" (Score SDE), App. H.1 (Gaussian Fourier features of log sigma for VE models).

Initialisation: the last conv of every residual block, the attention output projection and a network's
output layer are initialised to exactly zero. DDPM does the same up to round-off (``init_scale=0.``,
i.e. variance scaling with scale 1e-10); exact zeros make the untrained network output exactly zero,
so each block starts as the identity. Gradients still reach every parameter after the first step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.errors import ConfigError
from diffusion_lab.utils import append_dims

EMBEDDINGS = ("sinusoidal", "fourier", "fourier_time", "linear_time")
#: Embeddings of Fourier features, whose width networks double (sin and cos of ch frequencies).
FOURIER_EMBEDDINGS = ("fourier", "fourier_time")


class NetworkConfigError(ConfigError, ValueError):
    """A network hyper-parameter out of range (a ``ValueError`` that ``run.py`` prints on one line)."""


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it (DDPM's ``init_scale=0.``)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def embedding_precision(dtype: torch.dtype) -> torch.dtype:
    """The dtype an embedding computes in: float64 for a float64 network, float32 for any other.
    sin(t * freq) at DDPM's t up to 999 is noise in bfloat16 (8 bits of mantissa: t itself is
    off by up to 2), so a bfloat16 network embeds in float32 and casts the result."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, precision: torch.dtype = torch.float32
) -> torch.Tensor:
    """DDPM's sinusoidal embedding (tensor2tensor ``get_timestep_embedding``), shape (B, dim),
    computed in ``precision``.

    half = dim // 2, freqs = exp(-log(10000) * arange(half) / (half - 1)), output [sin, cos] of
    ``timesteps * freqs``, zero-padded by one column when ``dim`` is odd.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(timesteps.shape)}")
    half = dim // 2
    if half < 2:
        raise NetworkConfigError(f"sinusoidal embedding dim must be >= 4, got {dim}")
    exponent = torch.arange(half, dtype=precision, device=timesteps.device) / (half - 1)
    freqs = torch.exp(-math.log(10000.0) * exponent)
    args = timesteps.to(precision)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class _FixedEmbedding(nn.Module):
    """An embedding without trained weights that computes in :func:`embedding_precision` and
    returns the network's dtype: that of an empty buffer, which ``.to()`` and Lightning's
    precision plugins (``bf16-true``, ``64-true``) convert with the weights (not saved)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("dtype_anchor", torch.empty(0), persistent=False)

    @property
    def precision(self) -> torch.dtype:
        return embedding_precision(self.dtype_anchor.dtype)


class SinusoidalEmbedding(_FixedEmbedding):
    """Module form of :func:`timestep_embedding`: (B,) labels -> (B, dim); no parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        timestep_embedding(torch.zeros(1), dim)  # validates dim
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim, self.precision).to(self.dtype_anchor.dtype)


class GaussianFourierEmbedding(_FixedEmbedding):
    """Random Fourier features [sin(2 pi W x), cos(2 pi W x)], W ~ N(0, scale^2) fixed (Score SDE).

    Embeds its input as given; (B,) -> (B, dim). W is a buffer: saved with the weights, never trained.
    ``dim`` must be even.
    """

    def __init__(self, dim: int, scale: float = 16.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise NetworkConfigError(f"Fourier embedding dim must be even and >= 2, got {dim}")
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.precision
        args = 2 * math.pi * x.to(p)[:, None] * self.freqs.to(p)[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1).to(self.dtype_anchor.dtype)


class LogSigmaFourierEmbedding(GaussianFourierEmbedding):
    """Fourier features of log(sigma), as Score SDE's NCSN++ does for VE models: input is sigma > 0."""

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.log(sigma.to(self.precision).clamp_min(1e-20)))


class LinearEmbedding(nn.Module):
    """A learned affine map of the label, (B,) -> (B, dim): the FP score embedding paper's
    "linear time embedding" (Na et al. sec. 4), for networks conditioned on t itself
    (``process.conditioning=time``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise NetworkConfigError(f"linear embedding dim must be >= 1, got {dim}")
        self.linear = nn.Linear(1, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear(t.to(self.linear.weight.dtype)[:, None])


def noise_embedding(kind: str, dim: int) -> nn.Module:
    """The noise-label embedding named by ``kind``: (B,) -> (B, dim).

    ``"sinusoidal"``: the label is a DDPM timestep index (float in [0, 1000]).
    ``"fourier"``: the label is a VE noise level sigma; its log is embedded with Fourier features.
    ``"fourier_time"``: Fourier features of the label itself (t in [0, 1] with
    ``conditioning=time``: Soft Diffusion's networks, whose sigma is constant while the blur grows).
    ``"linear_time"``: a learned affine map of the label (t in [0, 1] with ``conditioning=time``).
    """
    if kind == "sinusoidal":
        return SinusoidalEmbedding(dim)
    if kind == "fourier":
        return LogSigmaFourierEmbedding(dim)
    if kind == "fourier_time":
        return GaussianFourierEmbedding(dim)
    if kind == "linear_time":
        return LinearEmbedding(dim)
    raise NetworkConfigError(f"embedding must be one of {EMBEDDINGS}, got {kind!r}")


def num_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """Groups for GroupNorm: the largest divisor of ``channels`` that is <= min(32, channels // 4).

    Gives DDPM's 32 groups for 128+ channels and still works for small channel counts (>= 1 group).
    """
    target = max(1, min(max_groups, channels // min_group_size))
    return next(g for g in range(target, 0, -1) if channels % g == 0)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with :func:`num_groups` groups (DDPM uses 32 groups everywhere)."""
    return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)


def conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    """3x3 convolution with 'same' padding."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (DDPM ``downsample(with_conv=True)``).

    Padded by one row and one column at the end (bottom, right), none at the start: TF's
    ``padding='SAME'`` at stride 2 on an even size, as in DDPM's ``diffusion_tf/nn.py`` conv2d,
    diffusers' ``Downsample2D(padding=0)`` and Score SDE's ``layers.Downsample``. Symmetric
    padding by 1 shifts every downsampled map by one pixel against weights trained so (with
    diffusers' weights copied in, outputs 0.65 off where they reach 1.3). On an odd size the
    output is floor(H / 2), as diffusers'. Takes (and ignores) ``temb`` so that a U-Net can call
    all its blocks alike.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv (DDPM ``upsample``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """DDPM residual block: norm-SiLU-conv, + projected time embedding, norm-SiLU-dropout-conv (zero).

    The skip path is a 1x1 conv ("nin_shortcut") when the channel count changes.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(conv3x3(out_ch, out_ch))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + append_dims(self.temb_proj(F.silu(temb)), h.ndim)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (DDPM ``attn_block``).

    q, k, v and the output projection are 1x1 convs; the output projection starts at zero.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v, one head
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))
