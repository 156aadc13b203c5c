"""Instance norm++ against a direct computation; RefineNet shapes and noise conditioning."""

import pytest
import torch

from diffusion_lab.networks.layers import NetworkConfigError
from diffusion_lab.networks.normalization import InstanceNormPlusPlus
from diffusion_lab.networks.refinenet import RefineNet
from diffusion_lab.processes.sde import VESDE
from diffusion_lab.schedules import sigma_schedule
from diffusion_lab.score_model import ScoreModel


def _direct_cin_pp(x, gamma, beta, alpha, eps=1e-5):
    """z_k = gamma_k (x_k - mu_k)/s_k + beta_k + alpha_k (mu_k - m)/v, written out per channel."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        mus = [x[b, k].mean() for k in range(x.shape[1])]
        m = sum(mus) / len(mus)
        v = (sum((mu - m) ** 2 for mu in mus) / len(mus) + eps).sqrt()
        for k, mu in enumerate(mus):
            s = (((x[b, k] - mu) ** 2).mean() + eps).sqrt()
            out[b, k] = gamma[b, k] * (x[b, k] - mu) / s + beta[b, k] + alpha[b, k] * (mu - m) / v
    return out


def test_conditional_instance_norm_pp_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    layer = InstanceNormPlusPlus(5, num_classes=3)
    with torch.no_grad():
        layer.embed.weight.copy_(torch.randn(3, 15, generator=g))
    x = (
        3 * torch.randn(4, 5, 6, 7, generator=g, dtype=torch.float64)
        + torch.arange(5.0)[:, None, None]
    )
    y = torch.tensor([0, 2, 1, 2])
    params = layer.embed.weight.detach().double()[y]
    gamma, alpha, beta = params[:, :5], params[:, 5:10], params[:, 10:]
    expected = _direct_cin_pp(x, gamma, beta, alpha)
    torch.testing.assert_close(layer.double()(x, y), expected, rtol=1e-10, atol=1e-10)


def test_unconditional_instance_norm_pp_matches_the_formula_and_keeps_channel_means():
    g = torch.Generator().manual_seed(1)
    layer = InstanceNormPlusPlus(4).double()
    x = (
        torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
        + torch.tensor([0.0, 1, 2, 5])[:, None, None]
    )
    w = layer.weight.detach()
    gamma, alpha, beta = (p.expand(2, 4) for p in (w[:4], w[4:8], w[8:]))
    out = layer(x)
    torch.testing.assert_close(out, _direct_cin_pp(x, gamma, beta, alpha), rtol=1e-10, atol=1e-10)
    # Plain instance norm would make every channel mean beta_k; "++" keeps their order.
    means = out.mean(dim=(2, 3))[0]
    assert bool((means[1:] > means[:-1]).all())
    with pytest.raises(ValueError, match="no level index"):
        layer(x, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("size", [8, 28, 32, 64])
@pytest.mark.parametrize("conditional", [True, False])
def test_refinenet_output_shapes(size, conditional):
    net = RefineNet(3, ngf=4, conditional=conditional, num_levels=10)
    x = torch.rand(2, 3, size, size)
    assert net(x, torch.tensor([0, 9])).shape == x.shape


def test_deeper_layout_with_two_subsamplings():
    net = RefineNet(
        1, ngf=4, channel_mult=(1, 2, 2, 4, 4), dilations=(1, 1, 1, 2, 4), conditional=False
    )
    x = torch.rand(2, 1, 64, 64)
    assert net(x, torch.ones(2)).shape == x.shape


def test_level_index_is_the_nearest_level_of_the_table():
    # The conditional RefineNet is given the level index; the model takes it from the process.
    net = RefineNet(1, ngf=4, num_levels=10)
    process = VESDE(sigma_max=1.0, sigma_min=0.01, num_steps=10, schedule="cosine")
    model = ScoreModel(net, process, "score")
    table = sigma_schedule("cosine", 1.0, 0.01, 10)
    times = 1 - torch.arange(10) / 9  # level i (0 = sigma_1) sits at t = 1 - i / (L - 1)
    torch.testing.assert_close(process.std(times), table.float())
    assert model.label(times).tolist() == list(range(10))
    # sigma(t) is log-linear between levels, so the midpoint in t is the midpoint in log sigma
    between = (times[3] + times[4]) / 2 + torch.tensor([1e-3, -1e-3])  # just above / below
    sigma_mid = (table[3] * table[4]).sqrt().float()
    assert bool((process.std(between)[0] > sigma_mid) & (process.std(between)[1] < sigma_mid))
    assert model.label(between).tolist() == [3, 4]


def test_conditioning_changes_the_output_only_in_the_conditional_network():
    x = torch.rand(2, 1, 8, 8)
    for conditional in (True, False):
        torch.manual_seed(0)
        net = RefineNet(1, ngf=4, conditional=conditional, num_levels=10)
        a, b = net(x, torch.full((2,), 0)), net(x, torch.full((2,), 9))
        assert torch.equal(a, b) is not conditional


def test_bad_configurations_are_config_errors():
    with pytest.raises(NetworkConfigError):
        RefineNet(1, ngf=4, conditional=True)  # no number of levels
    with pytest.raises(NetworkConfigError):
        RefineNet(1, ngf=4, channel_mult=(1, 2), dilations=(1, 1, 2), conditional=False)
