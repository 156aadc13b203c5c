"""diffusers' ``UNet2DModel`` with Skip blocks (its port of NCSN++) as this project's :class:`NCSNpp`.

diffusers ports Score SDE's NCSN++ of the CelebA-HQ / FFHQ configs (google/ncsnpp-celebahq-256,
ncsnpp-ffhq-1024; ``scripts/convert_ncsnpp_original_checkpoint_to_diffusers.py``) as a
``UNet2DModel`` whose blocks are ``SkipDownBlock2D`` / ``AttnSkipDownBlock2D`` and their up
mirrors, with ``time_embedding_type="fourier"``. That is :class:`NCSNpp` with BigGAN residual
blocks, FIR resampling, ``skip_rescale``, ``progressive_input="input_skip"`` (each block's
``skip_conv`` is the 1x1 combine conv of the downsampled image) and ``progressive="output_skip"``
(each up block's ``skip_norm`` / ``skip_conv`` is one head of the output pyramid; the model's
``conv_norm_out`` / ``conv_out`` is the finest one). diffusers divides the output by sigma
(Score SDE's ``scale_by_sigma``), which here is the method's ``score_over_sigma``. Its
``center_input_sample`` is false in the published configs: the network sees the sample as it is
(Score SDE's own NCSN++ maps uncentred data to 2x - 1 first; diffusers' port and ours do not).

:func:`ncsnpp_kwargs` reads the config and refuses, naming the field, what :class:`NCSNpp` cannot
represent; :func:`ncsnpp_state_dict` renames the weights (diffusers' ``conv1`` / ``conv2`` of a
residual block are our ``conv0`` / ``conv1``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from diffusion_lab.networks.from_diffusers import (
    SHAPED,
    attended_levels,
    mapped_weights,
    read_fields,
    refuse,
    shape_kwargs,
    stem_pairs,
)
from diffusion_lab.networks.ncsnpp import NCSNpp

SOURCE = "NCSN++ (UNet2DModel with Skip blocks, e.g. google/ncsnpp-celebahq-256)"
BLOCKS = ("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D")
#: diffusers' Skip blocks hard-code three image channels (their 1x1 and 3x3 skip convs).
IMAGE_CHANNELS = 3

#: field -> (diffusers' default, the value NCSN++ has): any other value is refused.
FIXED = {
    "center_input_sample": (False, False),
    "time_embedding_type": ("positional", "fourier"),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "act_fn": ("silu", "silu"),
    "norm_eps": (1e-5, 1e-6),
    "norm_num_groups": (32, None),  # min(channels // 4, 32) per layer, as Score SDE
    "resnet_time_scale_shift": ("default", "default"),
    "add_attention": (True, True),
    "class_embed_type": (None, None),
    "num_class_embeds": (None, None),
    "attn_norm_num_groups": (None, None),
}
#: Fields the Skip blocks and the Fourier embedding never read.
IGNORED = frozenset(
    {"flip_sin_to_cos", "freq_shift", "downsample_padding", "downsample_type", "upsample_type"}
)


def ncsnpp_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`NCSNpp` arguments of a diffusers NCSN++ ``UNet2DModel`` config.

    Raises :class:`ConfigError` naming the first field our NCSN++ cannot represent: another block
    type, multi-head attention, a mid-block scale other than sqrt(2), other than three channels,
    group counts that differ from diffusers' at these widths, an unknown field.
    """
    if "mid_block_scale_factor" not in config:
        raise refuse("mid_block_scale_factor", 1, "NCSN++ rescales by sqrt(2)", SOURCE)
    scale = config["mid_block_scale_factor"]
    if not isinstance(scale, int | float) or not math.isclose(scale, math.sqrt(2), rel_tol=1e-9):
        raise refuse("mid_block_scale_factor", scale, "NCSN++ rescales by sqrt(2)", SOURCE)
    fields = {k: v for k, v in config.items() if k != "mid_block_scale_factor"}
    cfg = read_fields(fields, FIXED, SHAPED, SOURCE, IGNORED)
    kwargs = shape_kwargs(cfg, BLOCKS, SOURCE)
    if kwargs["in_channels"] != IMAGE_CHANNELS:
        raise refuse("in_channels", kwargs["in_channels"], "diffusers' Skip blocks have 3", SOURCE)
    kwargs.update(
        embedding="fourier",
        fir=True,
        fir_kernel=[1, 3, 3, 1],
        skip_rescale=True,
        resblock="biggan",
        progressive_input="input_skip",
        progressive="output_skip",
    )
    _check_group_counts(kwargs)
    return kwargs


