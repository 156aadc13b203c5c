"""Rectified flow's reflow step (diffusion_lab.methods.reflow): the pairs are the sampler's
images of their own noise, drawn once at ``reflow_step``, then the training batches; they
travel in checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffusion_lab.build import build_datamodule, build_method, compose_config
from diffusion_lab.errors import ConfigError
from diffusion_lab.methods.reflow import ReflowMethod
from diffusion_lab.run import config_dir

TOY = ["+experiment=rectified_flow_reflow", "data=toy2d", "network=mlp", "network.hidden=32",
       "method.model_range=null", "method.reflow_step=7", "method.num_pairs=24",
       "+method.sample_batch_size=10", "method.num_eval_samples=0", "sampler=euler",
       "sampler.steps=4", "sampler.progress=false"]  # fmt: skip


def toy_method(*extra: str) -> tuple[ReflowMethod, object]:
    cfg = compose_config(config_dir(), [*TOY, *extra])
    datamodule, _ = build_datamodule(cfg)
    datamodule.setup("fit")
    torch.manual_seed(0)
    method = build_method(cfg, [])
    method._trainer = SimpleNamespace(datamodule=datamodule, callbacks=[], global_step=0,
                                      num_training_batches=10)  # fmt: skip
    return method, datamodule


def test_the_pairs_are_drawn_at_the_reflow_step_as_the_samplers_images_of_their_noise():
    method, _ = toy_method()
    batch = torch.zeros(4, 2)
    method.on_train_batch_start(batch, 0)
    assert method.pairs is None  # step 0 < reflow_step
    method._trainer.global_step = 7
    method.on_train_batch_start(batch, 0)
    noise, data = method.pairs
    assert noise.shape == data.shape == (24, 2)
    with torch.no_grad():
        again = method.sampler(method.model, method.process, noise.clone(), progress=False)
    torch.testing.assert_close(data, again.samples)
    evaluation_noise, _ = method.sample_from_prior(range(24), (2,))
    assert not torch.allclose(noise, evaluation_noise)  # not the evaluation samples' streams
    drawn = method.pairs
    method.on_train_batch_start(batch, 1)
    assert method.pairs is drawn  # drawn once


def test_after_the_reflow_the_loss_trains_on_the_pairs(monkeypatch):
    method, _ = toy_method()
    method._trainer.global_step = 7
    method.on_train_batch_start(torch.zeros(4, 2), 0)
    seen = []
    monkeypatch.setattr(method, "loss_fn", lambda model, x0, noise: seen.append((x0, noise)) or
                        x0.sum())  # fmt: skip
    method.batch_loss(torch.full((5, 2), 99.0))
    ((x0, noise),) = seen
    assert x0.shape == noise.shape == (5, 2)
    pairs = torch.cat(method.pairs, dim=1)  # (z, x) rows
    for row in torch.cat([noise, x0], dim=1):
        assert (pairs == row).all(dim=1).any()  # each (z, x) is one of the pairs


def test_the_pairs_travel_in_the_checkpoint():
    method, _ = toy_method()
    method._trainer.global_step = 7
    method.on_train_batch_start(torch.zeros(4, 2), 0)
    checkpoint: dict = {}
    method.on_save_checkpoint(checkpoint)
    restored, _ = toy_method()
    restored.on_load_checkpoint(checkpoint)
    for mine, theirs in zip(method.pairs, restored.pairs, strict=True):
        torch.testing.assert_close(mine, theirs)


def test_reflow_needs_the_flow_matching_loss():
    with pytest.raises(ConfigError, match="method=reflow trains on .* loss=flow_matching"):
        toy_method("loss=epsilon")
