"""diffusers' ``UNet2DModel`` (its port of DDPM's U-Net) as this project's :class:`UNet`.

:func:`unet_kwargs` reads a ``UNet2DModel`` config (``config.json``) into the arguments of
:class:`~diffusion_lab.networks.unet.UNet` and refuses, naming the field, a config our network
cannot represent; :func:`unet_state_dict` renames and reshapes the weights. The correspondence is
diffusers' ``scripts/convert_ddpm_original_checkpoint_to_diffusers.py`` read backwards: DDPM's
``down.{level}.block.{j}`` is diffusers' ``down_blocks.{level}.resnets.{j}`` and our ``down.{i}.res``
(ours counts the blocks of all levels in one list, the downsampling conv included).

A field missing from a config has diffusers' default (``UNet2DModel.__init__``, diffusers 0.42),
as diffusers itself would read it: e.g. a config without ``freq_shift`` has 0, not DDPM's 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from diffusion_lab.errors import ConfigError
from diffusion_lab.networks.unet import UNet

DOWN, ATTN_DOWN, UP, ATTN_UP = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"

#: field -> (diffusers' default, the value DDPM's U-Net has): any other value is refused.
FIXED = {
    "center_input_sample": (False, False),
    "time_embedding_type": ("positional", "positional"),
    "freq_shift": (0, 1),  # exponent / (half - 1), tensor2tensor's timestep embedding
    "flip_sin_to_cos": (True, False),  # [sin, cos]
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "mid_block_scale_factor": (1, 1),
    "downsample_padding": (1, 0),  # pad (0, 1, 0, 1), then the stride-2 conv
    "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"),
    "act_fn": ("silu", "silu"),
    "norm_eps": (1e-5, 1e-6),
    "resnet_time_scale_shift": ("default", "default"),
    "add_attention": (True, True),
    "class_embed_type": (None, None),
    "num_class_embeds": (None, None),
    "attn_norm_num_groups": (None, None),
}
#: The fields read into the network's shape, with diffusers' defaults.
SHAPED = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": (DOWN, ATTN_DOWN, ATTN_DOWN, ATTN_DOWN),
    "up_block_types": (ATTN_UP, ATTN_UP, ATTN_UP, UP),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "dropout": 0.0,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "time_embedding_dim": None,
    "num_train_timesteps": None,  # read by the "learned" embedding only: ignored here
}


SOURCE = "DDPM's U-Net, e.g. google/ddpm-cifar10-32"


def refuse(field: str, value: Any, why: str, source: str = SOURCE) -> ConfigError:
    """The one-line error for a config field that cannot be converted."""
    return ConfigError(
        f"diffusers config field {field} = {value!r} cannot be converted: {why} "
        f"(diffusion_lab converts {source})"
    )


def read_fields(
    config: Mapping[str, Any],
    fixed: Mapping[str, tuple[Any, Any]],
    shaped: Mapping[str, Any],
    source: str,
    ignored: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The ``shaped`` fields of a ``UNet2DModel`` config, diffusers' defaults filled in.

    Raises :class:`ConfigError` for an unknown field (not in ``fixed``, ``shaped`` or
    ``ignored``: the fields the source's blocks never read) or a ``fixed`` field (diffusers'
    default, the one value we represent) with another value.
    """
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise refuse("_class_name", name, "only UNet2DModel is supported", source)
    known = set(fixed) | set(shaped) | ignored
    for field in config:
        if not field.startswith("_") and field not in known:
            raise refuse(field, config[field], "a field this converter does not know", source)
    for field, (default, wanted) in fixed.items():
        value = config.get(field, default)
        if value != wanted:
            raise refuse(field, value, f"the network has {wanted!r}", source)
    return {field: config.get(field, default) for field, default in shaped.items()}