def _check_group_counts(kwargs: Mapping[str, Any]) -> None:
    """diffusers gives every GroupNorm min(C // 4, 32) groups, the attention of its Attn Skip
    blocks 32: ours (the largest divisor of C up to min(C // 4, 32)) must agree at every width.
    (Where attention has 128+ channels, the up blocks' ``min(a + b // 4, 32)``, a diffusers
    precedence slip, is 32 as well.)"""
    with torch.device("meta"):
        net = NCSNpp(**kwargs)
    for name, module in net.named_modules():
        if not isinstance(module, nn.GroupNorm):
            continue
        channels = module.num_channels
        theirs = 32 if "attn" in name else min(channels // 4, 32)
        if module.num_groups != theirs:
            raise refuse(
                "block_out_channels",
                [kwargs["base_channels"] * m for m in kwargs["channel_mult"]],
                f"at {channels} channels diffusers has {theirs} groups, ours {module.num_groups}",
                SOURCE,
            )


def _resnet(ours: str, theirs: str) -> Iterator[tuple[str, str, bool]]:
    """The layers of one ``ResnetBlockBigGAN`` / ``ResnetBlock2D``, as :func:`_pairs` gives them."""
    for mine, name in (("norm1", "norm1"), ("conv0", "conv1"), ("norm2", "norm2")):
        yield f"{ours}.{mine}", f"{theirs}.{name}", False
    yield f"{ours}.conv1", f"{theirs}.conv2", False
    yield f"{ours}.temb_proj", f"{theirs}.time_emb_proj", False
    yield f"{ours}.skip", f"{theirs}.conv_shortcut", False  # where channels change or it resamples


def _pairs(kwargs: Mapping[str, Any]) -> Iterator[tuple[str, str, bool]]:
    """(our prefix, diffusers' prefix, is attention) for every layer with weights."""
    levels, blocks = len(kwargs["channel_mult"]), kwargs["num_res_blocks"]
    attended = attended_levels(kwargs)
    yield from stem_pairs()
    for level in range(levels):
        for j in range(blocks):
            i = level * blocks + j
            yield from _resnet(f"down_blocks.{i}", f"down_blocks.{level}.resnets.{j}")
            if 2**level in attended:
                yield f"down_attn.{i}", f"down_blocks.{level}.attentions.{j}", True
        if level != levels - 1:
            yield from _resnet(f"downsamplers.{level}", f"down_blocks.{level}.resnet_down")
            yield f"pyramid_combine.{level}", f"down_blocks.{level}.skip_conv", False
    yield from _resnet("mid.0", "mid_block.resnets.0")
    yield "mid.1", "mid_block.attentions.0", True
    yield from _resnet("mid.2", "mid_block.resnets.1")
    for k, level in enumerate(reversed(range(levels))):
        for j in range(blocks + 1):
            yield from _resnet(f"up_blocks.{k * (blocks + 1) + j}", f"up_blocks.{k}.resnets.{j}")
        if 2**level in attended:
            yield f"up_attn.{k}", f"up_blocks.{k}.attentions.0", True
        if level != 0:
            yield f"pyramid_out.{k}.0", f"up_blocks.{k}.skip_norm", False
            yield f"pyramid_out.{k}.2", f"up_blocks.{k}.skip_conv", False
            yield from _resnet(f"upsamplers.{k}", f"up_blocks.{k}.resnet_up")
    yield f"pyramid_out.{levels - 1}.0", "conv_norm_out", False
    yield f"pyramid_out.{levels - 1}.2", "conv_out", False


def ncsnpp_state_dict(
    state: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """diffusers' NCSN++ weights as the state dict of ``NCSNpp(**kwargs)`` (``kwargs`` from
    :func:`ncsnpp_kwargs`), the fixed Fourier frequencies included; see
    :func:`~diffusion_lab.networks.from_diffusers.mapped_weights` for what is refused."""
    return mapped_weights(state, _pairs(kwargs), {"embed.freqs": "time_proj.weight"})
