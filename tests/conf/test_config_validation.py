"""Bad configs, overrides and checkpoints stop every entry point with one line, exit code 2,
before training: the schema (types, ranges, unknown keys with a did-you-mean), options in any
order, and checkpoints loaded only with weights_only=True and checked against the model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli
from omegaconf import open_dict

from diffusion_lab.build import compose_config
from diffusion_lab.errors import ConfigError
from diffusion_lab.run import config_dir
from diffusion_lab.schema import check_config

SMALL = ["trainer=debug", "method.num_eval_samples=0",
         "final_samples=0", "sampler.progress=false", "trainer.enable_progress_bar=false"]  # fmt: skip


WIDTH = "network.base_channels=8"  # the trained fixture's


def entry(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return cli.run([sys.executable, "-m", f"diffusion_lab.{module}", *args],
                   capture_output=True, text=True, timeout=timeout, env=os.environ.copy())  # fmt: skip


def assert_one_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "diffusion_lab: error:" in line]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder with checkpoints/last.ckpt after 2 steps."""
    run_dir = tmp_path_factory.mktemp("trained")
    result = entry("run", *SMALL, WIDTH, "trainer.max_steps=2", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


class Payload:
    """A pickle that runs a shell command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "payload": Payload(marker)}, path)
    return path


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.lr=abc"], "optimizer.lr must be a valid number, got 'abc'"),
        (["-m", "optimizer.lr=1e-3,abc"], "optimizer.lr must be a valid number, got 'abc'"),
    ],
)
def test_bad_overrides_stop_the_run_with_one_line(tmp_path, overrides, message):
    result = entry("run", *overrides, "trainer=debug", f"hydra.run.dir={tmp_path}",
                   f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert_one_line(result, message)
    assert not list(tmp_path.rglob("checkpoints"))


def checked_up_front(monkeypatch, capsys, *args: str) -> subprocess.CompletedProcess:
    """``python -m diffusion_lab.run args`` in this process, which its check of every job's
    config must end before Hydra starts (the two cases above run it as a new process)."""
    from diffusion_lab import run

    def started(*_args, **_kwargs):
        raise AssertionError("the up-front check let the run start")

    monkeypatch.setattr(run, "main", started)
    monkeypatch.setattr(sys, "argv", ["diffusion_lab.run", *args])
    with pytest.raises(SystemExit) as stop:
        run.cli()
    output = capsys.readouterr()
    return subprocess.CompletedProcess(args, stop.value.code, output.out, output.err)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_step=10"], "trainer has no key max_step: did you mean trainer.max_steps?"),
        (["-m", "trainer.max_step=1,2"], "did you mean trainer.max_steps?"),
        (["+trainer.max_step=10"], "trainer has no key max_step: did you mean trainer.max_steps?"),
        (["sampler=ddmi"], "sampler has no option ddmi: did you mean sampler=ddim?"),
        (["trainer.max_steps=-5"], "trainer.max_steps must be >= -1, got -5"),
        (["final_samples=-1"], "final_samples must be >= 0, got -1"),
        (
            ["+experiment=noisy_classifier_digits", "final_samples=4"],
            "takes no sampler and draws no samples: set final_samples=0",
        ),
        (["-m", "sampler.steps=0,5"], "sampler.steps must be >= 1, got 0"),
        (["-m", "sampler.steps=5,0"], "sampler.steps must be >= 1, got 0"),
        (
            ["float32_matmul_precision=tf32"],
            "float32_matmul_precision must be 'highest', 'high' or 'medium', got 'tf32'",
        ),
    ],
)
def test_bad_overrides_in_any_job_stop_before_hydra_starts(
    monkeypatch, capsys, tmp_path, overrides, message
):
    result = checked_up_front(monkeypatch, capsys, *overrides, "trainer=debug",
                              f"hydra.run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert_one_line(result, message)
    assert not list(tmp_path.iterdir())


def test_every_config_option_fits_the_schema():
    """Each option of each group (experiments with their offline overrides) passes the schema."""
    conf = Path(config_dir())
    for group in sorted(p for p in conf.iterdir() if p.is_dir() and p.name != "hydra"):
        for option in sorted(group.rglob("*.yaml")):  # process/blur_schedule/ too
            if group.name == "experiment":
                offline = [
                    line
                    for line in option.read_text().splitlines()
                    if line.startswith("# offline:")
                ]
                overrides = [
                    f"+experiment={option.stem}",
                    *(w for w in offline[0].split()[2:] if "=" in w),
                ]
            elif group.name == "data" and option.stem == "toy2d":
                overrides = ["data=toy2d", "network=mlp"]
            elif group.name == "schedule" and not option.stem.startswith("beta"):
                overrides = ["process=ve", f"schedule={option.stem}"]
            elif option.stem == "noisy_classifier":  # draws no samples
                overrides = ["method=noisy_classifier", "final_samples=0"]
            elif option.parent.name == "blur_schedule":  # the soft blur process's settings
                overrides = ["process=soft_blur", f"process/blur_schedule={option.stem}"]
            else:
                overrides = [f"{group.name}={option.stem}"]
            cfg = compose_config(str(conf), overrides)
            with open_dict(cfg):
                cfg.run_dir = "run"
            check_config(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=abc", "seed must be a valid integer, got 'abc'"),
        ("method.num_eval_samples=-1", "method.num_eval_samples must be >= 0, got -1"),
        ("callbacks.ema.decay=1.5", "callbacks.ema.decay must be < 1.0, got 1.5"),
        ("+optimizer.betas=[0.9,1.5]", "optimizer.betas must be < 1.0, got [0.9, 1.5]"),
        ("network.base_channels=8.5", "network.base_channels must be a valid integer, got 8.5"),
        (
            "+network.base_channel=8",
            "network has no key base_channel: did you mean network.base_channels?",
        ),
        ("data=toy2d", "network.image_size must be a valid integer, got None"),
    ],
)
def test_schema_names_the_full_key(override, message):
    cfg = compose_config(config_dir(), [override])
    with open_dict(cfg):
        cfg.run_dir = "run"
    with pytest.raises(ConfigError) as caught:
        check_config(cfg)
    assert message in str(caught.value)


def test_schema_names_the_field_of_a_settings_block():
    """A bad value inside a typed block (a dataclass argument) is named by its own key."""
    cfg = compose_config(config_dir(), ["process=soft_blur", "process.blur_schedule.num_levels=-3"])
    with open_dict(cfg):
        cfg.run_dir = "run"
    with pytest.raises(ConfigError) as caught:
        check_config(cfg)
    assert str(caught.value) == "process.blur_schedule.num_levels must be >= 2, got -3"


@pytest.mark.parametrize("order", ["options first", "overrides first"])
def test_sample_takes_options_and_overrides_in_any_order(trained, order):
    options, overrides = ["--num-samples", "4"], ["sampler.steps=2"]
    args = [*options, *overrides] if order == "options first" else [*overrides, *options]
    result = entry("sample", str(trained), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(trained / "samples_dpm_solver_pp.pt", weights_only=True).shape[0] == 4


def test_sample_misspelt_key_gets_a_did_you_mean(trained):
    result = entry("sample", str(trained), "sampler.step=2", "--num-samples", "4")
    assert_one_line(result, "sampler has no key step: did you mean sampler.steps?")


def test_malicious_checkpoint_never_runs_through_any_entry_point(trained, tmp_path):
    """A pickle with an os.system payload, as ckpt_path=, as a run's last.ckpt for sample and as
    its samples.pt for evaluate: one line each, and the payload never runs."""
    marker = tmp_path / "payload_ran"
    run_dir = tmp_path / "run"
    result = entry("run", *SMALL, WIDTH, f"ckpt_path={malicious(tmp_path / 'evil.ckpt', marker)}",
                   f"hydra.run.dir={run_dir}")  # fmt: skip
    assert_one_line(result, "holds objects other than tensors and plain values")
    assert not (run_dir / "checkpoints").exists()
    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / ".hydra").mkdir()
    (copy / ".hydra" / "overrides.yaml").write_text(
        (trained / ".hydra" / "overrides.yaml").read_text()
    )
    (copy / "config.yaml").write_text((trained / "config.yaml").read_text())
    malicious(copy / "checkpoints" / "last.ckpt", marker)
    assert_one_line(entry("sample", str(copy), "--num-samples", "2"), "holds objects other than")
    malicious(copy / "samples.pt", marker)
    assert_one_line(entry("evaluate", str(copy)), "holds objects other than")
    assert not marker.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([WIDTH, "network.base_channels=16"], "network.base_channels"),
        (["network=refinenet_small"], "trained with another method or network"),
        ([WIDTH, "process=ve", "loss=dsm", "method=score_sde_ve"], "was trained with process"),
    ],
)
def test_checkpoint_of_another_network_or_family_stops_with_one_line(
    trained, tmp_path, overrides, message
):
    ckpt = trained / "checkpoints" / "last.ckpt"
    result = entry("run", *SMALL, *overrides, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}")
    assert_one_line(result, message)
    assert f"checkpoint {ckpt}" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_sample_checks_the_checkpoint_against_the_network(trained):
    result = entry("sample", str(trained), "network.base_channels=16", "--num-samples", "2")
    assert_one_line(result, "model.network.temb.0.weight is [32, 8] there and [64, 16] here")


def test_a_target_that_names_nothing_is_one_line():
    cfg = compose_config(config_dir(), ["network._target_=diffusion_lab.networks.unet.UNett"])
    with open_dict(cfg):
        cfg.run_dir = "run"
    with pytest.raises(ConfigError) as caught:
        check_config(cfg)
    assert str(caught.value) == (
        "network._target_ names nothing importable: diffusion_lab.networks.unet.UNett"
    )


@pytest.mark.parametrize("precision", ["high", "highest"])
def test_the_float32_matmul_precision_is_set_where_the_method_is_built(precision):
    """``float32_matmul_precision=high`` (TF32 on GPUs that have it) reaches torch when a run
    or ``sample`` builds its method; the default keeps exact float32."""
    from diffusion_lab.build import build_method

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        overrides = (
            [WIDTH] if precision == "highest" else [WIDTH, f"float32_matmul_precision={precision}"]
        )
        build_method(compose_config(config_dir(), overrides), [])
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(before)
