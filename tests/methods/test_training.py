"""The methods' shared base: argument checks, range maps, the divergence guard and its message."""

import pytest
import torch

from diffusion_lab.errors import ConfigError, TrainingDivergedError
from diffusion_lab.methods.training import TrainingModule
from diffusion_lab.stops import naming_last_checkpoint


def module(**kwargs) -> TrainingModule:
    args = {"optimizer": torch.optim.Adam, "data_range": (0.0, 1.0), "model_range": (-1.0, 1.0),
            "warmup_steps": 0, "run_config": None} | kwargs  # fmt: skip
    return TrainingModule(**args)


def test_arguments_are_checked():
    with pytest.raises(ConfigError, match="warmup_steps must be >= 0"):
        module(warmup_steps=-1)
    with pytest.raises(ConfigError, match="both data_range and model_range"):
        module(model_range=None)


def test_range_maps_invert_each_other():
    m = module()
    x = torch.rand(5, 3)
    assert torch.allclose(m.to_model_range(x), 2 * x - 1)
    assert torch.allclose(m.to_data_range(m.to_model_range(x)), x)
    raw = module(data_range=None, model_range=None)
    assert raw.to_model_range(x) is x and raw.to_data_range(x) is x


def test_divergence_names_the_step_and_the_last_checkpoint(tmp_path):
    m = module()
    m.check_finite(torch.tensor(1.0))
    m.stop_if_diverged()  # a finite loss: nothing to stop
    with pytest.raises(TrainingDivergedError) as caught, naming_last_checkpoint(tmp_path):
        m.check_finite(torch.tensor(float("nan")))  # noted on the device, read at the check
        m.stop_if_diverged()
    message = str(caught.value)
    assert "at step 0" in message and "lower the learning rate" in message
    assert "ckpt_path=last" in message and "none written yet" in message
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    with pytest.raises(TrainingDivergedError, match="last good checkpoint: .*last.ckpt"):
        with naming_last_checkpoint(tmp_path):
            m.stop_if_diverged()


