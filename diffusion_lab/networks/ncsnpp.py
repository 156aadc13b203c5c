"""NCSN++ and DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs", App. H).

One class, :class:`NCSNpp`, a faithful subset of Score SDE's ``models/ncsnpp.py``:

* BigGAN-type residual blocks (``resblock_type="biggan"``) that up- or downsample inside the
  block, ``num_res_blocks`` per level on the way down and one more on the way up, DDPM-style
  single-head self-attention after every residual block at ``attn_resolutions`` on the way down,
  once per level on the way up, and always in the middle (res-attn-res);
* every residual and attention skip connection rescaled by 1/sqrt(2) (``skip_rescale``);
* anti-aliased FIR resampling with the [1, 3, 3, 1] kernel (``fir``), or nearest / average-pool
  resampling when ``fir=False`` (DDPM++);
* Gaussian Fourier features of log sigma (``embedding="fourier"``, scale 16, 2 * ch features)
  for VE models, DDPM's sinusoidal embedding of the step index (``"sinusoidal"``, Score SDE's
  ``"positional"``, ch features) for VP models, followed by the two-layer MLP to 4 * ch;
* the input pyramid of ``progressive_input="residual"`` (the image is downsampled alongside the
  features by 3x3 stride-2 convs, FIR-blurred when ``fir``, and added to them, rescaled by
  1/sqrt(2)), of ``"input_skip"`` (the image itself is resampled, FIR or average pool, and a 1x1
  conv of it added to each downsampled feature map: ``progressive_combine="sum"``), or
  ``"none"``;
* the output pyramid of ``progressive="output_skip"`` (at every level GroupNorm, SiLU and a 3x3
  conv to the image channels, summed with the upsampled sum of the coarser levels: the finest
  level's sum is the output), or ``"none"`` (one GroupNorm-SiLU-conv head at the end);
* initialisation as Score SDE: every conv and dense layer ``variance_scaling(1, fan_avg,
  uniform)`` (= Xavier uniform) with zero biases, and ``init_scale=0.`` layers (the last conv of
  each residual block, the attention output projection, the output conv) exactly zero, so that the
  untrained network outputs zero; gradients still reach every parameter (see the tests).

Not implemented (Score SDE options): ``resblock_type="ddpm"``, ``progressive="residual"``,
``progressive_combine="cat"``, ``conditional=False``, ``conv_size`` other than 3. Two things Score SDE does inside the network are
left to the method: ``scale_by_sigma`` (NCSN++ VE divides the output by sigma) and mapping
uncentred [0, 1] data to [-1, 1]. The output is therefore raw: the method decides whether it is a
score, a scaled score or noise.

With ``base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,)``
it is the paper's CIFAR-10 NCSN++ (62,758,787 trainable parameters for 3 channels, with fir, the
Fourier embedding and the residual input pyramid; Score SDE's code counts 128 more, its fixed
Fourier weights, a buffer here) and, with DDPM++'s settings, DDPM++ (61,804,419).

Image sizes that ``2 ** (len(channel_mult) - 1)`` does not divide are reflect-padded and cropped
back, as in :class:`~diffusion_lab.networks.unet.UNet`.

diffusers' ``UNet2DModel`` with Skip blocks (its port of NCSN++, e.g. google/ncsnpp-celebahq-256)
is this class with ``progressive="output_skip", progressive_input="input_skip"``; its weights
convert one to one (:mod:`diffusion_lab.networks.ncsnpp_from_diffusers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.networks.layers import (
    FOURIER_EMBEDDINGS,
    NetworkConfigError,
    conv3x3,
    group_norm,
    noise_embedding,
    zero_module,
)
from diffusion_lab.networks.ncsnpp_layers import (
    SKIP_SCALE,
    ConvDownsample,
    RescaledAttention,
    ResnetBlockBigGAN,
    fir_downsample_2d,
    fir_kernel_2d,
    fir_upsample_2d,
    naive_downsample_2d,
    naive_upsample_2d,
)
from diffusion_lab.networks.unet import UNet, _padded_size

RESBLOCKS = ("biggan",)
PROGRESSIVE_INPUTS = ("none", "residual", "input_skip")
PROGRESSIVE_OUTPUTS = ("none", "output_skip")


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ U-Net: ``forward(x, noise_label)`` -> a tensor shaped like x (raw output).

    ``noise_label`` has shape (B,): the noise level sigma > 0 for ``embedding="fourier"`` (VE,
    NCSN++), or the DDPM step index as a float in [0, 1000] for ``"sinusoidal"`` (VP, DDPM++).
    DDPM++ is this class with ``embedding="sinusoidal", fir=False, progressive_input="none"``.

    Args:
        in_channels: image channels C.
        image_size: H = W of the inputs.
        base_channels: channels at the first level ("nf"); the time embedding has 4x as many.
        channel_mult: per-level multiplier of ``base_channels``; each level but the last ends with
            a downsampling residual block.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: feature-map sizes (of the padded input) with self-attention.
        dropout: dropout rate in the residual blocks (0.1 in Score SDE's CIFAR-10 models).
        embedding: ``"fourier"`` (VE), ``"sinusoidal"`` (VP) or, for networks conditioned on t
            itself, ``"fourier_time"`` / ``"linear_time"``.
        fir: anti-aliased FIR resampling (NCSN++) instead of nearest / average pooling (DDPM++).
        fir_kernel: the 1-D FIR kernel; its normalised outer product is used.
        skip_rescale: divide every residual sum by sqrt(2).
        resblock: only ``"biggan"`` (resampling inside residual blocks).
        progressive_input: ``"residual"`` (input pyramid added to the features),
            ``"input_skip"`` (1x1 convs of the resampled image added) or ``"none"``.
        progressive: ``"output_skip"`` (an output head per level, summed upwards) or ``"none"``.
        out_channels: output channels; defaults to ``in_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        embedding: str = "fourier",
        fir: bool = True,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        resblock: str = "biggan",
        progressive_input: str = "residual",
        out_channels: int | None = None,
        progressive: str = "none",
    ) -> None:
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        fir_kernel = tuple(float(k) for k in fir_kernel)
        out_channels = in_channels if out_channels is None else int(out_channels)
        UNet._validate(
            in_channels, image_size, base_channels, channel_mult, num_res_blocks, dropout
        )
        if resblock not in RESBLOCKS:
            raise NetworkConfigError(f"resblock must be one of {RESBLOCKS}, got {resblock!r}")
        if progressive_input not in PROGRESSIVE_INPUTS:
            raise NetworkConfigError(
                f"progressive_input must be one of {PROGRESSIVE_INPUTS}, got {progressive_input!r}"
            )
        if progressive not in PROGRESSIVE_OUTPUTS:
            raise NetworkConfigError(
                f"progressive must be one of {PROGRESSIVE_OUTPUTS}, got {progressive!r}"
            )
        self.image_size = int(image_size)
        self.padded_size = _padded_size(self.image_size, len(channel_mult))
        resolutions = [self.padded_size // 2**i for i in range(len(channel_mult))]
        unreachable = sorted(set(attn_resolutions) - set(resolutions))
        if unreachable:
            raise NetworkConfigError(
                f"attn_resolutions {unreachable} are not reached: with image_size {image_size} "
                f"and {len(channel_mult)} levels the feature maps are {resolutions}"
            )
        self.num_res_blocks = int(num_res_blocks)
        self.progressive_input, self.progressive = progressive_input, progressive
        self.skip_rescale, self.fir = bool(skip_rescale), bool(fir)
        self.register_buffer("kernel", fir_kernel_2d(fir_kernel), persistent=False)

        ch, temb_dim = int(base_channels), 4 * int(base_channels)
        embed_dim = 2 * ch if embedding in FOURIER_EMBEDDINGS else ch
        self.embed = noise_embedding(embedding, embed_dim)
        self.temb = nn.Sequential(
            nn.Linear(embed_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )

        def res(in_ch: int, out_ch: int | None = None, resample: str | None = None) -> nn.Module:
            return ResnetBlockBigGAN(
                in_ch, out_ch, temb_dim, dropout, resample, fir, fir_kernel, skip_rescale
            )

        def attn(channels: int) -> nn.Module:
            return RescaledAttention(channels, skip_rescale)

        self.conv_in = conv3x3(in_channels, ch)

        # Down path: per level, num_res_blocks x (res [+ attn]), then a downsampling res block
        # (and the input pyramid's conv) except at the last level.
        self.down_blocks = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        self.pyramid_down = nn.ModuleList()  # "residual": the pyramid's own stride-2 convs
        self.pyramid_combine = nn.ModuleList()  # "input_skip": 1x1 convs of the image
        skips, cur, pyramid_ch = [ch], ch, in_channels
        for level, (mult, size) in enumerate(zip(channel_mult, resolutions, strict=True)):
            for _ in range(num_res_blocks):
                self.down_blocks.append(res(cur, ch * mult))
                cur = ch * mult
                self.down_attn.append(attn(cur) if size in attn_resolutions else nn.Identity())
                skips.append(cur)
            if level != len(channel_mult) - 1:
                self.downsamplers.append(res(cur, resample="down"))
                if progressive_input == "residual":
                    self.pyramid_down.append(ConvDownsample(pyramid_ch, cur, fir, fir_kernel))
                    pyramid_ch = cur
                elif progressive_input == "input_skip":
                    self.pyramid_combine.append(nn.Conv2d(in_channels, cur, 1))
                skips.append(cur)

        self.mid = nn.ModuleList([res(cur), attn(cur), res(cur)])

        # Up path: per level, (num_res_blocks + 1) res blocks on [h, skip], attention once if the
        # level is in attn_resolutions, the output pyramid's head, then an upsampling res block
        # except at the first level.
        self.up_blocks = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        self.pyramid_out = nn.ModuleList()  # "output_skip": one head per level, coarsest first
        for level in reversed(range(len(channel_mult))):
            mult, size = channel_mult[level], resolutions[level]
            for _ in range(num_res_blocks + 1):
                self.up_blocks.append(res(cur + skips.pop(), ch * mult))
                cur = ch * mult
            self.up_attn.append(attn(cur) if size in attn_resolutions else nn.Identity())
            if progressive == "output_skip":
                self.pyramid_out.append(self._output_head(cur, out_channels))
            if level != 0:
                self.upsamplers.append(res(cur, resample="up"))
        assert not skips

        if progressive == "none":
            self.norm_out = group_norm(cur)
            self.conv_out = zero_module(conv3x3(cur, out_channels))
        self._init_weights()

    @staticmethod
    def _output_head(channels: int, out_channels: int) -> nn.Sequential:
        """GroupNorm, SiLU and a zero-initialised 3x3 conv to the output channels."""
        return nn.Sequential(
            group_norm(channels), nn.SiLU(), zero_module(conv3x3(channels, out_channels))
        )

    def _init_weights(self) -> None:
        """Score SDE's ``default_init`` (Xavier uniform, zero bias) for every conv and dense layer
        that is not one of the zero-initialised (``init_scale=0.``) layers."""
        if self.conv_in.weight.is_meta:  # built for its shapes only: no values to set
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear) and m.weight.any():
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _skip_sum(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a + b) * SKIP_SCALE if self.skip_rescale else a + b

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        return fir_downsample_2d(x, self.kernel) if self.fir else naive_downsample_2d(x)

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        return fir_upsample_2d(x, self.kernel) if self.fir else naive_upsample_2d(x)

    def forward(self, x: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:
        """Return the raw network output, shaped like ``x`` (``out_channels`` channels)."""
        if x.ndim != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"NCSNpp built for (B, C, {self.image_size}, {self.image_size}) inputs, got "
                f"{tuple(x.shape)}"
            )
        temb = self.temb(self.embed(noise_label))
        pad = self.padded_size - self.image_size
        lo, hi = pad // 2, pad - pad // 2
        h = F.pad(x, (lo, hi, lo, hi), mode="reflect") if pad else x

        pyramid = h
        hs = [self.conv_in(h)]
        blocks, attns = iter(self.down_blocks), iter(self.down_attn)
        for level in range(len(self.downsamplers) + 1):
            for _ in range(self.num_res_blocks):
                hs.append(next(attns)(next(blocks)(hs[-1], temb)))
            if level < len(self.downsamplers):
                h = self.downsamplers[level](hs[-1], temb)
                if self.progressive_input == "residual":
                    pyramid = self._skip_sum(self.pyramid_down[level](pyramid), h)
                    h = pyramid
                elif self.progressive_input == "input_skip":
                    pyramid = self._downsample(pyramid)
                    h = self.pyramid_combine[level](pyramid) + h
                hs.append(h)

        h = self.mid[0](hs[-1], temb)
        h = self.mid[1](h)
        h = self.mid[2](h, temb)

        blocks, out = iter(self.up_blocks), None
        for level in range(len(self.up_attn)):
            for _ in range(self.num_res_blocks + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), temb)
            h = self.up_attn[level](h)
            if self.progressive == "output_skip":
                head = self.pyramid_out[level](h)
                out = head if out is None else self._upsample(out) + head
            if level < len(self.upsamplers):
                h = self.upsamplers[level](h, temb)

        if out is None:
            out = self.conv_out(F.silu(self.norm_out(h)))
        return out[..., lo : lo + self.image_size, lo : lo + self.image_size]