def shape_kwargs(
    cfg: Mapping[str, Any], blocks: tuple[str, str, str, str], source: str
) -> dict[str, Any]:
    """The arguments that give a network its shape (channels, levels, blocks, attention), from
    the fields of :data:`SHAPED`; ``blocks`` names the (down, attention down, up, attention up)
    block types, the attention ones single-head (``attention_head_dim`` null or the width)."""
    plain_down, attn_down, plain_up, attn_up = blocks
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if not set(down) <= {plain_down, attn_down}:
        raise refuse(
            "down_block_types", down, f"only {plain_down} and {attn_down} are supported", source
        )
    mirrored = [attn_up if kind == attn_down else plain_up for kind in reversed(down)]
    if up != mirrored:
        raise refuse("up_block_types", up, f"it must mirror down_block_types: {mirrored}", source)
    channels = [int(c) for c in cfg["block_out_channels"]]
    if len(channels) != len(down) or any(c % channels[0] for c in channels):
        raise refuse(
            "block_out_channels",
            channels,
            "one entry per block, each a multiple of the first (our channel_mult)",
            source,
        )
    size = cfg["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    if not isinstance(size, int) or size % 2 ** (len(down) - 1):
        raise refuse(
            "sample_size",
            cfg["sample_size"],
            f"a square size divisible by {2 ** (len(down) - 1)}",
            source,
        )
    if cfg["out_channels"] != cfg["in_channels"]:
        raise refuse("out_channels", cfg["out_channels"], "it must equal in_channels", source)
    if cfg["time_embedding_dim"] not in (None, 4 * channels[0]):
        raise refuse(
            "time_embedding_dim", cfg["time_embedding_dim"], f"ours is {4 * channels[0]}", source
        )
    attended = {c for c, kind in zip(channels, down, strict=True) if kind == attn_down}
    heads_dim = cfg["attention_head_dim"]
    if heads_dim is not None and attended | {channels[-1]} != {heads_dim}:
        raise refuse("attention_head_dim", heads_dim, "ours is single-head attention", source)
    return {
        "in_channels": int(cfg["in_channels"]),
        "image_size": size,
        "base_channels": channels[0],
        "channel_mult": [c // channels[0] for c in channels],
        "num_res_blocks": int(cfg["layers_per_block"]),
        "attn_resolutions": [size // 2**i for i, kind in enumerate(down) if kind == attn_down],
        "dropout": float(cfg["dropout"]),
    }


def unet_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`UNet` arguments of a diffusers ``UNet2DModel`` config (DDPM's architecture).

    Raises :class:`ConfigError` naming the first field our U-Net cannot represent: another
    block type, multi-head attention, a norm group count other than ours, an unknown field.
    """
    cfg = read_fields(config, FIXED, SHAPED, SOURCE)
    kwargs = {
        **shape_kwargs(cfg, (DOWN, ATTN_DOWN, UP, ATTN_UP), SOURCE),
        "embedding": "sinusoidal",
    }
    with torch.device("meta"):
        groups = {m.num_groups for m in UNet(**kwargs).modules() if isinstance(m, nn.GroupNorm)}
    if groups != {cfg["norm_num_groups"]}:
        raise refuse(
            "norm_num_groups", cfg["norm_num_groups"], f"ours has {sorted(groups)} at these widths"
        )
    return kwargs


def _resnet(ours: str, theirs: str) -> Iterator[tuple[str, str, bool]]:
    """The layers of one ``ResBlock`` / ``ResnetBlock2D``, as :func:`_pairs` gives them."""
    for name in ("norm1", "conv1", "norm2", "conv2"):
        yield f"{ours}.{name}", f"{theirs}.{name}", False
    yield f"{ours}.temb_proj", f"{theirs}.time_emb_proj", False
    yield f"{ours}.skip", f"{theirs}.conv_shortcut", False  # only where the channels change


def stem_pairs() -> Iterator[tuple[str, str, bool]]:
    """The time-embedding MLP and the input conv, named alike in our networks and diffusers'."""
    yield "temb.0", "time_embedding.linear_1", False
    yield "temb.2", "time_embedding.linear_2", False
    yield "conv_in", "conv_in", False


def attended_levels(kwargs: Mapping[str, Any]) -> set[int]:
    """2**level for each level with attention."""
    return {kwargs["image_size"] // res for res in kwargs["attn_resolutions"]}


def _pairs(kwargs: Mapping[str, Any]) -> Iterator[tuple[str, str, bool]]:
    """(our prefix, diffusers' prefix, is attention) for every layer with weights, in order."""
    levels, blocks = len(kwargs["channel_mult"]), kwargs["num_res_blocks"]
    attended = attended_levels(kwargs)
    yield from stem_pairs()
    i = 0
    for level in range(levels):
        for j in range(blocks):
            yield from _resnet(f"down.{i}.res", f"down_blocks.{level}.resnets.{j}")
            if 2**level in attended:
                yield f"down.{i}.attn", f"down_blocks.{level}.attentions.{j}", True
            i += 1
        if level != levels - 1:
            yield f"down.{i}.conv", f"down_blocks.{level}.downsamplers.0.conv", False
            i += 1
    yield from _resnet("mid.0.res", "mid_block.resnets.0")
    yield "mid.0.attn", "mid_block.attentions.0", True
    yield from _resnet("mid.1", "mid_block.resnets.1")
    i = 0
    for k, level in enumerate(reversed(range(levels))):
        for j in range(blocks + 1):
            yield from _resnet(f"up.{i}.res", f"up_blocks.{k}.resnets.{j}")
            if 2**level in attended:
                yield f"up.{i}.attn", f"up_blocks.{k}.attentions.{j}", True
            i += 1
        if level != 0:
            yield f"up.{i}.conv", f"up_blocks.{k}.upsamplers.0.conv", False
            i += 1
    yield "norm_out", "conv_norm_out", False
    yield "conv_out", "conv_out", False


#: The layers of diffusers' ``Attention``, each with the name that checkpoints saved by older
#: diffusers give it (diffusers renames them on load: ``ModelMixin._fix_state_dict_keys_on_load``).
ATTENTION_LAYERS = {
    "group_norm": "group_norm",
    "to_q": "query",
    "to_k": "key",
    "to_v": "value",
    "to_out.0": "proj_attn",
}


def attention_weights(
    state: Mapping[str, torch.Tensor], ours: str, theirs: str, used: set[str]
) -> dict[str, torch.Tensor]:
    """diffusers' ``Attention`` (Linear q, k, v, out) as our ``AttentionBlock`` (one 1x1 qkv conv
    whose output channels are [q; k; v], a 1x1 output conv); the keys read are added to ``used``."""
    layer: dict[str, dict[str, torch.Tensor]] = {}
    for name, legacy in ATTENTION_LAYERS.items():
        found = next((n for n in (name, legacy) if f"{theirs}.{n}.weight" in state), None)
        if found is None:
            raise missing_weight(f"{theirs}.{name}.weight")
        keys = {p: f"{theirs}.{found}.{p}" for p in ("weight", "bias")}
        layer[name] = {p: state[k] for p, k in keys.items()}
        used.update(keys.values())
    qkv = [layer[n] for n in ("to_q", "to_k", "to_v")]
    return {
        f"{ours}.norm.weight": layer["group_norm"]["weight"],
        f"{ours}.norm.bias": layer["group_norm"]["bias"],
        f"{ours}.qkv.weight": torch.cat([q["weight"] for q in qkv])[..., None, None],
        f"{ours}.qkv.bias": torch.cat([q["bias"] for q in qkv]),
        f"{ours}.proj_out.weight": layer["to_out.0"]["weight"][..., None, None],
        f"{ours}.proj_out.bias": layer["to_out.0"]["bias"],
    }


def missing_weight(key: str) -> ConfigError:
    return ConfigError(f"diffusers weights lack {key}: give the config.json saved with them")


def mapped_weights(
    state: Mapping[str, torch.Tensor],
    pairs: Iterator[tuple[str, str, bool]],
    tensors: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """diffusers' weights under our names: each (our prefix, diffusers' prefix, is attention) of
    ``pairs`` with its weight and bias (a ``conv_shortcut`` only where the file has one), and
    each our key -> diffusers' key of ``tensors`` (e.g. fixed Fourier frequencies).

    Raises :class:`ConfigError` naming a weight the config implies but the file lacks, or one the
    file has that the config does not explain (a config and weights that do not belong together).
    """
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for mine, theirs in (tensors or {}).items():
        if theirs not in state:
            raise missing_weight(theirs)
        ours[mine] = state[theirs]
        used.add(theirs)
    for mine, theirs, attention in pairs:
        if attention:
            ours.update(attention_weights(state, mine, theirs, used))
            continue
        for param in ("weight", "bias"):
            key = f"{theirs}.{param}"
            if key in state:
                ours[f"{mine}.{param}"] = state[key]
                used.add(key)
            elif not theirs.endswith("conv_shortcut"):
                raise missing_weight(key)
    extra = sorted(set(state) - used)
    if extra:
        raise ConfigError(
            f"diffusers weights hold {extra[0]}, which their config.json does not explain "
            f"({len(extra)} such): give the config.json saved with them"
        )
    return ours


def unet_state_dict(
    state: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """diffusers' ``UNet2DModel`` weights as the state dict of ``UNet(**kwargs)`` (``kwargs``
    from :func:`unet_kwargs`); see :func:`mapped_weights` for what is refused."""
    return mapped_weights(state, _pairs(kwargs))
