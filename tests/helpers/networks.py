"""Helpers shared by the network tests: build a preset as Hydra would, count and perturb parameters."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import CONF

NETWORK_CONF = CONF / "network"


def build_preset(name: str, channels: int, image_size: int | None) -> torch.nn.Module:
    """Instantiate ``conf/network/<name>.yaml`` as Hydra would, with a stand-in ``data`` group."""
    cfg = OmegaConf.create(
        {
            "data": {"channels": channels, "image_size": image_size},
            "network": OmegaConf.load(NETWORK_CONF / f"{name}.yaml"),
        }
    )
    return instantiate(cfg.network)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturb_zero_params(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised parameters small random values (an 'after training' network)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def random_diffusers_unet(config: dict, seed: int = 0) -> torch.nn.Module:
    """diffusers' ``UNet2DModel`` of ``config`` with random weights, GroupNorm affines included
    (left at 1 and 0, a norm mapped to the wrong layer would go unseen), in eval mode."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.UNet2DModel.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
    return model


def converted_from_diffusers(model: torch.nn.Module, network_class, read_kwargs, read_state):
    """Our ``network_class`` built from a diffusers model's config (``read_kwargs``) with its
    weights renamed (``read_state``), in eval mode."""
    kwargs = read_kwargs(dict(model.config))
    net = network_class(**kwargs).eval()
    net.load_state_dict(read_state(model.state_dict(), kwargs))
    return net