def test_validation_samples_are_drawn_with_the_ema_weights(tmp_path):
    import functools

    import lightning as L

    from diffusion_lab.callbacks.ema import WarmupEMA
    from diffusion_lab.data.toy2d import Toy2DDataModule
    from diffusion_lab.losses.dsm import DenoisingScoreMatching
    from diffusion_lab.methods.base import DiffusionMethod
    from diffusion_lab.networks.mlp import MLP
    from diffusion_lab.processes.sde import VESDE
    from diffusion_lab.samplers.ddim import ddim

    data = Toy2DDataModule(name="gmm8", n_train=200, n_val=50, n_test=50, batch_size=50)
    network = MLP(dim=2, hidden=8, depth=1, embed_dim=4, embedding="fourier")
    method = DiffusionMethod(
        network, VESDE(sigma_max=5.0, num_steps=10), DenoisingScoreMatching(),
        functools.partial(ddim, steps=3, progress=False),
        functools.partial(torch.optim.Adam, lr=1e-2), "score", None, None, num_eval_samples=4,
    )  # fmt: skip
    ema = WarmupEMA(decay=0.5)
    raw, seen = [], []

    class RecordRaw(L.Callback):  # after the EMA update of each step: the raw weights
        def on_train_batch_end(self, *args):
            raw.append(network.out.weight.detach().clone())

    def generate(num_samples, *args, **kwargs):
        seen.append((network.out.weight.detach().clone(), raw[-1]))
        return torch.zeros(num_samples, 2), 0

    method.generate_across_ranks = generate
    trainer = L.Trainer(
        max_steps=8, logger=False, enable_checkpointing=False, callbacks=[ema, RecordRaw()],
        num_sanity_val_steps=0, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(method, datamodule=data)
    assert len(seen) == 2  # one validation per epoch of 4 steps
    for during_validation, raw_weights in seen:
        assert not torch.equal(during_validation, raw_weights)  # the averaged ones were in
    ema_weights = ema._average_model.module.model.network.out.weight
    assert torch.equal(seen[-1][0], ema_weights)  # exactly the EMA (copied in at the end)


def test_reconstruction_scores_of_an_identity_denoiser_follow_the_noise_level():
    """A network with zero output under ``x0_residual`` returns x_t itself as x0_hat: its PSNR at
    a VE level sigma is -10 log10(E (sigma z)^2) = -20 log10(sigma) (about 40 dB at 0.01, a bit
    more since the estimate is clamped to [0, 1]), and both scores fall as the noise grows."""
    import functools

    from diffusion_lab.methods.base import DiffusionMethod
    from diffusion_lab.processes.sde import VESDE

    class Zero(torch.nn.Module):
        def forward(self, x, label):
            return torch.zeros_like(x)

    method = DiffusionMethod(
        Zero(), VESDE(sigma_min=0.01, sigma_max=1.0, num_steps=10), None, None,
        functools.partial(torch.optim.Adam, lr=1e-3), "x0_residual", (0.0, 1.0), (0.0, 1.0),
        reconstruction_times=(0.0, 0.5, 1.0),
    )  # fmt: skip
    images = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    scores = method.reconstruction_scores(images)
    assert set(scores) == {f"{m}_t{t}" for m in ("ssim", "psnr") for t in ("0", "0.5", "1")}
    assert 40.0 <= scores["psnr_t0"] <= 41.5
    assert 20.0 <= scores["psnr_t0.5"] <= 21.5  # sigma(0.5) = 0.1 on the geometric grid
    assert scores["psnr_t0"] > scores["psnr_t0.5"] > scores["psnr_t1"]
    assert scores["ssim_t0"] > scores["ssim_t0.5"] > scores["ssim_t1"]
    assert scores == method.reconstruction_scores(images)  # the same noise at every call


def toy_method():
    import functools

    from diffusion_lab.losses.dsm import DenoisingScoreMatching
    from diffusion_lab.methods.base import DiffusionMethod
    from diffusion_lab.networks.mlp import MLP
    from diffusion_lab.processes.sde import VESDE

    network = MLP(dim=2, hidden=8, depth=1, embed_dim=4, embedding="fourier")
    return DiffusionMethod(
        network, VESDE(sigma_max=5.0, num_steps=10), DenoisingScoreMatching(), None,
        functools.partial(torch.optim.Adam, lr=1e-2), "score", None, None,
    )  # fmt: skip


def draws_after_seeding(method, world_size: int, rank: int) -> torch.Tensor:
    """The first training draws of ``rank`` after every rank was seeded with the run's seed."""
    from types import SimpleNamespace

    method._trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
    torch.manual_seed(0)
    method.seed_this_rank()
    return torch.rand(1000)


def test_each_ddp_rank_draws_its_own_noise_and_one_process_keeps_its_stream():
    """Every rank was seeded alike (the same initial weights) and drew the same t and z for
    different data; now each of 4 ranks has its own stream, the same at every start."""
    method = toy_method()
    ranks = [draws_after_seeding(method, 4, rank) for rank in range(4)]
    for i in range(4):
        for j in range(i):
            assert (ranks[i] == ranks[j]).float().mean() < 0.01
    assert torch.equal(ranks[2], draws_after_seeding(method, 4, 2))
    single = draws_after_seeding(method, 1, 0)
    torch.manual_seed(0)
    assert torch.equal(single, torch.rand(1000))


def test_checkpoints_keep_the_cuda_noise_streams(monkeypatch):
    """A resumed GPU run restarted the CUDA noise stream: only the CPU generator was kept.
    (CUDA is simulated: the states are what ``torch.cuda`` returns and is given back.)"""
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    method, checkpoint = toy_method(), {}
    method.on_save_checkpoint(checkpoint)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    method.on_load_checkpoint(checkpoint)
    assert len(restored) == 2 and all(map(torch.equal, restored, states))
    restored.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # another machine
    method.on_load_checkpoint(checkpoint)
    assert restored == []


def _loss_and_gradients(overrides: list[str]):
    """A method built from the config (same seed: same weights), its loss on one seeded batch,
    and the gradients."""
    from diffusion_lab.build import build_datamodule, build_method, compose_config
    from diffusion_lab.run import config_dir

    cfg = compose_config(config_dir(), overrides)
    datamodule, _ = build_datamodule(cfg)
    torch.manual_seed(0)
    method = build_method(cfg, [])
    x = method.to_model_range(datamodule.tensors("train")[0][:32])
    torch.manual_seed(1)
    loss = method.batch_loss(x)
    loss.backward()
    return method, loss.detach(), [p.grad for p in method.parameters()]


@pytest.mark.parametrize(
    "overrides",
    [["+experiment=score_matching_toy2d"],
     pytest.param(["network=unet_small", "network.base_channels=8"], marks=pytest.mark.slow)],
    ids=["mlp on toy2d", "the default run's U-Net"],
)  # fmt: skip
def test_a_compiled_network_gives_the_eager_loss_and_gradients(overrides):
    """``method.compile=true``: torch.compile (inductor, on this CPU) of the network gives the
    eager network's loss and gradients to float tolerance, with the same checkpoint keys."""
    eager, eager_loss, eager_grads = _loss_and_gradients(overrides)
    compiled, loss, grads = _loss_and_gradients([*overrides, "method.compile=true"])
    assert compiled.model.network._compiled_call_impl is not None  # it was compiled
    assert eager.model.network._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    for grad, eager_grad in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [["network.base_channels=8"],
     ["+experiment=sde_ve_cifar10", "data=digits", "network=ncsnpp_small"]],
    ids=["the default run's U-Net", "NCSN++"],
)  # fmt: skip
def test_channels_last_gives_the_same_loss_and_gradients(overrides):
    """``method.channels_last=true``: NHWC weights and inputs, the same values: the loss and
    gradients of the contiguous network to float tolerance, the same checkpoint keys."""
    eager, eager_loss, eager_grads = _loss_and_gradients(overrides)
    nhwc, loss, grads = _loss_and_gradients([*overrides, "method.channels_last=true"])
    convs = [p for p in nhwc.model.network.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # the layout did change
    assert list(nhwc.state_dict()) == list(eager.state_dict())
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    for grad, eager_grad in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)


