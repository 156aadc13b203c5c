"""``python -m diffusion_lab.convert SRC OUT``: a diffusers DDPM or NCSN++ checkpoint as a run folder.

SRC is a folder that diffusers wrote (``save_pretrained``, or a Hub snapshot such as
google/ddpm-cifar10-32 or google/ncsnpp-celebahq-256): ``config.json`` of a ``UNet2DModel`` and
``diffusion_pytorch_model.safetensors`` (or ``.bin``), either in SRC or in SRC/unet (a pipeline
folder). The model's config decides the method: DDPM's U-Net (positional time embedding) becomes
``method=ddpm`` on the VP process, whose beta schedule, T and prediction type come from
``scheduler_config.json`` in SRC, SRC/scheduler or beside SRC (DDPM's, linear 1e-4 .. 0.02,
T = 1000, epsilon, when there is none); NCSN++ (Skip blocks, Fourier embedding) becomes
``method=score_sde_ve`` on the VE process with the PC sampler, sigma range, N and snr from its
``ScoreSdeVeScheduler`` config (diffusers' defaults when there is none). OUT becomes what
``python -m diffusion_lab.sample OUT`` reads: ``.hydra/overrides.yaml``, the resolved
``config.yaml`` and ``checkpoints/last.ckpt`` (the weights as the EMA weights of a trained
run). A source that our networks or processes cannot represent is refused with one line naming
the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning
import torch
import yaml
from omegaconf import OmegaConf, open_dict

from diffusion_lab.build import build_method, compose_config, load_safely
from diffusion_lab.callbacks.checkpoint import temporary_path, write_durably
from diffusion_lab.errors import ConfigError
from diffusion_lab.networks.from_diffusers import unet_kwargs, unet_state_dict
from diffusion_lab.networks.ncsnpp_from_diffusers import ncsnpp_kwargs, ncsnpp_state_dict
from diffusion_lab.processes.from_diffusers import DEFAULTS, VE_DEFAULTS, ve_settings, vp_settings
from diffusion_lab.run import config_dir
from diffusion_lab.sample import OneLineParser
from diffusion_lab.schema import check_config
from diffusion_lab.stops import one_line_errors

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; an unreadable or malformed file is one ConfigError line."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}): give the file diffusers wrote") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds no JSON object: give the file diffusers wrote")
    return data


def model_folder(src: Path) -> Path:
    """SRC itself or SRC/unet, whichever holds the model's ``config.json``."""
    for folder in (src, src / "unet"):
        if (folder / "config.json").is_file():
            return folder
    what = "does not exist" if not src.exists() else "has no config.json (nor unet/config.json)"
    raise ConfigError(f"{src} {what}: give a folder diffusers' save_pretrained wrote")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model's tensors, from safetensors or from a ``.bin`` loaded with weights_only=True."""
    path = next((folder / n for n in WEIGHTS if (folder / n).is_file()), None)
    if path is None:
        raise ConfigError(f"{folder} has none of {', '.join(WEIGHTS)}: give the model's weights")
    if path.suffix == ".bin":
        return load_safely(path)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConfigError(
            f"reading {path} needs safetensors: pip install 'diffusion_lab[convert]'"
        ) from None
    return load_file(str(path))


def scheduler_config(src: Path, folder: Path) -> dict[str, Any] | None:
    """The first ``scheduler_config.json`` in SRC, SRC/scheduler or beside the model folder."""
    for candidate in (src, src / "scheduler", folder.parent / "scheduler"):
        if (candidate / "scheduler_config.json").is_file():
            return read_json(candidate / "scheduler_config.json")
    return None


def listed(values: list[int]) -> str:
    """A list as a Hydra override value: [1,2,3]."""
    return "[" + ",".join(str(v) for v in values) + "]"


def shape_overrides(network: dict[str, Any], preset: str, data: str) -> list[str]:
    """The data and network overrides that give the ``preset`` network the converted shape."""
    return [
        f"data={data}",
        f"data.image_size={network['image_size']}",
        f"data.channels={network['in_channels']}",
        f"network={preset}",
        f"network.base_channels={network['base_channels']}",
        f"network.channel_mult={listed(network['channel_mult'])}",
        f"network.num_res_blocks={network['num_res_blocks']}",
        f"network.attn_resolutions={listed(network['attn_resolutions'])}",
        f"network.dropout={network['dropout']!r}",
    ]


