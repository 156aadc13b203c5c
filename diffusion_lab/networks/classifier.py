"""A time-dependent (noisy) classifier p_t(y | x(t)) for class-conditional sampling.

Khungurn sec. 7.4.1; Song et al. 2021 sec. 5 and App. I.1 (a Wide ResNet with random Fourier
time features there). Here: the encoder half of the project's DDPM U-Net (the same residual
blocks, downsampling and noise-label embedding, ``networks/layers.py``), then GroupNorm-SiLU,
global average pooling and a linear head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.networks.layers import (
    Downsample,
    NetworkConfigError,
    ResBlock,
    conv3x3,
    group_norm,
    noise_embedding,
)


class NoisyClassifier(nn.Module):
    """``forward(x, noise_label)`` with x of shape (B, C, H, W) -> class logits (B, num_classes).

    The noise label is the process's (``process.noise_label(t)``): a DDPM step index in [0, 1000]
    for ``embedding="sinusoidal"``, sigma for ``"fourier"``, as for the U-Net it pairs with.

    Args:
        in_channels: image channels C.
        image_size: H = W of the inputs (any size; the head pools globally).
        num_classes: number of classes.
        base_channels: channels at the first level; the time embedding has 4x as many.
        channel_mult: per-level multiplier of ``base_channels``, a 2x downsampling between levels.
        num_res_blocks: residual blocks per level.
        dropout: dropout inside the residual blocks.
        embedding: ``"sinusoidal"`` or ``"fourier"`` (see ``layers.noise_embedding``).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int = 10,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        dropout: float = 0.0,
        embedding: str = "sinusoidal",
    ) -> None:
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        if in_channels < 1 or base_channels < 1 or num_classes < 2 or num_res_blocks < 1:
            raise NetworkConfigError(
                "in_channels, base_channels, num_res_blocks must be >= 1 and num_classes >= 2"
            )
        if not channel_mult or min(channel_mult) < 1:
            raise NetworkConfigError(f"channel_mult must be non-empty and >= 1, got {channel_mult}")
        if image_size < 2 ** (len(channel_mult) - 1):
            raise NetworkConfigError(
                f"image_size {image_size} is too small for {len(channel_mult)} levels"
            )
        self.image_size = int(image_size)
        ch, temb_dim = base_channels, 4 * base_channels
        self.embed = noise_embedding(embedding, ch)
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = conv3x3(in_channels, ch)
        blocks: list[nn.Module] = []
        cur = ch
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cur, ch * mult, temb_dim, dropout))
                cur = ch * mult
            if level != len(channel_mult) - 1:
                blocks.append(Downsample(cur))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = group_norm(cur)
        self.head = nn.Linear(cur, num_classes)

    def forward(self, x: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"NoisyClassifier takes (B, C, H, W) inputs, got {tuple(x.shape)}")
        temb = self.temb(self.embed(noise_label))
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(-2, -1)))
