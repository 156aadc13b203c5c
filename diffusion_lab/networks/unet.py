"""The DDPM U-Net (Ho, Jain, Abbeel 2020, App. B; the authors' ``diffusion_tf/models/unet.py``).

A PixelCNN++-style U-Net of wide residual blocks, ``num_res_blocks`` per resolution, single-head
self-attention at the resolutions in ``attn_resolutions`` and always in the middle (res-attn-res),
GroupNorm, and the noise label injected into every residual block through a two-layer MLP of its
embedding. With ``base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
attn_resolutions=(16,)`` it is the paper's 35.7M-parameter CIFAR-10 model.

Image sizes that ``2 ** (len(channel_mult) - 1)`` does not divide (28 for MNIST with four levels)
are reflect-padded on all sides to the next multiple and the output is cropped back; attention
resolutions refer to the padded feature maps (28 with four levels runs at 32, 16, 8, 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.networks.layers import (
    AttentionBlock,
    Downsample,
    NetworkConfigError,
    ResBlock,
    Upsample,
    conv3x3,
    group_norm,
    noise_embedding,
    zero_module,
)


class _ResAttn(nn.Module):
    """A residual block, followed by self-attention when ``attn`` is true."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, attn: bool) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, temb_dim, dropout)
        self.attn = AttentionBlock(out_ch) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, temb))


def class_rows(classes: torch.Tensor | None, num_classes: int, x: torch.Tensor) -> torch.Tensor:
    """The class embedding's row of each example: its class, or ``num_classes`` ("no class")
    for class -1 or when no classes are given."""
    if classes is None:
        return torch.full((x.shape[0],), num_classes, dtype=torch.long, device=x.device)
    classes = classes.long()
    return torch.where(classes < 0, num_classes, classes)


def _padded_size(image_size: int, levels: int) -> int:
    """The smallest size >= ``image_size`` that ``levels - 1`` halvings divide exactly."""
    factor = 2 ** (levels - 1)
    return -(-image_size // factor) * factor


class UNet(nn.Module):
    """DDPM U-Net: ``forward(x, noise_label)`` -> a tensor shaped like x (with ``out_channels``).

    The output is agnostic: the method trains it as epsilon (DDPM) or as a score / denoiser.
    ``noise_label`` has shape (B,): a DDPM timestep index as a float in [0, 1000] for
    ``embedding="sinusoidal"``, or a noise level sigma > 0 for ``embedding="fourier"`` (Fourier
    features of log sigma, Score SDE App. H.1).

    Args:
        in_channels: image channels C.
        image_size: H = W of the inputs (8, 16, 28, 32, 64, ...).
        base_channels: channels at the first level ("ch"); the time embedding has 4x as many.
        channel_mult: per-level multiplier of ``base_channels``; one level per entry, each but the
            last followed by a 2x downsampling.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: feature-map sizes at which self-attention follows each residual block.
        dropout: dropout rate inside the residual blocks (0.1 in DDPM's CIFAR-10 model).
        embedding: ``"sinusoidal"`` (DDPM), ``"fourier"`` (VE models) or ``"linear_time"`` (t itself).
        out_channels: output channels; defaults to ``in_channels``.
        num_classes: 0 (unconditional), or K: a learned embedding of the class, added to the
            time embedding (Ho & Salimans 2022), with one more row for "no class" (class -1,
            or no ``classes`` given), which classifier-free guidance trains by label dropout.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        embedding: str = "sinusoidal",
        out_channels: int | None = None,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 0:
            raise NetworkConfigError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        channel_mult = tuple(int(m) for m in channel_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        out_channels = in_channels if out_channels is None else int(out_channels)
        self._validate(
            in_channels, image_size, base_channels, channel_mult, num_res_blocks, dropout
        )
        self.image_size = int(image_size)
        self.padded_size = _padded_size(self.image_size, len(channel_mult))
        resolutions = [self.padded_size // 2**i for i in range(len(channel_mult))]
        unreachable = sorted(set(attn_resolutions) - set(resolutions))
        if unreachable:
            raise NetworkConfigError(
                f"attn_resolutions {list(unreachable)} are not reached: with image_size "
                f"{image_size} and {len(channel_mult)} levels the feature maps are {resolutions}"
            )

        ch, temb_dim = base_channels, 4 * base_channels
        self.embed = noise_embedding(embedding, ch)
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.num_classes = num_classes
        if num_classes:  # the last row is "no class"
            self.class_embed = nn.Embedding(num_classes + 1, temb_dim)
        self.conv_in = conv3x3(in_channels, ch)

        self.down = nn.ModuleList()
        skips, cur = [ch], ch
        for level, (mult, res) in enumerate(zip(channel_mult, resolutions, strict=True)):
            for _ in range(num_res_blocks):
                self.down.append(
                    _ResAttn(cur, ch * mult, temb_dim, dropout, res in attn_resolutions)
                )
                cur = ch * mult
                skips.append(cur)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)

        self.mid = nn.ModuleList(
            [_ResAttn(cur, cur, temb_dim, dropout, True), ResBlock(cur, cur, temb_dim, dropout)]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            mult, res = channel_mult[level], resolutions[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(
                    _ResAttn(
                        cur + skips.pop(), ch * mult, temb_dim, dropout, res in attn_resolutions
                    )
                )
                cur = ch * mult
            if level != 0:
                self.up.append(Upsample(cur))

        self.norm_out = group_norm(cur)
        self.conv_out = zero_module(conv3x3(cur, out_channels))

    @staticmethod
    def _validate(
        in_channels: int,
        image_size: int,
        base_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        dropout: float,
    ) -> None:
        """Raise :class:`NetworkConfigError` (a ``ValueError``) naming the first bad argument."""
        if in_channels < 1 or base_channels < 1:
            raise NetworkConfigError("in_channels and base_channels must be >= 1")
        if not channel_mult or min(channel_mult) < 1:
            raise NetworkConfigError(f"channel_mult must be non-empty and >= 1, got {channel_mult}")
        if num_res_blocks < 1:
            raise NetworkConfigError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if not 0.0 <= dropout < 1.0:
            raise NetworkConfigError(f"dropout must be in [0, 1), got {dropout}")
        if image_size < 2 ** (len(channel_mult) - 1):
            raise NetworkConfigError(
                f"image_size {image_size} is too small for {len(channel_mult)} levels "
                f"(channel_mult {list(channel_mult)}): need >= {2 ** (len(channel_mult) - 1)}"
            )

    def forward(
        self, x: torch.Tensor, noise_label: torch.Tensor, classes: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"UNet built for (B, C, {self.image_size}, {self.image_size}) inputs, got "
                f"{tuple(x.shape)}"
            )
        temb = self.temb(self.embed(noise_label))
        if self.num_classes:
            temb = temb + self.class_embed(class_rows(classes, self.num_classes, x))
        elif classes is not None:
            raise ValueError("classes given to an unconditional UNet: set network.num_classes")
        pad = self.padded_size - self.image_size
        lo, hi = pad // 2, pad - pad // 2
        h = F.pad(x, (lo, hi, lo, hi), mode="reflect") if pad else x

        hs = [self.conv_in(h)]
        for block in self.down:
            hs.append(block(hs[-1], temb))
        h = hs[-1]
        for block in self.mid:
            h = block(h, temb)
        for block in self.up:
            h = (
                block(h)
                if isinstance(block, Upsample)
                else block(torch.cat([h, hs.pop()], 1), temb)
            )
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h[..., lo : lo + self.image_size, lo : lo + self.image_size]
