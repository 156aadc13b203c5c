"""A network read through its parameterisation (diffusion_lab.score_model): class conditioning
and classifier-free guidance (Ho & Salimans 2022) against direct computations."""

from __future__ import annotations

import functools

import pytest
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.methods.base import DiffusionMethod
from diffusion_lab.networks.layers import NetworkConfigError
from diffusion_lab.networks.unet import UNet
from diffusion_lab.processes.sde import VPSDE
from diffusion_lab.samplers.ddim import ddim
from diffusion_lab.score_model import ScoreModel


def conditional_unet() -> UNet:
    torch.manual_seed(0)
    net = UNet(1, 8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
               dropout=0.0, num_classes=10)  # fmt: skip
    for p in net.parameters():  # a fresh U-Net outputs zero: give every layer weight
        torch.nn.init.normal_(p, std=0.2)
    return net


def test_the_class_embedding_conditions_and_class_minus_one_is_no_class():
    net = conditional_unet()
    x, label = torch.randn(4, 1, 8, 8), torch.tensor([3.0, 40.0, 500.0, 990.0])
    none = net(x, label)
    torch.testing.assert_close(net(x, label, torch.full((4,), -1)), none, rtol=0, atol=0)
    three, seven = net(x, label, torch.full((4,), 3)), net(x, label, torch.full((4,), 7))
    assert (three - seven).abs().amax() > 1e-3 and (three - none).abs().amax() > 1e-3
    plain = UNet(1, 8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(), dropout=0.0)  # fmt: skip
    assert not hasattr(plain, "class_embed")  # unconditional checkpoints keep their keys
    with pytest.raises(ValueError, match="set network.num_classes"):
        plain(x, label, torch.zeros(4, dtype=torch.long))
    with pytest.raises(NetworkConfigError, match="num_classes must be an integer >= 0"):
        UNet(1, 8, base_channels=8, channel_mult=(1, 2), attn_resolutions=(), num_classes=-2)


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_guidance_is_uncond_plus_w_times_cond_minus_uncond(parameterization):
    """Scale 0 is the unconditional model, 1 the conditional, and any w the combination of the
    two: for the denoised estimate, the noise and the score alike."""
    model = ScoreModel(conditional_unet(), VPSDE(num_steps=100), parameterization)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(6, 1, 8, 8, generator=g), torch.linspace(0.1, 0.9, 6)
    classes = torch.tensor([0, 1, 2, 7, 8, 9])
    uncond = {f: getattr(model, f)(x, t) for f in ("denoised", "eps", "score")}
    with model.conditioned(classes):
        cond = {f: getattr(model, f)(x, t) for f in ("denoised", "eps", "score")}
    for w in (0.0, 1.0, 2.5, 4.0):
        with model.conditioned(classes, guidance_scale=w):
            for f in ("denoised", "eps", "score"):
                guided = getattr(model, f)(x, t)
                expected = uncond[f] + w * (cond[f] - uncond[f])
                torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert model.classes is None and model.guidance_scale == 1.0  # restored after the block


def method(label_dropout: float = 0.0, num_classes: int = 10) -> DiffusionMethod:
    net = conditional_unet() if num_classes else UNet(1, 8, base_channels=8, channel_mult=(1, 2),
                                                      attn_resolutions=())  # fmt: skip
    return DiffusionMethod(
        net, VPSDE(num_steps=100), None, functools.partial(ddim, steps=3, progress=False), None,
        label_dropout=label_dropout, guidance_scale=3.0,
    )  # fmt: skip


def test_label_dropout_replaces_labels_by_no_class_at_its_rate():
    labels = torch.arange(10).repeat(400)
    batch = (torch.zeros(4000, 1, 8, 8), labels)
    torch.manual_seed(0)
    dropped = method(0.2).batch_classes(batch, 0.2)
    kept = dropped >= 0
    assert torch.equal(dropped[kept], labels[kept])
    assert abs(float((~kept).float().mean()) - 0.2) < 0.02  # 4000 draws: 3.2 standard errors
    assert torch.equal(method().batch_classes(batch, 0.0), labels)
    assert method(num_classes=0).batch_classes(batch, 0.0) is None
    with pytest.raises(ConfigError, match="label_dropout=0.1 needs a class-conditional network"):
        method(0.1, num_classes=0)


def test_sample_i_is_drawn_for_class_i_mod_k_at_the_methods_scale():
    classes, w = method().sample_classes(range(7, 23))
    assert classes.tolist() == [i % 10 for i in range(7, 23)] and w == 3.0
    assert method(num_classes=0).sample_classes(range(4)) == (None, 1.0)
