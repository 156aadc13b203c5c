"""A small noise-conditional MLP for 2-D toy data (Gaussian mixtures, rings, moons, checkerboard)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.networks.layers import NetworkConfigError, noise_embedding, zero_module


class MLP(nn.Module):
    """``forward(x, noise_label)`` with x of shape (B, dim) -> (B, out_dim), out_dim = dim by
    default (a tensor shaped like x).

    The output is agnostic (epsilon, score or denoiser: the method decides; ``out_dim=1`` for an
    energy). The noise label (B,)
    is embedded as in the U-Net (``"sinusoidal"``: DDPM timestep in [0, 1000]; ``"fourier"``:
    Fourier features of log sigma), passed through Linear-SiLU, and added to the pre-activation of
    every one of the ``depth`` hidden layers (additive modulation, like the U-Net's residual blocks).
    Activations are SiLU; the output layer starts at zero, so the untrained network outputs zeros.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 4,
        embed_dim: int = 64,
        embedding: str = "sinusoidal",
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1 or (out_dim is not None and out_dim < 1):
            raise NetworkConfigError(
                f"dim, hidden, depth, out_dim must be >= 1, got {dim}, {hidden}, {depth}, {out_dim}"
            )
        self.dim = int(dim)
        self.embed = nn.Sequential(
            noise_embedding(embedding, embed_dim), nn.Linear(embed_dim, hidden)
        )
        self.layers = nn.ModuleList(
            nn.Linear(dim if i == 0 else hidden, hidden) for i in range(depth)
        )
        self.temb_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = zero_module(nn.Linear(hidden, dim if out_dim is None else out_dim))

    def forward(self, x: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP built for (B, {self.dim}) inputs, got {tuple(x.shape)}")
        temb = F.silu(self.embed(noise_label))
        h = x
        for layer, proj in zip(self.layers, self.temb_proj, strict=True):
            h = F.silu(layer(h) + proj(temb))
        return self.out(h)
