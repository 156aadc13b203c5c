"""Our DDPM U-Net against diffusers' port of it (``UNet2DModel``), and the diffusers converter.

The configs are the published ones of google/ddpm-cifar10-32 and google/ddpm-celebahq-256
(their Hub ``config.json``, copied here: no download). Every weight of a random diffusers model,
GroupNorm affines included, is mapped into ours (``networks/from_diffusers.py``) and the outputs
compared on random inputs, one t per example. The 256 model is compared at 64x64, the only
reduction (a forward of both at 64x64 takes 3 s on this CPU, at 256x256 16 times the pixels): the
weights are the same, attention then runs at 4x4 where the 256 model attends at 16x16 (the same
layers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONF, cli
from helpers.networks import converted_from_diffusers, n_params, random_diffusers_unet
from omegaconf import OmegaConf

from diffusion_lab.errors import ConfigError
from diffusion_lab.networks import UNet
from diffusion_lab.networks.from_diffusers import unet_kwargs, unet_state_dict
from diffusion_lab.processes.from_diffusers import vp_settings
from diffusion_lab.processes.sde import VPSDE

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

DDPM_FIELDS = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "time_embedding_type": "positional",
}
CIFAR10 = {  # google/ddpm-cifar10-32, config.json
    **DDPM_FIELDS,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "sample_size": 32,
}
CELEBAHQ = {  # google/ddpm-celebahq-256, config.json
    **DDPM_FIELDS,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "sample_size": 256,
}
TINY = {  # the same block types, small enough for a CPU round trip (>= 128 channels: 32 groups)
    **CIFAR10,
    "block_out_channels": [128, 128],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "sample_size": 8,
}
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def converted(model: torch.nn.Module) -> UNet:
    return converted_from_diffusers(model, UNet, unet_kwargs, unet_state_dict)


@torch.no_grad()
def relative_difference(model, net, x: torch.Tensor, t: torch.Tensor) -> float:
    """max |theirs - ours| / max |theirs|."""
    theirs = model(x, t).sample
    return float((theirs - net(x, t.float())).abs().max() / theirs.abs().max())


def test_cifar10_unet_equals_diffusers() -> None:
    model = random_diffusers_unet(CIFAR10)
    net = converted(model)
    assert n_params(model) == n_params(net) == 35_746_307  # the paper's "35.7M"
    kwargs = unet_kwargs(CIFAR10)  # our preset's architecture
    preset = OmegaConf.to_container(OmegaConf.load(CONF / "network" / "unet_ddpm_cifar10.yaml"))
    shape = ("base_channels", "channel_mult", "num_res_blocks", "attn_resolutions")
    assert {f: kwargs[f] for f in shape} == {f: preset[f] for f in shape}

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert relative_difference(model, net, x, torch.tensor([0, 1, 500, 999])) < 1e-5  # 1.4e-6

    legacy = {}  # the attention names of checkpoints saved by older diffusers
    for key, value in model.state_dict().items():
        for new, old in LEGACY.items():
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert any(".proj_attn." in key for key in legacy)
    mapped = unet_state_dict(model.state_dict(), kwargs)
    from_legacy = unet_state_dict(legacy, kwargs)
    assert mapped.keys() == from_legacy.keys()
    assert all(torch.equal(mapped[k], from_legacy[k]) for k in mapped)


def test_celebahq_unet_equals_diffusers_at_64x64() -> None:
    with torch.device("meta"):
        full = diffusers.UNet2DModel.from_config(CELEBAHQ)
        ours = UNet(**unet_kwargs(CELEBAHQ))
    assert n_params(full) == n_params(ours) == 113_673_219
    assert unet_kwargs(CELEBAHQ)["channel_mult"] == [1, 1, 2, 2, 4, 4]
    assert unet_kwargs(CELEBAHQ)["attn_resolutions"] == [16]

    model = random_diffusers_unet({**CELEBAHQ, "sample_size": 64}, seed=2)
    net = converted(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert relative_difference(model, net, x, torch.tensor([10, 900])) < 1e-5  # 1.4e-6


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_scheduler_gives_the_same_chain(schedule: str) -> None:
    """On the grid t = (k + 1) / T the VP process has diffusers' alphas_cumprod[k], and a
    network sees diffusers' timestep k."""
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=500, beta_start=2e-4, beta_end=0.03, beta_schedule=schedule
    )
    settings = vp_settings(dict(scheduler.config))
    assert settings.pop("parameterization") == "eps"
    process = VPSDE(**settings)
    k = torch.tensor([0, 1, 137, 250, 499])
    t = (k + 1).double() / 500
    betas = scheduler.betas.double()
    torch.testing.assert_close(process.discrete_betas, betas, rtol=1e-6, atol=0)  # float32's
    alpha, _ = process.marginal_coefficients(t)
    expected = scheduler.alphas_cumprod[k].double()  # a float32 cumprod: 1.3e-5 off at k = 499
    torch.testing.assert_close(alpha**2, expected, rtol=5e-5, atol=0)
    torch.testing.assert_close(process.noise_label(t), k.double())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attention_head_dim", 8),  # 32 heads at 256 channels
        ("norm_num_groups", 16),
        ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
        ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
        ("block_out_channels", [128, 192, 256, 256]),
        ("flip_sin_to_cos", True),
        ("downsample_padding", 1),
        ("resnet_time_scale_shift", "scale_shift"),
        ("out_channels", 6),
        ("sample_size", 36),
        ("class_embed_type", "timestep"),
        ("some_future_field", 1),
    ],
)
def test_refuses_what_our_unet_cannot_represent(field: str, value) -> None:
    with pytest.raises(ConfigError, match=f"field {field} ="):
        unet_kwargs({**CIFAR10, field: value})


