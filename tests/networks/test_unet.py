"""Tests for the DDPM U-Net, the toy MLP and their shared layers (diffusion_lab.networks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.networks import build_preset, n_params, perturb_zero_params

from diffusion_lab.networks import MLP, UNet
from diffusion_lab.networks.layers import (
    Downsample,
    NetworkConfigError,
    num_groups,
    timestep_embedding,
)

SMALL = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=())


@pytest.mark.parametrize("size", [8, 16, 28, 32, 64])
@pytest.mark.parametrize("mult", [(1, 2), (1, 2, 2, 2)])
def test_unet_output_shape_for_each_image_size(size: int, mult: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = UNet(1, size, base_channels=8, channel_mult=mult, num_res_blocks=1, attn_resolutions=())
    perturb_zero_params(net)
    x = torch.randn(2, 1, size, size)
    out = net(x, torch.tensor([0.0, 999.0]))
    assert out.shape == x.shape
    assert out.abs().sum() > 0


def test_unet_pads_28_to_32_with_four_levels_and_attends_at_16() -> None:
    net = UNet(1, 28, base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1)
    assert net.padded_size == 32
    assert net(torch.randn(1, 1, 28, 28), torch.tensor([10.0])).shape == (1, 1, 28, 28)


def test_unet_out_channels_and_fourier_embedding() -> None:
    net = UNet(3, 16, out_channels=6, embedding="fourier", **SMALL)
    perturb_zero_params(net)
    out = net(torch.randn(2, 3, 16, 16), torch.tensor([0.01, 50.0]))
    assert out.shape == (2, 6, 16, 16)


@pytest.mark.parametrize("size", [8, 16, 28, 32])
def test_unet_small_preset_shapes(size: int) -> None:
    net = build_preset("unet_small", 1, size)
    assert isinstance(net, UNet)
    x = torch.randn(2, 1, size, size)
    assert net(x, torch.rand(2) * 1000).shape == x.shape


def test_ddpm_cifar10_preset_has_the_papers_35_7m_parameters() -> None:
    torch.manual_seed(0)
    net = build_preset("unet_ddpm_cifar10", 3, 32)
    assert abs(n_params(net) - 35.7e6) < 0.1e6
    assert n_params(net) == 35_746_307  # the count of the reference PyTorch port of DDPM
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 3, 32, 32), torch.tensor([500.0]))
    assert out.shape == (1, 3, 32, 32)


def test_celeba_preset_builds_for_64x64() -> None:
    net = build_preset("unet_ddpm_celeba", 3, 64)
    assert n_params(net) == 78_700_803


def test_downsample_pads_as_tf_same_at_stride_2() -> None:
    """DDPM's stride-2 conv has TF's padding 'SAME': out = ceil(H / 2) and, of the
    (out - 1) * 2 + 3 - H rows of padding (1 on an even size), total // 2 (none) go before; so
    output (i, j) reads input rows 2i .. 2i + 2 and columns 2j .. 2j + 2, zeros past the end."""
    torch.manual_seed(0)
    layer = Downsample(2).double()
    w, b = layer.conv.weight, layer.conv.bias
    for size in (2, 4, 6, 8):
        out = -(-size // 2)
        before = ((out - 1) * 2 + 3 - size) // 2
        x = torch.randn(1, 2, size, size, dtype=torch.float64)
        expected = b[None, :, None, None].repeat(1, 1, out, out)
        for i in range(out):
            for j in range(out):
                for di in range(3):
                    for dj in range(3):
                        r, c = 2 * i + di - before, 2 * j + dj - before
                        if 0 <= r < size and 0 <= c < size:
                            expected[0, :, i, j] += w[:, :, di, dj] @ x[0, :, r, c]
        torch.testing.assert_close(layer(x), expected)


def test_mlp_preset_and_shapes() -> None:
    net = build_preset("mlp", 2, None)
    assert isinstance(net, MLP)
    perturb_zero_params(net)
    x = torch.randn(5, 2)
    out = net(x, torch.rand(5) * 1000)
    assert out.shape == x.shape and out.abs().sum() > 0
    fourier = MLP(dim=3, hidden=32, depth=2, embed_dim=16, embedding="fourier")
    assert fourier(torch.randn(4, 3), torch.rand(4) + 0.01).shape == (4, 3)


def test_timestep_embedding_matches_the_ddpm_formula() -> None:
    t = np.array([0.0, 1.0, 17.5, 999.0])
    for dim in (64, 65, 128):
        half = dim // 2
        freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))
        args = t[:, None] * freqs[None, :]
        expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
        if dim % 2:
            expected = np.pad(expected, ((0, 0), (0, 1)))
        got = timestep_embedding(torch.tensor(t, dtype=torch.float32), dim).numpy()
        assert got.shape == (4, dim)
        np.testing.assert_allclose(got, expected, atol=2e-4)  # float32 sin of args up to 999


def test_fourier_embedding_embeds_log_sigma_with_fixed_frequencies() -> None:
    net = UNet(1, 8, embedding="fourier", **SMALL)
    freqs = net.embed.freqs
    assert not any(p is freqs for p in net.parameters()) and "embed.freqs" in net.state_dict()
    sigma = torch.tensor([0.5, 3.0])
    args = 2 * math.pi * torch.log(sigma)[:, None] * freqs[None, :]
    torch.testing.assert_close(net.embed(sigma), torch.cat([args.sin(), args.cos()], 1))


def test_group_norm_groups_work_for_small_channel_counts() -> None:
    assert [num_groups(c) for c in (1, 3, 8, 16, 32, 48, 128, 256)] == [1, 1, 2, 4, 8, 12, 32, 32]


def test_outputs_are_exactly_zero_at_construction() -> None:
    unet = UNet(1, 8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
    assert torch.count_nonzero(unet(torch.randn(3, 1, 8, 8), torch.rand(3) * 1000)) == 0
    mlp = MLP(hidden=16, depth=2, embed_dim=8)
    assert torch.count_nonzero(mlp(torch.randn(3, 2), torch.rand(3) * 1000)) == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: UNet(1, 8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, dropout=0.1,
                     attn_resolutions=(8, 4)),
        lambda: MLP(hidden=16, depth=2, embed_dim=8),
    ],
    ids=["unet", "mlp"],
)  # fmt: skip
def test_gradient_reaches_every_parameter(make) -> None:
    torch.manual_seed(0)
    net = make()
    perturb_zero_params(net)
    x = torch.randn(4, 1, 8, 8) if isinstance(net, UNet) else torch.randn(4, 2)
    loss = (net(x, torch.rand(4) * 1000) - x).pow(2).mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_same_seed_same_weights_and_outputs() -> None:
    def run(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        torch.manual_seed(seed)
        net = UNet(1, 16, dropout=0.1, embedding="fourier", **SMALL)
        perturb_zero_params(net)
        torch.manual_seed(seed + 1)
        return net.state_dict(), net(torch.randn(2, 1, 16, 16), torch.rand(2) + 0.1)

    (w1, y1), (w2, y2), (w3, _) = run(0), run(0), run(1)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert torch.equal(y1, y2)
    assert not torch.equal(w1["embed.freqs"], w3["embed.freqs"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image_size=16, attn_resolutions=(4,)), "not reached"),
        (dict(image_size=4, channel_mult=(1, 2, 2, 2)), "too small"),
        (dict(image_size=16, channel_mult=()), "channel_mult"),
        (dict(image_size=16, num_res_blocks=0), "num_res_blocks"),
        (dict(image_size=16, dropout=1.0), "dropout"),
        (dict(image_size=16, embedding="linear"), "embedding"),
    ],
)
def test_unet_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {**SMALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        UNet(1, **args)
    with pytest.raises(NetworkConfigError):
        UNet(1, **args)


def test_networks_reject_inputs_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="UNet built for"):
        UNet(1, 16, **SMALL)(torch.randn(1, 1, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="MLP built for"):
        MLP(hidden=8, depth=1, embed_dim=8)(torch.randn(1, 3), torch.zeros(1))
