"""NCSN's RefineNet score network (Song & Ermon 2019, App. A; Khungurn sec. 5.3) and NCSNv2's
unconditional variant (Song & Ermon 2020, Technique 3; Khungurn sec. 6.3).

A U-Net of pre-activation residual blocks, one stage per entry of ``channel_mult``, followed by
a cascade of RefineNet blocks (Lin et al. 2017) from the deepest stage back up:

- normalisation: instance norm++ everywhere (:mod:`diffusion_lab.networks.normalization`),
  conditional on the noise level (CIN++) for NCSN, unconditional for NCSNv2;
- activation: ELU;
- subsampling: only stages whose dilation is 1 subsample (conv, then 2x2 mean pooling, in their
  first block); the others keep the resolution and use dilated 3x3 convolutions instead, the
  dilation doubling from one such stage to the next (1, 1, 2, 4 in the 32x32 models);
- refine blocks: residual conv units (RCU), multi-resolution fusion (MSF: norm, conv, bilinear
  upsampling, sum) and chained residual pooling (CRP) with 5x5 average pooling instead of max
  pooling, a norm before every convolution and pooling.

Noise conditioning (NCSN, ``conditional=True``): the network gets sigma (shape (B,)), as every
network here, and maps it to the index of the nearest level (in log sigma) of the fixed table
``sigma_schedule(schedule, sigma_max, sigma_min, num_levels)``, index 0 = sigma_1 (the labels of
the authors' code); the conv stack then uses that level's (gamma, beta, alpha) in every CIN++.
NCSN is defined on its L levels only; between levels the nearest one is used. The presets take
the table from the process config (``${process.*}``), so it always matches the training levels.
Output: the score s(x, sigma_i) itself (``parameterization: score``).

NCSNv2 (``conditional=False``): the same stack with unconditional instance norm++, ignoring the
noise label; its output is s(x), and ``ScoreModel(parameterization="score_over_sigma")`` divides
it by sigma (Technique 3).

Inputs in [0, 1] are mapped to [-1, 1] first (``center_input``, as the authors' code does when
neither logit transform nor rescaling is set). The 32x32 models: ``ngf=128,
channel_mult=(1, 2, 2, 2), dilations=(1, 1, 2, 4)``; NCSN used ``ngf=64`` for MNIST (28x28).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.networks.layers import NetworkConfigError
from diffusion_lab.networks.normalization import InstanceNormPlusPlus
from diffusion_lab.schedules import sigma_schedule

Level = torch.Tensor | None


def conv3x3(in_ch: int, out_ch: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    """3x3 convolution, 'same' padding for any dilation."""
    return nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=bias)


class ConvMeanPool(nn.Module):
    """Convolution ('same' padding), then 2x2 mean pooling (the authors' ``ConvMeanPool``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(x), 2)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: norm-ELU-conv, norm-ELU-conv, plus a shortcut.

    ``down``: the block starts a new stage; without dilation it halves H and W (the second conv
    and the shortcut are ``ConvMeanPool``), with dilation > 1 it keeps the size (dilated convs).
    """

    def __init__(
        self, in_ch: int, out_ch: int, num_classes: int | None, down: bool, dilation: int
    ) -> None:
        super().__init__()
        subsample = down and dilation == 1
        mid = in_ch if down else out_ch
        self.norm1 = InstanceNormPlusPlus(in_ch, num_classes)
        self.conv1 = conv3x3(in_ch, mid, dilation)
        self.norm2 = InstanceNormPlusPlus(mid, num_classes)
        self.conv2 = ConvMeanPool(mid, out_ch, 3) if subsample else conv3x3(mid, out_ch, dilation)
        if subsample:
            self.shortcut: nn.Module = ConvMeanPool(in_ch, out_ch, 1)
        elif in_ch != out_ch or down:
            self.shortcut = (
                conv3x3(in_ch, out_ch, dilation) if dilation > 1 else nn.Conv2d(in_ch, out_ch, 1)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor, y: Level) -> torch.Tensor:
        h = self.conv1(F.elu(self.norm1(x, y)))
        h = self.conv2(F.elu(self.norm2(h, y)))
        return h + self.shortcut(x)


class NormConv(nn.Module):
    """Instance norm++, optionally ELU, then a 3x3 convolution: the unit RCU, CRP and MSF repeat."""

    def __init__(
        self, in_ch: int, out_ch: int, num_classes: int | None, act: bool, bias: bool = False
    ) -> None:
        super().__init__()
        self.norm = InstanceNormPlusPlus(in_ch, num_classes)
        self.act = act
        self.conv = conv3x3(in_ch, out_ch, bias=bias)

    def forward(self, x: torch.Tensor, y: Level, pool: bool = False) -> torch.Tensor:
        h = self.norm(x, y)
        h = F.elu(h) if self.act else h
        h = F.avg_pool2d(h, 5, stride=1, padding=2) if pool else h
        return self.conv(h)


class RCU(nn.Module):
    """Residual conv units: ``n_blocks`` x (``n_stages`` x norm-ELU-conv + identity)."""

    def __init__(self, features: int, n_blocks: int, n_stages: int, num_classes: int | None):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                NormConv(features, features, num_classes, act=True) for _ in range(n_stages)
            )
            for _ in range(n_blocks)
        )

    def forward(self, x: torch.Tensor, y: Level) -> torch.Tensor:
        for block in self.blocks:
            h = x
            for unit in block:
                h = unit(h, y)
            x = x + h
        return x


class CRP(nn.Module):
    """Chained residual pooling: ELU, then ``n_stages`` x (norm, 5x5 mean pool, conv) summed in."""

    def __init__(self, features: int, n_stages: int, num_classes: int | None) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            NormConv(features, features, num_classes, act=False) for _ in range(n_stages)
        )

    def forward(self, x: torch.Tensor, y: Level) -> torch.Tensor:
        x = F.elu(x)
        path = x
        for stage in self.stages:
            path = stage(path, y, pool=True)
            x = x + path
        return x


class RefineBlock(nn.Module):
    """RCU on each input, multi-resolution fusion to ``features`` at the finest input's size, CRP,
    then an output RCU (three blocks in the last refine block, one elsewhere)."""

    def __init__(
        self, in_planes: Sequence[int], features: int, num_classes: int | None, end: bool
    ) -> None:
        super().__init__()
        self.adapt = nn.ModuleList(RCU(c, 2, 2, num_classes) for c in in_planes)
        fuse = len(in_planes) > 1 or in_planes[0] != features
        self.fuse = (
            nn.ModuleList(
                NormConv(c, features, num_classes, act=False, bias=True) for c in in_planes
            )
            if fuse
            else None
        )
        self.crp = CRP(features, 2, num_classes)
        self.output = RCU(features, 3 if end else 1, 2, num_classes)

    def forward(self, xs: Sequence[torch.Tensor], y: Level, size: torch.Size) -> torch.Tensor:
        hs = [adapt(x, y) for adapt, x in zip(self.adapt, xs, strict=True)]
        if self.fuse is None:
            h = hs[0]
        else:
            h = sum(
                F.interpolate(unit(x, y), size=size, mode="bilinear", align_corners=True)
                for unit, x in zip(self.fuse, hs, strict=True)
            )
        return self.output(self.crp(h, y), y)


class RefineNet(nn.Module):
    """NCSN / NCSNv2 RefineNet: ``forward(x, noise_label)`` -> a tensor shaped like x.

    Output: the score s(x, sigma) with ``conditional=True`` (NCSN, ``parameterization: score``);
    s(x), to be divided by sigma, with ``conditional=False`` (NCSNv2, ``score_over_sigma``).
    ``noise_label``: sigma, shape (B,).

    Args:
        in_channels: image channels C.
        ngf: channels of the first stage.
        channel_mult: per-stage multiplier of ``ngf``; one stage per entry.
        dilations: per-stage dilation; 1 = subsample at the stage's start (not the first stage),
            > 1 = keep the size and dilate. Same length as ``channel_mult``.
        num_res_blocks: residual blocks per stage (2 in both papers).
        conditional: CIN++ on the nearest level index (NCSN) or unconditional norm++ (NCSNv2).
        num_levels, sigma_max, sigma_min, schedule: the level table for ``conditional``.
        center_input: map inputs from [0, 1] to [-1, 1] first.
    """

    def __init__(
        self,
        in_channels: int,
        ngf: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 2, 4),
        num_res_blocks: int = 2,
        conditional: bool = True,
        num_levels: int | None = None,
        sigma_max: float | None = None,
        sigma_min: float | None = None,
        schedule: str = "geometric",
        center_input: bool = True,
    ) -> None:
        super().__init__()
        if len(channel_mult) != len(dilations) or not channel_mult:
            raise NetworkConfigError("channel_mult and dilations need the same, non-zero length")
        if dilations[0] != 1 or min(dilations) < 1 or ngf < 1 or num_res_blocks < 1:
            raise NetworkConfigError(
                "need dilations >= 1 (the first 1), ngf >= 1, num_res_blocks >= 1"
            )
        num_classes = None
        if conditional:
            if num_levels is None or sigma_max is None or sigma_min is None:
                raise NetworkConfigError(
                    "a conditional RefineNet needs num_levels, sigma_max, sigma_min"
                )
            table = sigma_schedule(schedule, sigma_max, sigma_min, num_levels)
            self.register_buffer("log_sigmas", table.log().float(), persistent=False)
            num_classes = num_levels
        self.conditional = conditional
        self.center_input = center_input
        channels = [ngf * m for m in channel_mult]
        self.begin_conv = conv3x3(in_channels, ngf)
        self.stages = nn.ModuleList()
        previous = ngf
        for i, (ch, dilation) in enumerate(zip(channels, dilations, strict=True)):
            blocks = [ResidualBlock(previous, ch, num_classes, down=i > 0, dilation=dilation)]
            blocks += [
                ResidualBlock(ch, ch, num_classes, down=False, dilation=dilation)
                for _ in range(num_res_blocks - 1)
            ]
            self.stages.append(nn.ModuleList(blocks))
            previous = ch
        self.refines = nn.ModuleList()
        for i in reversed(range(len(channels))):  # deepest first; the deeper refine output joins
            in_planes = [channels[i]] if i == len(channels) - 1 else [channels[i], channels[i]]
            features = channels[max(i - 1, 0)]
            self.refines.append(RefineBlock(in_planes, features, num_classes, end=i == 0))
        self.out_norm = InstanceNormPlusPlus(ngf, num_classes)
        self.end_conv = conv3x3(ngf, in_channels)

    def level_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the nearest level (in log sigma) of the table; 0 is sigma_1 = sigma_max."""
        log_sigma = sigma.float().clamp_min(1e-20).log()
        return (log_sigma[:, None] - self.log_sigmas[None, :]).abs().argmin(dim=1)

    def forward(self, x: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:
        y = self.level_index(noise_label) if self.conditional else None
        h = self.begin_conv(2 * x - 1 if self.center_input else x)
        skips = []
        for stage in self.stages:
            for block in stage:
                h = block(h, y)
            skips.append(h)
        ref = None
        for refine, skip in zip(self.refines, reversed(skips), strict=True):
            inputs = [skip] if ref is None else [skip, ref]
            ref = refine(inputs, y, skip.shape[-2:])
        return self.end_conv(F.elu(self.out_norm(ref, y)))