def ddpm_overrides(network: dict[str, Any], process: dict[str, Any], data: str) -> list[str]:
    """The Hydra overrides of a converted DDPM: the VP process with this U-Net."""
    return [
        *shape_overrides(network, "unet_ddpm_cifar10", data),
        "process=vp",
        f"schedule={process['schedule']}",
        f"process.num_steps={process['num_steps']}",
        f"process.beta_min={process['beta_min']!r}",
        f"process.beta_max={process['beta_max']!r}",
        "method=ddpm",
        f"method.parameterization={process['parameterization']}",
        "loss=epsilon",
    ]


def ncsnpp_overrides(
    network: dict[str, Any], process: dict[str, Any], sampler: dict[str, Any], data: str
) -> list[str]:
    """The Hydra overrides of a converted NCSN++: the VE SDE (geometric sigma) with the PC
    sampler; ``network=ncsnpp_celeba`` has the Skip pyramids, FIR and the Fourier embedding."""
    return [
        *shape_overrides(network, "ncsnpp_celeba", data),
        "process=ve",
        "schedule=geometric",
        f"process.sigma_min={process['sigma_min']!r}",
        f"process.sigma_max={process['sigma_max']!r}",
        f"process.num_steps={process['num_steps']}",
        "method=score_sde_ve",
        "loss=dsm",
        "sampler=pc",
        f"sampler.snr={sampler['snr']!r}",
        f"sampler.steps={sampler['steps']}",
        f"sampler.eps={sampler['eps']!r}",
        f"sampler.n_corrector_steps={sampler['n_corrector_steps']}",
    ]


def write_run(out: Path, overrides: list[str], state: dict[str, torch.Tensor], src: Path) -> int:
    """Build the run's method from ``overrides``, load the network ``state`` into it and write
    the run folder; returns the network's parameter count."""
    cfg = compose_config(config_dir(), overrides)
    with open_dict(cfg):
        cfg.run_dir = str(out)
    check_config(cfg)
    method = build_method(cfg, metrics=[])
    network = method.model.network
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        reason = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ConfigError(f"the weights in {src} do not fit their config.json: {reason}") from None
    checkpoint = {
        "state_dict": method.state_dict(),
        "hyper_parameters": dict(method.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "converted_from": str(src),
    }
    path = out / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write_durably(checkpoint, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"cannot write {path} ({reason}): free disk space or give another OUT"
        ) from None
    (out / ".hydra").mkdir(exist_ok=True)
    (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    return sum(p.numel() for p in network.parameters())


def main(argv: list[str] | None = None) -> None:
    """Convert SRC (a diffusers UNet2DModel folder: DDPM or NCSN++) into the run folder OUT."""
    parser = OneLineParser(
        prog="python -m diffusion_lab.convert", description=__doc__.splitlines()[0]
    )
    parser.add_argument("src", type=Path, help="diffusers folder (config.json + weights)")
    parser.add_argument("out", type=Path, help="the run folder to write (new or empty)")
    parser.add_argument(
        "--data",
        default="image_folder",
        help="the data config of the run (what --evaluate compares with), e.g. cifar10",
    )
    args = parser.parse_args(argv)
    with one_line_errors():
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
            raise ConfigError(f"{args.out} exists and is not an empty folder: give a new OUT")
        folder = model_folder(args.src)
        config = read_json(folder / "config.json")
        scheduler = scheduler_config(args.src, folder)
        found = "its scheduler config" if scheduler is not None else "no scheduler config"
        if config.get("time_embedding_type") == "fourier":
            network = ncsnpp_kwargs(config)
            state = ncsnpp_state_dict(read_weights(folder), network)
            process, sampler = ve_settings(scheduler if scheduler is not None else VE_DEFAULTS)
            overrides = ncsnpp_overrides(network, process, sampler, args.data)
            count = write_run(args.out, overrides, state, args.src)
            what = (
                f"NCSN++, {count:,} parameters; VE process, sigma {process['sigma_min']:g} .. "
                f"{process['sigma_max']:g}, N = {process['num_steps']}; PC sampler, snr "
                f"{sampler['snr']:g} ({found}{'' if scheduler else ', diffusers defaults'})"
            )
        else:
            network = unet_kwargs(config)
            state = unet_state_dict(read_weights(folder), network)
            process = vp_settings(scheduler if scheduler is not None else DEFAULTS)
            overrides = ddpm_overrides(network, process, args.data)
            count = write_run(args.out, overrides, state, args.src)
            what = (
                f"DDPM U-Net, {count:,} parameters; VP process, T = {process['num_steps']}, "
                f"{process['schedule']} ({found}{'' if scheduler else ', DDPM defaults'}), "
                f"{process['parameterization']}"
            )
    print(
        f"wrote {args.out / 'checkpoints' / 'last.ckpt'}: {what}. "
        f"Sample with: python -m diffusion_lab.sample {args.out}"
    )


if __name__ == "__main__":
    main()
