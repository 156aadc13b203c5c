"""Every experiment composes, and builds offline with the overrides its '# offline:' line gives."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from diffusion_lab import run
from diffusion_lab.build import build_datamodule, build_method
from diffusion_lab.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def offline_overrides(name: str) -> list[str]:
    overrides = run.offline_overrides(name)
    assert overrides is not None, f"experiment {name} has no '# offline:' line"
    return overrides.split()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_offline(name, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={name}", *offline_overrides(name)])
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path)
    datamodule, metrics = build_datamodule(cfg)
    method = build_method(cfg, [])
    assert datamodule.channels >= 1 and method.process is not None


def test_ddpm_cifar10_holds_the_paper_settings():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=ddpm_cifar10"])
    assert cfg.process.num_steps == 1000
    assert cfg.process.beta_min / cfg.process.num_steps == pytest.approx(1e-4)
    assert cfg.process.beta_max / cfg.process.num_steps == pytest.approx(0.02)
    assert cfg.optimizer.lr == 2e-4 and cfg.callbacks.ema.decay == 0.9999
    assert cfg.network.base_channels == 128 and list(cfg.network.channel_mult) == [1, 2, 2, 2]
    assert cfg.data._target_.endswith("CIFAR10DataModule")


def test_a_method_is_given_only_the_parts_it_declares(tmp_path):
    """The noisy classifier declares no sampler or loss, so neither is built: a sampler that
    its VP process cannot serve (refused for a diffusion method) does not stop it."""
    overrides = ["sampler=annealed_langevin", f"hydra.run.dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        classifier = compose("config", ["+experiment=noisy_classifier_digits", *overrides])
        diffusion = compose("config", overrides)
    for cfg in (classifier, diffusion):
        with open_dict(cfg):
            cfg.run_dir = str(tmp_path)
    method = build_method(classifier, [])
    assert type(method).__name__ == "NoisyClassifierMethod" and not hasattr(method, "sampler")
    with pytest.raises(ConfigError, match="annealed_langevin needs a process"):
        build_method(diffusion, [])
