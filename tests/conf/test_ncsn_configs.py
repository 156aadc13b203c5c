"""The NCSN / NCSNv2 experiments compose with Hydra and build their process, network and sampler."""

import pytest
import torch
from helpers import CONF
from hydra import compose, initialize_config_dir

from diffusion_lab.build import instantiate
from diffusion_lab.networks.refinenet import RefineNet
from diffusion_lab.processes.sde import VESDE
from diffusion_lab.schedules import sigma_schedule
from diffusion_lab.score_model import ScoreModel

EXPERIMENTS = ("ncsn_mnist", "ncsn_cifar10", "ncsnv2_cifar10", "ncsnv2_celeba")
OFFLINE = {
    "ncsn_mnist": ["data=digits", "network=refinenet_small"],
    "ncsn_cifar10": ["data=digits", "network=refinenet_small"],
    "ncsnv2_cifar10": ["data=digits", "network=refinenet_small", "process=ve_ncsnv2"],
    "ncsnv2_celeba": ["data=digits", "network=refinenet_small", "process=ve_ncsnv2"],
}
# (sigma_1, L, T, eps, parameterization, conditional, lr, EMA decay, max_steps, data target)
PAPER = {
    "ncsn_mnist": (1.0, 10, 100, 2e-5, "score", True, 1e-3, None, 200000, "MNIST"),
    "ncsn_cifar10": (1.0, 10, 100, 2e-5, "score", True, 1e-3, None, 200000, "CIFAR10"),
    "ncsnv2_cifar10": (
        50.0,
        232,
        5,
        6.2e-6,
        "score_over_sigma",
        False,
        1e-4,
        0.999,
        300000,
        "CIFAR10",
    ),
    "ncsnv2_celeba": (
        90.0,
        500,
        5,
        3.3e-6,
        "score_over_sigma",
        False,
        1e-4,
        0.999,
        210000,
        "CelebA",
    ),
}


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_holds_the_paper_settings(name):
    cfg = _compose([f"+experiment={name}"])
    sigma_1, levels, steps, eps, param, conditional, lr, ema, max_steps, data = PAPER[name]
    assert (cfg.process.sigma_max, cfg.process.sigma_min, cfg.process.num_steps) == (
        sigma_1,
        0.01,
        levels,
    )
    assert cfg.process.schedule == "geometric"
    assert (cfg.sampler.n_steps_each, cfg.sampler.step_lr) == (steps, eps)
    assert cfg.method.parameterization == param and list(cfg.method.model_range) == [0.0, 1.0]
    assert cfg.network.conditional is conditional and cfg.network.ngf in (64, 128)
    assert cfg.loss.time_sampling == "levels" and cfg.loss.weighting == "variance"
    assert cfg.optimizer.lr == lr and cfg.data.batch_size == 128
    assert (cfg.callbacks.ema.decay if cfg.callbacks.ema else None) == ema
    assert cfg.trainer.max_steps == max_steps and data in cfg.data._target_


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_offline_and_samples(name):
    cfg = _compose([f"+experiment={name}", *OFFLINE[name]])
    process = instantiate(cfg.process)
    network = instantiate(cfg.network)
    sampler = instantiate(cfg.sampler)
    assert isinstance(process, VESDE) and isinstance(network, RefineNet)
    assert network.conditional is name.startswith("ncsn_")
    x = torch.rand(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    result = sampler(lambda x, t: -x, process, x, steps=3, n_steps_each=1, progress=False)
    assert result.samples.shape == x.shape and result.nfe == 3 + int(cfg.sampler.denoise)
    assert network(x, process.sigmas[:2].float()).shape == x.shape


@pytest.mark.parametrize("schedule", ["geometric", "linear", "cosine", "squared_cosine", "sigmoid"])
def test_the_schedule_is_one_override_and_reaches_the_network_table(schedule):
    cfg = _compose(
        ["+experiment=ncsn_mnist", *OFFLINE["ncsn_mnist"], f"process.schedule={schedule}"]
    )
    process, network = instantiate(cfg.process), instantiate(cfg.network)
    torch.testing.assert_close(process.sigmas, sigma_schedule(schedule, 1.0, 0.01, 10))
    model = ScoreModel(network, process, cfg.method.parameterization)
    assert model.label(process.level_times().flip(0)).tolist() == list(range(10))


@pytest.mark.parametrize("name", ["ncsn_cifar10", "ncsnv2_cifar10", "ncsnv2_celeba"])
def test_paper_networks_build(name):
    cfg = _compose([f"+experiment={name}"])
    network = instantiate(cfg.network)
    size = cfg.data.image_size
    with torch.no_grad():
        out = network(torch.rand(1, 3, size, size), torch.ones(1))
    assert out.shape == (1, 3, size, size)