PRECISION_RUNS = {  # the offline lines of experiments that cover the network families
    "DDPM U-Net": ["network.base_channels=8"],
    "NCSN RefineNet": ["+experiment=ncsn_mnist", "data=digits", "network=refinenet_small"],
    # no corrector: an untrained NCSN++ outputs zero, and Langevin's step (snr |z| / |score|)^2
    # is then infinite in any dtype
    "NCSN++ (VE)": ["+experiment=sde_ve_cifar10", "data=digits", "network=ncsnpp_small",
                    "process.sigma_max=10", "sampler.n_corrector_steps=0"],
    "DDPM++ (VP)": ["+experiment=sde_vp_cifar10", "data=digits", "network=ddpmpp_small"],
    "Soft blur": ["+experiment=soft_blur_cifar10", "data=digits", "data.image_size=16",
                  "network=ncsnpp_small", "process.blur_max=6.0"],
    "MLP on toy2d": ["+experiment=score_matching_toy2d"],
    "Flow matching": ["+experiment=flow_matching_cifar10", "data=digits", "network=unet_small",
                      "network.base_channels=8", "sampler=heun"],
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16-true", "64-true"])
@pytest.mark.parametrize("overrides", PRECISION_RUNS.values(), ids=PRECISION_RUNS.keys())
def test_a_network_in_bfloat16_or_float64_trains_and_samples(overrides, dtype):
    """``trainer.precision=bf16-true`` / ``64-true`` convert the weights and buffers
    (``module.to(dtype)``, as Lightning's plugins do): the loss is computed and backpropagated,
    the network runs in its dtype while the process's arithmetic stays in the batch's, and a
    float64 network samples in float64 (a bfloat16 one in float32). The embeddings used to
    force float32 and crashed at the first step ("mat1 and mat2 ... Float and BFloat16")."""
    from diffusion_lab.build import build_datamodule, build_method, compose_config
    from diffusion_lab.run import config_dir

    cfg = compose_config(config_dir(), [*overrides, "method.num_eval_samples=0"])
    datamodule, _ = build_datamodule(cfg)
    torch.manual_seed(0)
    method = build_method(cfg, []).to(dtype)
    x = method.to_model_range(datamodule.tensors("train")[0][:8])
    if dtype == torch.float64:  # Lightning's 64-true converts the batch too; bf16-true does not
        x = x.double()
    if method.process.needs_fit:
        method.process.fit(x)
    loss = method.batch_loss(x)
    loss.backward()
    assert loss.dtype == x.dtype and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in method.parameters() if p.grad is not None)
    steps = {"steps": 2, "n_steps_each": 1} if "n_steps_each" in cfg.sampler else {"steps": 2}
    samples, _ = method.draw(range(2), datamodule.data_shape, **steps)
    assert samples.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(samples).all()


