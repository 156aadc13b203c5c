"""Building blocks of NCSN++ / DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through
SDEs", App. H) that :mod:`diffusion_lab.networks.layers` does not already have.

* :func:`upfirdn2d`: upsample (zero insertion), pad, FIR-filter, downsample (StyleGAN2's op), in
  plain PyTorch as one depthwise convolution with the normalised outer product of a 1-D kernel.
* :func:`fir_upsample_2d` / :func:`fir_downsample_2d`: anti-aliased 2x resampling with the
  [1, 3, 3, 1] kernel (Zhang 2019; Karras et al. 2020), App. H.1 "anti-aliasing"; the padding is
  that of Score SDE's ``up_or_down_sampling.upsample_2d`` / ``downsample_2d``.
* :class:`ConvDownsample`: a 3x3 stride-2 conv, FIR-blurred first when ``fir`` (Score SDE's
  ``layerspp.Downsample(with_conv=True)``, fused ``conv_downsample_2d``).
* :class:`ResnetBlockBigGAN`: BigGAN's residual block with the resampling inside the block
  (``layerspp.ResnetBlockBigGANpp``), skip connection rescaled by 1/sqrt(2).
* :class:`RescaledAttention`: :class:`~diffusion_lab.networks.layers.AttentionBlock` with its
  residual sum rescaled by 1/sqrt(2) (``layerspp.AttnBlockpp(skip_rescale=True)``).

Border handling is zero padding, as in Score SDE: a constant image stays constant away from the
border and the total mass of an image that vanishes near the border is preserved exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.networks.layers import (
    AttentionBlock,
    NetworkConfigError,
    conv3x3,
    group_norm,
    zero_module,
)
from diffusion_lab.utils import append_dims

SKIP_SCALE = 1.0 / math.sqrt(2.0)


def fir_kernel_2d(kernel: Sequence[float]) -> torch.Tensor:
    """The 2-D FIR kernel: outer product of the 1-D ``kernel`` with itself, normalised to sum 1."""
    try:
        values = [float(v) for v in kernel]
    except (TypeError, ValueError):
        values = []
    if not values or not sum(values) > 0:  # checked in Python: also under torch.device("meta")
        raise NetworkConfigError(
            f"fir_kernel must be a non-empty 1-D list with a positive sum, got {kernel}"
        )
    k = torch.tensor(values, dtype=torch.float32)
    k2 = torch.outer(k, k)
    return k2 / k2.sum()


def upfirdn2d(
    x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with ``kernel`` (2-D), keep every ``down``-th pixel.

    The same on both axes: ``pad = (before, after)`` (negative values crop). Output size per axis:
    ``(H * up + before + after - kh) // down + 1``. The kernel is flipped (true convolution), as in
    StyleGAN2's ``upfirdn2d_native``; for the symmetric kernels used here that changes nothing.
    """
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = torch.flip(kernel, (0, 1)).to(x)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def fir_upsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Anti-aliased upsampling by ``factor`` (Score SDE ``upsample_2d``): (H, W) -> (fH, fW).

    ``kernel`` is a normalised 2-D kernel (:func:`fir_kernel_2d`); it is scaled by ``factor**2`` so
    that zero insertion does not darken the image.
    """
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel * factor**2, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def fir_downsample_2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Anti-aliased downsampling by ``factor`` (Score SDE ``downsample_2d``): (H, W) -> (H/f, W/f)."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling (the ``fir=False`` path of DDPM++)."""
    return F.interpolate(x, scale_factor=float(factor), mode="nearest")


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Average pooling over ``factor x factor`` blocks (the ``fir=False`` path of DDPM++)."""
    return F.avg_pool2d(x, factor, stride=factor)


class ConvDownsample(nn.Module):
    """Halve H and W with a 3x3 stride-2 conv from ``in_ch`` to ``out_ch`` channels.

    ``fir=True``: FIR blur first, padded so that the conv needs no padding (Score SDE
    ``conv_downsample_2d``); ``fir=False``: pad one row and column at the end, then the conv.
    """

    def __init__(
        self, in_ch: int, out_ch: int, fir: bool, fir_kernel: Sequence[float] = (1, 3, 3, 1)
    ) -> None:
        super().__init__()
        self.fir = fir
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=2, padding=0)
        self.register_buffer("kernel", fir_kernel_2d(fir_kernel), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            p = (self.kernel.shape[0] - 2) + (self.conv.kernel_size[0] - 1)
            x = upfirdn2d(x, self.kernel, pad=((p + 1) // 2, p // 2))
        else:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class ResnetBlockBigGAN(nn.Module):
    """BigGAN residual block of NCSN++ (Score SDE App. H.1; ``layerspp.ResnetBlockBigGANpp``).

    ``h = conv1(dropout(SiLU(norm2(conv0(resample(SiLU(norm1(x)))) + dense(SiLU(temb))))))``,
    ``skip = conv1x1(resample(x))`` when the channels change or the block resamples (else ``x``),
    output ``(skip + h) / sqrt(2)`` when ``skip_rescale`` (else ``skip + h``). ``resample`` is
    ``"up"``, ``"down"`` or ``None``, anti-aliased (FIR) when ``fir``, else nearest / average pool.
    ``conv1`` starts at zero (Score SDE's ``init_scale=0.``).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None,
        temb_dim: int,
        dropout: float = 0.1,
        resample: str | None = None,
        fir: bool = True,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
        skip_rescale: bool = True,
    ) -> None:
        super().__init__()
        if resample not in (None, "up", "down"):
            raise NetworkConfigError(f"resample must be None, 'up' or 'down', got {resample!r}")
        out_ch = in_ch if out_ch is None else out_ch
        self.resample, self.fir, self.skip_rescale = resample, fir, skip_rescale
        self.register_buffer("kernel", fir_kernel_2d(fir_kernel), persistent=False)
        self.norm1 = group_norm(in_ch)
        self.conv0 = conv3x3(in_ch, out_ch)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = zero_module(conv3x3(out_ch, out_ch))
        needs_proj = in_ch != out_ch or resample is not None
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if needs_proj else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return fir_upsample_2d(x, self.kernel) if self.fir else naive_upsample_2d(x)
        if self.resample == "down":
            return fir_downsample_2d(x, self.kernel) if self.fir else naive_downsample_2d(x)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self._resample(F.silu(self.norm1(x))))
        h = h + append_dims(self.temb_proj(F.silu(temb)), h.ndim)
        h = self.conv1(self.dropout(F.silu(self.norm2(h))))
        out = self.skip(self._resample(x)) + h
        return out * SKIP_SCALE if self.skip_rescale else out


class RescaledAttention(AttentionBlock):
    """DDPM self-attention whose residual sum ``x + attn(x)`` is divided by sqrt(2) when
    ``skip_rescale`` (Score SDE ``AttnBlockpp``); the output projection starts at zero."""

    def __init__(self, channels: int, skip_rescale: bool = True) -> None:
        super().__init__(channels)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        return out * SKIP_SCALE if self.skip_rescale else out
