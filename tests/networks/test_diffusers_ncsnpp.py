"""Our NCSN++ against diffusers' port of it (``UNet2DModel`` with Skip blocks), and its converter.

The config is google/ncsnpp-celebahq-256's, written out here from the fields diffusers' NCSN++
conversion gives Score SDE's configs/ve/celebahq_256_ncsnpp_continuous.py (nf 128, ch_mult
(1, 1, 2, 2, 2, 2, 2), 2 blocks per level, attention at 16, Fourier, FIR, skip_rescale, the input
and output skip pyramids): no download. The fields the Skip blocks never read (flip_sin_to_cos,
freq_shift, downsample_padding) are present as a Hub config has them. Every weight of a random
diffusers model, GroupNorm affines included, is mapped into ours
(``networks/ncsnpp_from_diffusers.py``) and the outputs compared on noisy inputs, one sigma per
example. The 256 model is compared at 64x64 (a forward of both takes 2 s on this CPU; at 256x256,
16 times the pixels): the weights are the same, attention then runs at 4x4 instead of 16x16.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli
from helpers.networks import converted_from_diffusers, n_params, random_diffusers_unet
from omegaconf import OmegaConf

from diffusion_lab.errors import ConfigError
from diffusion_lab.networks.ncsnpp import NCSNpp
from diffusion_lab.networks.ncsnpp_from_diffusers import ncsnpp_kwargs, ncsnpp_state_dict
from diffusion_lab.processes.from_diffusers import ve_settings, vp_settings
from diffusion_lab.processes.sde import VESDE

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

SKIP, ATTN_SKIP = "SkipDownBlock2D", "AttnSkipDownBlock2D"
SKIP_UP, ATTN_SKIP_UP = "SkipUpBlock2D", "AttnSkipUpBlock2D"
CELEBAHQ = {  # google/ncsnpp-celebahq-256, config.json
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 128, 256, 256, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": [SKIP] * 4 + [ATTN_SKIP] + [SKIP] * 2,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1.41421356237,
    "norm_eps": 1e-06,
    "norm_num_groups": None,
    "out_channels": 3,
    "sample_size": 256,
    "time_embedding_type": "fourier",
    "up_block_types": [SKIP_UP] * 2 + [ATTN_SKIP_UP] + [SKIP_UP] * 4,
}
TINY = {  # the same block types without attention, small enough for a CPU round trip
    **CELEBAHQ,
    "block_out_channels": [64, 64],
    "down_block_types": [SKIP, SKIP],
    "up_block_types": [SKIP_UP, SKIP_UP],
    "layers_per_block": 1,
    "sample_size": 8,
}
SIGMAS = torch.tensor([0.01, 1.0, 50.0, 1348.0])  # diffusers' VE range, one per example


def converted(model: torch.nn.Module) -> NCSNpp:
    return converted_from_diffusers(model, NCSNpp, ncsnpp_kwargs, ncsnpp_state_dict)


@torch.no_grad()
def relative_differences(model, net, x: torch.Tensor, sigma: torch.Tensor) -> list[float]:
    """Per example, max |theirs - ours| / max |theirs|; diffusers divides by sigma, we do not
    (that is the method's score_over_sigma)."""
    theirs = model(x, sigma).sample
    ours = net(x, sigma) / sigma.reshape(-1, 1, 1, 1)
    return [float((a - b).abs().max() / a.abs().max()) for a, b in zip(theirs, ours, strict=True)]


def noisy(shape: tuple[int, ...], sigma: torch.Tensor, seed: int) -> torch.Tensor:
    """Images in [0, 1] plus sigma-scaled noise, as the sampler feeds the network."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) + sigma.reshape(-1, 1, 1, 1) * torch.randn(
        shape, generator=g
    )


def saved_config(scheduler) -> dict:
    """The scheduler's config as save_pretrained writes it (``_class_name`` included)."""
    return json.loads(scheduler.to_json_string())


def test_celebahq_ncsnpp_equals_diffusers_at_64x64() -> None:
    with torch.device("meta"):
        full = diffusers.UNet2DModel.from_config(CELEBAHQ)
        ours = NCSNpp(**ncsnpp_kwargs(CELEBAHQ))
    # diffusers counts the 128 fixed Fourier frequencies as a parameter; ours are a buffer
    assert n_params(full) == n_params(ours) + 128 == 65_574_549
    kwargs = ncsnpp_kwargs(CELEBAHQ)
    assert kwargs["channel_mult"] == [1, 1, 2, 2, 2, 2, 2] and kwargs["attn_resolutions"] == [16]

    model = random_diffusers_unet({**CELEBAHQ, "sample_size": 64}, seed=2)
    net = converted(model)
    x = noisy((4, 3, 64, 64), SIGMAS, seed=3)
    # float32: rounding alone, up to 8.7e-6 measured at sigma = 0.01 (where |output| is small)
    assert max(relative_differences(model, net, x, SIGMAS)) < 5e-5
    # float64: the same function to the last digits (7e-14 measured)
    model, net = model.double(), net.double()  # two examples: float64 convolutions are slow
    assert max(relative_differences(model, net, x[:2].double(), SIGMAS[:2].double())) < 1e-10


def test_the_converted_weights_are_diffusers_own_tensors() -> None:
    """Every diffusers tensor lands in exactly one of ours, unchanged but for the attention's
    q, k, v rows stacked into one 1x1 conv (its values are checked through the outputs above)."""
    model = random_diffusers_unet(TINY, seed=7)
    state = ncsnpp_state_dict(model.state_dict(), ncsnpp_kwargs(TINY))
    net = NCSNpp(**ncsnpp_kwargs(TINY))
    assert state.keys() == net.state_dict().keys()
    torch.testing.assert_close(state["embed.freqs"], model.time_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(state["pyramid_out.1.2.weight"], model.conv_out.weight)
    torch.testing.assert_close(
        state["down_blocks.0.conv0.weight"], model.down_blocks[0].resnets[0].conv1.weight
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attention_head_dim", 8),  # 16 heads at 128 channels
        ("norm_num_groups", 32),
        ("mid_block_scale_factor", 1),
        ("center_input_sample", True),
        ("in_channels", 1),
        ("up_block_types", [SKIP_UP] * 3 + [ATTN_SKIP_UP] + [SKIP_UP] * 3),
        ("down_block_types", [SKIP] * 4 + ["AttnDownBlock2D"] + [SKIP] * 2),
        ("block_out_channels", [64, 64, 128, 128, 128, 128, 128]),  # attention at 64 channels
        ("sample_size", 96),
        ("some_future_field", 1),
    ],
)
def test_refuses_what_our_ncsnpp_cannot_represent(field: str, value) -> None:
    config = {**CELEBAHQ, field: value}
    if field == "in_channels":
        config["out_channels"] = value
    if field == "block_out_channels":
        # attention at the first level: diffusers' 32 groups, ours min(64 // 4, 32) = 16
        config = {**config, "down_block_types": [ATTN_SKIP] + [SKIP] * 6,
                  "up_block_types": [SKIP_UP] * 6 + [ATTN_SKIP_UP]}  # fmt: skip
    with pytest.raises(ConfigError, match=f"field {field} ="):
        ncsnpp_kwargs(config)


def test_the_group_counts_agree_wherever_the_converter_accepts() -> None:
    """Where ncsnpp_kwargs accepts a width, diffusers' GroupNorms and ours have the same groups
    (the check reads diffusers' rule; this compares with diffusers' modules themselves)."""
    for channels in ([64, 64], [128, 256], [32, 96]):
        config = {**TINY, "block_out_channels": channels}
        try:
            kwargs = ncsnpp_kwargs(config)
        except ConfigError:
            continue
        with torch.device("meta"):
            theirs = diffusers.UNet2DModel.from_config(config)
            ours = NCSNpp(**kwargs)

        def groups(m):
            return sorted(
                (g.num_channels, g.num_groups)
                for g in m.modules()
                if isinstance(g, torch.nn.GroupNorm)
            )

        assert groups(theirs) == groups(ours)


def test_the_ve_scheduler_gives_diffusers_sigmas() -> None:
    """diffusers' sigma at its timesteps t (1 down to sampling_eps) is our VE SDE's sigma(t)."""
    scheduler = diffusers.ScoreSdeVeScheduler(
        num_train_timesteps=300, sigma_min=0.02, sigma_max=380.0, snr=0.17, sampling_eps=1e-4
    )
    process_kw, sampler_kw = ve_settings(saved_config(scheduler))
    assert sampler_kw == {"snr": 0.17, "steps": 300, "eps": 1e-4, "n_corrector_steps": 1}
    process = VESDE(**process_kw)
    scheduler.set_timesteps(300)
    scheduler.set_sigmas(300)
    t = scheduler.timesteps.double()
    _, sigma = process.marginal_coefficients(t)
    torch.testing.assert_close(sigma, scheduler.sigmas.double(), rtol=1e-5, atol=0)


def test_a_scheduler_of_the_other_process_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs a ScoreSdeVeScheduler"):
        ve_settings(saved_config(diffusers.DDPMScheduler()))
    with pytest.raises(ConfigError, match="is a ScoreSdeVeScheduler"):
        vp_settings(saved_config(diffusers.ScoreSdeVeScheduler()))
    with pytest.raises(ConfigError, match="field sigma_max = 0.001"):
        ve_settings({"sigma_max": 0.001})


def test_convert_then_sample_from_the_run_folder(tmp_path: Path) -> None:
    """As a user would: save_pretrained, python -m diffusion_lab.convert, then
    python -m diffusion_lab.sample with two samplers; the converted network is diffusers'."""
    from diffusion_lab.sample import load_run

    src, out = tmp_path / "src", tmp_path / "run"
    model = random_diffusers_unet(TINY, seed=4)
    model.save_pretrained(src)
    diffusers.ScoreSdeVeScheduler(num_train_timesteps=40, sigma_max=20.0, snr=0.12).save_pretrained(
        src
    )

    def entry(module: str, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", f"diffusion_lab.{module}", *map(str, args)]
        return cli.run(command, capture_output=True, text=True, timeout=300)

    done = entry("convert", src, out)
    assert done.returncode == 0, done.stderr[-3000:]
    count = n_params(model) - model.time_proj.weight.numel()  # a buffer here
    assert f"NCSN++, {count:,} parameters" in done.stdout and "N = 40" in done.stdout
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.process.sigma_max == 20.0 and saved.process.num_steps == 40
    assert saved.method.parameterization == "score_over_sigma" and saved.sampler.snr == 0.12
    # PC: a predictor and a corrector step per step, then the Tweedie denoise; Heun: 2 per step
    # but the last
    for sampler, name, nfe in (("pc", "predictor_corrector", 9), ("heun", "edm_sampler", 7)):
        drawn = entry("sample", out, f"sampler={sampler}", "sampler.steps=4",
                      "sampler.progress=false", "--num-samples", 2)  # fmt: skip
        assert drawn.returncode == 0, drawn.stderr[-3000:]
        assert json.loads(drawn.stdout)["nfe"] == nfe
        samples = torch.load(out / f"samples_{name}.pt", weights_only=True)
        assert samples.shape == (2, 3, 8, 8) and bool(torch.isfinite(samples).all())
        assert samples.min() >= 0 and samples.max() <= 1 and samples.std() > 0

    _, method, _ = load_run(out, [])
    net = method.model.network.eval()
    loaded = diffusers.UNet2DModel.from_pretrained(src).eval()
    sigma = torch.tensor([0.01, 3.0, 20.0])
    x = noisy((3, 3, 8, 8), sigma, seed=5)
    assert max(relative_differences(loaded, net, x, sigma)) < 2e-5
