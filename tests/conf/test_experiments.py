"""Every experiment composes, and builds offline with the overrides its '# offline:' line gives."""

import pytest
import torch
from helpers import CONF
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from diffusion_lab import run
from diffusion_lab.build import build_datamodule, build_method
from diffusion_lab.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def offline_overrides(name: str) -> list[str]:
    overrides = run.offline_overrides(name)
    assert overrides is not None, f"experiment {name} has no '# offline:' line"
    return overrides.split()


def built_offline(name: str, run_dir) -> tuple:
    """The experiment's method and DataModule from its offline line, two of its training
    examples (data range), and the process fitted to them where it needs fitting."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={name}", *offline_overrides(name)])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    datamodule, _ = build_datamodule(cfg)
    method = build_method(cfg, [])
    datamodule.setup("fit")
    train = datamodule.dataset("train")
    items = [train[i] for i in range(2)]
    x = torch.stack([item[0] if isinstance(item, (list, tuple)) else item for item in items])
    if method.process.needs_fit:  # on two examples only (training fits on up to 10,000)
        method.process.fit(method.to_model_range(x))
    return method, datamodule, x, [item[1] for item in items if isinstance(item, (list, tuple))]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_offline_and_its_network_reads_its_data(name, tmp_path):
    """Built from its offline line, the experiment's network maps two of its own training
    examples (model range, t = 0.5) to a finite output as its model reads it: a score of the
    data's shape (the noisy classifier: one logit per class)."""
    method, datamodule, x, _ = built_offline(name, tmp_path)
    assert tuple(x.shape[1:]) == tuple(datamodule.data_shape)
    t = torch.full((2,), 0.5)
    out = method.model(method.to_model_range(x), t)
    expected = x.shape if name != "noisy_classifier_digits" else (2, 10)
    assert out.shape == expected and torch.isfinite(out).all()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_losses_read_no_value_back_from_the_device(name, tmp_path):
    """The training loss of every experiment on the meta device (shapes without values:
    reading one back raises, as does a tensor made on another device): its loss, process and
    time draws make no host sync and create nothing off the batch's device."""
    from diffusion_lab.methods.classifier import NoisyClassifierMethod
    from diffusion_lab.methods.fp_embedding import ScoreEmbeddingMethod

    method, _, x, second = built_offline(name, tmp_path)
    method, x, second = method.to("meta"), x.to("meta"), torch.tensor(second, device="meta")
    if isinstance(method, NoisyClassifierMethod):  # (images, labels): cross-entropy
        loss, _ = method.noisy_loss((x, second))
    elif isinstance(method, ScoreEmbeddingMethod):  # (images, image index): eq. 24
        loss = method.images_loss(method.to_model_range(x), second, step=0)
    else:
        loss = method.batch_loss(method.to_model_range(x))
    assert loss.device.type == "meta" and loss.ndim == 0


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