def test_a_missing_field_has_diffusers_default() -> None:
    """diffusers reads a config without freq_shift as 0 (not DDPM's 1): refused, not guessed."""
    config = {k: v for k, v in CIFAR10.items() if k != "freq_shift"}
    with pytest.raises(ConfigError, match="field freq_shift = 0"):
        unet_kwargs(config)


@pytest.mark.parametrize(
    ("field", "value"),
    [("prediction_type", "v_prediction"), ("beta_schedule", "scaled_linear"),
     ("trained_betas", [0.1, 0.2]), ("rescale_betas_zero_snr", True)],
)  # fmt: skip
def test_refuses_a_scheduler_the_vp_process_cannot_represent(field: str, value) -> None:
    with pytest.raises(ConfigError, match=f"field {field} ="):
        vp_settings({field: value})


def test_convert_then_sample_from_the_run_folder(tmp_path: Path) -> None:
    """As a user would: save_pretrained, python -m diffusion_lab.convert, then
    python -m diffusion_lab.sample with two samplers; the converted network is diffusers'."""
    from diffusion_lab.sample import load_run

    src, out = tmp_path / "src", tmp_path / "run"
    model = random_diffusers_unet(TINY, seed=4)
    model.save_pretrained(src)
    diffusers.DDPMScheduler(num_train_timesteps=500, beta_end=0.015).save_pretrained(src)

    def entry(module: str, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", f"diffusion_lab.{module}", *map(str, args)]
        return cli.run(command, capture_output=True, text=True, timeout=300)

    done = entry("convert", src, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4,509,571 parameters" in done.stdout and "T = 500" in done.stdout
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.process.num_steps == 500 and saved.process.beta_max == pytest.approx(7.5)
    assert saved.method.parameterization == "eps"
    for sampler, name in (("ddim", "ddim"), ("ancestral", "ancestral")):
        drawn = entry("sample", out, f"sampler={sampler}", "sampler.steps=4",
                      "sampler.progress=false", "--num-samples", 2)  # fmt: skip
        assert drawn.returncode == 0, drawn.stderr[-3000:]
        assert json.loads(drawn.stdout)["nfe"] == 4
        samples = torch.load(out / f"samples_{name}.pt", weights_only=True)
        assert samples.shape == (2, 3, 8, 8) and bool(torch.isfinite(samples).all())
        assert samples.min() >= 0 and samples.max() <= 1 and samples.std() > 0

    _, method, _ = load_run(out, [])
    net = method.model.network.eval()
    loaded = diffusers.UNet2DModel.from_pretrained(src).eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    assert relative_difference(loaded, net, x, torch.tensor([0, 123, 499])) < 1e-5  # 1.0e-6


def test_convert_refuses_in_one_line(tmp_path: Path, capsys) -> None:
    from diffusion_lab.convert import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**TINY, "attention_head_dim": 8}))
    with pytest.raises(SystemExit) as stop:
        main([str(src), str(tmp_path / "run")])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "field attention_head_dim = 8" in lines[0]
    assert not (tmp_path / "run").exists()


def test_reads_a_pipeline_folder_with_bin_weights(tmp_path: Path) -> None:
    """A pipeline's layout (unet/, scheduler/) and weights saved as .bin (weights_only)."""
    from diffusion_lab.convert import model_folder, read_weights, scheduler_config

    model = random_diffusers_unet(TINY, seed=6)
    model.save_pretrained(tmp_path / "unet", safe_serialization=False)
    diffusers.DDIMScheduler(num_train_timesteps=700).save_pretrained(tmp_path / "scheduler")
    folder = model_folder(tmp_path)
    assert folder == tmp_path / "unet"
    state = read_weights(folder)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    for src in (tmp_path, folder):  # the pipeline folder, or its unet/ given as SRC
        assert scheduler_config(src, model_folder(src))["num_train_timesteps"] == 700
