"""Tests for NCSN++ / DDPM++ (Song et al. 2021, App. H): diffusion_lab.networks.ncsnpp(_layers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.networks import build_preset, n_params, perturb_zero_params

from diffusion_lab.networks.layers import AttentionBlock, NetworkConfigError
from diffusion_lab.networks.ncsnpp import NCSNpp
from diffusion_lab.networks.ncsnpp_layers import (
    ConvDownsample,
    RescaledAttention,
    ResnetBlockBigGAN,
    fir_downsample_2d,
    fir_kernel_2d,
    fir_upsample_2d,
)

TINY = dict(base_channels=8, num_res_blocks=1, attn_resolutions=(), dropout=0.0)

# Parameter counts measured for 3-channel 32x32 (64x64 for CelebA) inputs. Score SDE's code counts
# 128 more for NCSN++ (its fixed Fourier weights are an nn.Parameter; here they are a buffer).
# Score SDE's NCSN++ / DDPM++ CIFAR-10 models are commonly quoted at about 62M parameters; the
# architecture (not a paper number) fixes the exact counts, so they are asserted exactly too.
PAPER_COUNTS = {
    "ncsnpp_cifar10": (3, 32, 62_758_787),
    "ddpmpp_cifar10": (3, 32, 61_804_419),
    "ncsnpp_celeba": (3, 64, 42_589_199),
}


# ---------------------------------------------------------------- FIR resampling (upfirdn2d)


def reference_resample(x: np.ndarray, k1: list[float], up: int, down: int) -> np.ndarray:
    """Direct loops: zero-insert by ``up``, zero-pad as Score SDE, correlate with the normalised
    outer-product kernel (times up**2), keep every ``down``-th pixel. ``x`` is (H, W)."""
    k = np.outer(k1, k1)
    k = k / k.sum() * up**2
    n = len(k1)
    if up > 1:
        p = n - up
        p0, p1 = (p + 1) // 2 + up - 1, p // 2
    else:
        p = n - down
        p0, p1 = (p + 1) // 2, p // 2
    h, w = x.shape
    z = np.zeros((h * up, w * up))
    z[::up, ::up] = x
    zp = np.zeros((h * up + p0 + p1, w * up + p0 + p1))
    zp[p0 : p0 + h * up, p0 : p0 + w * up] = z
    out_h = (zp.shape[0] - n) // down + 1
    out = np.zeros((out_h, out_h))
    for i in range(out_h):
        for j in range(out_h):
            for a in range(n):
                for b in range(n):
                    out[i, j] += k[n - 1 - a, n - 1 - b] * zp[i * down + a, j * down + b]
    return out


@pytest.mark.parametrize("size", [4, 8])
def test_fir_resampling_matches_direct_computation(size: int) -> None:
    kernel = fir_kernel_2d((1, 3, 3, 1))
    x = torch.randn(1, 1, size, size, dtype=torch.float64)
    down = fir_downsample_2d(x, kernel.double())
    up = fir_upsample_2d(x, kernel.double())
    assert down.shape == (1, 1, size // 2, size // 2)
    assert up.shape == (1, 1, 2 * size, 2 * size)
    ref_down = reference_resample(x[0, 0].numpy(), [1, 3, 3, 1], up=1, down=2)
    ref_up = reference_resample(x[0, 0].numpy(), [1, 3, 3, 1], up=2, down=1)
    np.testing.assert_allclose(down[0, 0].numpy(), ref_down, atol=1e-12)
    np.testing.assert_allclose(up[0, 0].numpy(), ref_up, atol=1e-12)


def test_fir_kernel_is_normalised_outer_product() -> None:
    k = fir_kernel_2d((1, 3, 3, 1))
    expected = torch.tensor([1.0, 3.0, 3.0, 1.0])
    torch.testing.assert_close(k, torch.outer(expected, expected) / 64.0)
    with pytest.raises(NetworkConfigError):
        fir_kernel_2d(())


def test_fir_impulse_responses() -> None:
    """An impulse at (2m, 2m) downsamples to [1, 3]/4 (x) [1, 3]/4 at m-1, m; an impulse at (m, m)
    upsamples to [1, 3, 3, 1]/4 (x) itself at 2m-1 .. 2m+2 (centred between 2m and 2m+1)."""
    kernel = fir_kernel_2d((1, 3, 3, 1))
    x = torch.zeros(1, 1, 8, 8)
    x[..., 4, 4] = 1.0
    down = fir_downsample_2d(x, kernel)[0, 0]
    expected = torch.zeros(4, 4)
    expected[1:3, 1:3] = torch.outer(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 3.0])) / 64.0
    torch.testing.assert_close(down, expected)

    x = torch.zeros(1, 1, 4, 4)
    x[..., 2, 2] = 1.0
    up = fir_upsample_2d(x, kernel)[0, 0]
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 4.0
    expected = torch.zeros(8, 8)
    expected[3:7, 3:7] = torch.outer(taps, taps)
    torch.testing.assert_close(up, expected)


def test_fir_preserves_constants_and_mean() -> None:
    """Zero padding (as Score SDE): a constant image stays constant away from the border, and the
    mean of an image that vanishes near the border is preserved exactly by both resamplings."""
    kernel = fir_kernel_2d((1, 3, 3, 1))
    const = torch.full((2, 3, 16, 16), 0.7)
    down, up = fir_downsample_2d(const, kernel), fir_upsample_2d(const, kernel)
    assert down.shape == (2, 3, 8, 8) and up.shape == (2, 3, 32, 32)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full((2, 3, 6, 6), 0.7))
    torch.testing.assert_close(up[..., 1:-1, 1:-1], torch.full((2, 3, 30, 30), 0.7))

    x = torch.zeros(2, 3, 16, 16)
    x[..., 2:-2, 2:-2] = torch.rand(2, 3, 12, 12)
    torch.testing.assert_close(fir_downsample_2d(x, kernel).mean((2, 3)), x.mean((2, 3)))
    torch.testing.assert_close(fir_upsample_2d(x, kernel).mean((2, 3)), x.mean((2, 3)))


@pytest.mark.parametrize("fir", [True, False])
def test_conv_downsample_halves(fir: bool) -> None:
    layer = ConvDownsample(3, 5, fir)
    assert layer(torch.randn(2, 3, 8, 8)).shape == (2, 5, 4, 4)


# ---------------------------------------------------------------- blocks: 1/sqrt(2) skips


@pytest.mark.parametrize("resample", [None, "up", "down"])
def test_biggan_block_skip_rescale_is_one_over_sqrt2(resample: str | None) -> None:
    torch.manual_seed(0)
    block = ResnetBlockBigGAN(8, 8, temb_dim=16, dropout=0.0, resample=resample)
    x, temb = torch.randn(2, 8, 8, 8), torch.randn(2, 16)
    if resample is None:  # identity skip and zero-initialised residual: exactly x / sqrt(2)
        torch.testing.assert_close(block(x, temb), x * (1 / math.sqrt(2.0)), rtol=0, atol=0)
    perturb_zero_params(block)
    rescaled = block(x, temb)
    block.skip_rescale = False
    plain = block(x, temb)
    torch.testing.assert_close(rescaled, plain / math.sqrt(2.0))
    size = {None: 8, "up": 16, "down": 4}[resample]
    assert rescaled.shape == (2, 8, size, size)


def test_attention_skip_rescale_is_one_over_sqrt2() -> None:
    torch.manual_seed(0)
    attn = RescaledAttention(8)
    perturb_zero_params(attn)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(attn(x), AttentionBlock.forward(attn, x) / math.sqrt(2.0))


def test_skip_rescale_off_changes_the_network() -> None:
    torch.manual_seed(0)
    on = NCSNpp(1, 8, channel_mult=(1, 2), **TINY)
    off = NCSNpp(1, 8, channel_mult=(1, 2), skip_rescale=False, **TINY)
    off.load_state_dict(on.state_dict())
    perturb_zero_params(on)
    off.load_state_dict(on.state_dict())
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 10.0])
    assert not torch.allclose(on(x, sigma), off(x, sigma))


# ---------------------------------------------------------------- embedding


def test_fourier_embedding_is_a_fixed_buffer_and_separates_sigmas() -> None:
    torch.manual_seed(0)
    net = build_preset("ncsnpp_small", 1, 8)
    assert "embed.freqs" in net.state_dict()
    assert all("embed" not in name for name, _ in net.named_parameters())
    assert net.embed.freqs.shape == (32,)  # nf frequencies -> 2 * nf features
    sigma = torch.tensor([0.01, 0.01, 1.0, 50.0])
    e1, e2 = net.embed(sigma), net.embed(sigma)
    assert e1.shape == (4, 64)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    torch.testing.assert_close(e1[0], e1[1], rtol=0, atol=0)
    assert (e1[1] - e1[2]).abs().max() > 0.1 and (e1[2] - e1[3]).abs().max() > 0.1
    # Fourier features of log sigma: sigma and 2 sigma differ by log 2 in the argument.
    arg = 2 * math.pi * math.log(0.5) * net.embed.freqs
    torch.testing.assert_close(net.embed(torch.tensor([0.5]))[0, :32], torch.sin(arg))
    # The same weights give the same network output on a reload.
    clone = build_preset("ncsnpp_small", 1, 8)
    clone.load_state_dict(net.state_dict())
    torch.testing.assert_close(clone.embed(sigma), e1, rtol=0, atol=0)


# ---------------------------------------------------------------- whole network


@pytest.mark.parametrize("preset", ["ncsnpp_small", "ddpmpp_small"])
@pytest.mark.parametrize("size", [8, 16, 28, 32])
def test_small_presets_shapes(preset: str, size: int) -> None:
    torch.manual_seed(0)
    net = build_preset(preset, 1, size)
    assert isinstance(net, NCSNpp)
    x = torch.randn(2, 1, size, size)
    label = (
        torch.tensor([0.05, 20.0]) if preset.startswith("ncsnpp") else torch.tensor([3.0, 999.0])
    )
    assert net(x, label).abs().max() == 0  # zero-initialised output conv
    perturb_zero_params(net)
    out = net(x, label)
    assert out.shape == x.shape and out.abs().sum() > 0


def test_small_preset_parameter_counts() -> None:
    assert n_params(build_preset("ncsnpp_small", 1, 8)) == 719_617
    assert n_params(build_preset("ddpmpp_small", 1, 8)) == 715_201


def test_pads_28_with_four_levels_and_attends_at_16() -> None:
    net = NCSNpp(1, 28, channel_mult=(1, 2, 2, 2), **{**TINY, "attn_resolutions": (16,)})
    assert net.padded_size == 32
    perturb_zero_params(net)
    out = net(torch.randn(2, 1, 28, 28), torch.tensor([0.1, 1.0]))
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


def test_out_channels() -> None:
    net = NCSNpp(3, 8, channel_mult=(1, 2), out_channels=6, embedding="sinusoidal", **TINY)
    assert net(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 500.0])).shape == (2, 6, 8, 8)


@pytest.mark.parametrize("preset", ["ncsnpp_small", "ddpmpp_small"])
def test_gradients_reach_every_parameter(preset: str) -> None:
    torch.manual_seed(0)
    net = build_preset(preset, 1, 8)
    zero = [name for name, p in net.named_parameters() if not p.any()]
    assert any("conv_out" in name for name in zero) and any("conv1" in name for name in zero)
    perturb_zero_params(net)
    label = (
        torch.tensor([0.05, 20.0]) if preset.startswith("ncsnpp") else torch.tensor([3.0, 999.0])
    )
    net(torch.randn(2, 1, 8, 8), label).pow(2).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_preset_parameter_counts(name: str) -> None:
    channels, size, expected = PAPER_COUNTS[name]
    net = build_preset(name, channels, size)
    count = n_params(net)
    print(f"{name}: {count:,} parameters")
    assert count == expected
    if "cifar10" in name:  # Score SDE's NCSN++ / DDPM++ CIFAR-10: about 62M parameters
        assert 61_500_000 <= count <= 63_000_000


def test_invalid_arguments_raise_one_clear_error() -> None:
    with pytest.raises(NetworkConfigError, match="resblock"):
        NCSNpp(1, 8, channel_mult=(1, 2), resblock="ddpm", **TINY)
    with pytest.raises(NetworkConfigError, match="progressive_input"):
        NCSNpp(1, 8, channel_mult=(1, 2), progressive_input="output_skip", **TINY)
    with pytest.raises(NetworkConfigError, match="progressive must"):
        NCSNpp(1, 8, channel_mult=(1, 2), progressive="residual", **TINY)
    with pytest.raises(NetworkConfigError, match="attn_resolutions"):
        NCSNpp(1, 8, channel_mult=(1, 2), **{**TINY, "attn_resolutions": (16,)})
    with pytest.raises(NetworkConfigError, match="embedding"):
        NCSNpp(1, 8, channel_mult=(1, 2), embedding="learned", **TINY)
    with pytest.raises(NetworkConfigError, match="image_size"):
        NCSNpp(1, 4, channel_mult=(1, 2, 2, 2), **TINY)
    net = NCSNpp(1, 8, channel_mult=(1, 2), **TINY)
    with pytest.raises(ValueError, match="built for"):
        net(torch.randn(1, 1, 16, 16), torch.ones(1))


@pytest.mark.parametrize("fir", [True, False])
def test_the_skip_pyramids_start_at_zero_and_train_every_parameter(fir: bool) -> None:
    """progressive_input="input_skip", progressive="output_skip" (the CelebA-HQ config), with
    FIR or with average pooling / nearest upsampling."""
    torch.manual_seed(0)
    net = NCSNpp(1, 16, channel_mult=(1, 2, 2), fir=fir, progressive_input="input_skip",
                 progressive="output_skip", **TINY)  # fmt: skip
    assert not hasattr(net, "conv_out") and len(net.pyramid_out) == 3
    assert len(net.pyramid_combine) == 2
    x, sigma = torch.randn(2, 1, 16, 16), torch.tensor([0.05, 20.0])
    assert net(x, sigma).abs().max() == 0  # every output head starts at zero
    perturb_zero_params(net)
    net(x, sigma).pow(2).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_the_output_pyramid_upsamples_the_coarser_heads() -> None:
    """Without FIR, with only the coarsest head (4x4 of a 16x16 image) non-zero, the output is
    that head's map repeated over 4x4 blocks (nearest upsampling, twice)."""
    torch.manual_seed(1)
    net = NCSNpp(1, 16, channel_mult=(1, 2, 2), fir=False, progressive_input="input_skip",
                 progressive="output_skip", **TINY)  # fmt: skip
    perturb_zero_params(net)
    with torch.no_grad():
        for head in net.pyramid_out[1:]:
            head[2].weight.zero_()
            head[2].bias.zero_()
    out = net(torch.randn(2, 1, 16, 16), torch.tensor([0.3, 3.0]))
    coarse = out[..., ::4, ::4]
    assert coarse.abs().min() > 0
    torch.testing.assert_close(out, coarse.repeat_interleave(4, -2).repeat_interleave(4, -1))