def test_a_bfloat16_network_embeds_its_noise_level_in_float32():
    """The embedding of t = 999 in a bfloat16 network is float32's, rounded once at the end
    (computed in bfloat16, t * freq would be off by whole radians)."""
    from diffusion_lab.networks.layers import SinusoidalEmbedding, timestep_embedding

    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    embedding = SinusoidalEmbedding(64).to(torch.bfloat16)
    assert torch.equal(embedding(t), timestep_embedding(t, 64).to(torch.bfloat16))
    assert (
        embedding.dtype_anchor.dtype == torch.bfloat16
        and "dtype_anchor" not in embedding.state_dict()
    )


def _default_method():
    """The default run's method (``python -m diffusion_lab.run``) and a batch of its data."""
    from diffusion_lab.build import build_datamodule, build_method, compose_config
    from diffusion_lab.run import config_dir

    cfg = compose_config(config_dir(), [])
    datamodule, _ = build_datamodule(cfg)
    torch.manual_seed(0)
    method = build_method(cfg, [])
    return method, method.to_model_range(datamodule.tensors("train")[0][:8])


def test_a_training_step_waits_for_the_device_once_per_log_interval(monkeypatch):
    """The NaN check read the loss back every step (one host sync per step); the loss itself
    and the check now make none but one every trainer.log_every_n_steps steps."""
    from types import SimpleNamespace

    from helpers.syncs import count_host_syncs

    method, x = _default_method()
    trainer = SimpleNamespace(log_every_n_steps=10, global_step=0)
    method._trainer = trainer
    syncs = count_host_syncs(monkeypatch)
    per_step = []
    for step in range(25):
        trainer.global_step = step
        before = len(syncs)
        method.check_finite(method.batch_loss(x))
        per_step.append(len(syncs) - before)
    monkeypatch.undo()
    assert per_step == [1 if step in (9, 19) else 0 for step in range(25)]


def test_a_nan_loss_stops_the_run_naming_its_step_at_the_next_check():
    from types import SimpleNamespace

    from diffusion_lab.errors import TrainingDivergedError

    method = toy_method()
    trainer = SimpleNamespace(log_every_n_steps=10, global_step=0)
    method._trainer = trainer
    losses = [1.0] * 4 + [float("nan"), float("inf")] + [float("nan")] * 3
    for step, loss in enumerate(losses):  # steps 0..8: no check yet
        trainer.global_step = step
        method.check_finite(torch.tensor(loss))
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 4: lower"):
        method.on_save_checkpoint({})  # the weights are not written over the last good ones
    trainer.global_step = 9
    with pytest.raises(TrainingDivergedError, match="at step 4"):
        method.check_finite(torch.tensor(float("nan")))
    fresh = toy_method()
    fresh._trainer = SimpleNamespace(log_every_n_steps=10, global_step=9)
    fresh.check_finite(torch.tensor(2.0))  # a finite loss at a check passes
    fresh.on_train_end()
