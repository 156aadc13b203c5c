"""The schedule and sampler config groups: composition, the schedule-kind check and multirun sweeps."""

import json
import os
import sys

import pytest
from helpers import CONF, cli
from hydra import compose, initialize_config_dir

from diffusion_lab.build import instantiate
from diffusion_lab.errors import ConfigError
from diffusion_lab.schedules import beta_schedule, sigma_schedule
from diffusion_lab.schedules.beta import cosine_betas, linear_betas

SIGMA = ("geometric", "linear", "cosine", "squared_cosine", "sigmoid")
BETA = ("beta_linear", "beta_cosine")
QUIET = ["trainer=debug", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
         "sampler.progress=false", "method.num_eval_samples=4", "final_samples=4"]  # fmt: skip


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _multirun(tmp_path, *overrides):
    return cli.run(
        [sys.executable, "-m", "diffusion_lab.run", "-m", *QUIET, *overrides,
         f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )  # fmt: skip


def test_the_group_holds_seven_schedules():
    assert sorted(p.stem for p in (CONF / "schedule").glob("*.yaml")) == sorted(SIGMA + BETA)


@pytest.mark.parametrize(
    ("process", "default"),
    [("vp", "beta_linear"), ("subvp", "beta_linear"), ("ve", "geometric"),
     ("ve_ncsn", "geometric"), ("ve_ncsnv2", "geometric"), ("ve_ncsnv2_cifar10", "geometric"),
     ("ve_ncsnv2_celeba", "geometric")],
)  # fmt: skip
def test_each_process_chooses_its_kind_of_schedule_by_default(process, default):
    cfg = _compose([f"process={process}"])
    assert cfg.hydra.runtime.choices.schedule == default and cfg.process.schedule == default


def test_the_root_default_is_the_vp_process_with_linear_betas():
    cfg = _compose([])
    assert cfg.hydra.runtime.choices.process == "vp" and cfg.process.schedule == "beta_linear"
    assert (
        instantiate(cfg.process).discrete_betas.tolist() == linear_betas(1e-4, 0.02, 1000).tolist()
    )


@pytest.mark.parametrize("name", SIGMA)
def test_a_sigma_schedule_choice_sets_the_ve_levels(name):
    cfg = _compose(["+experiment=ncsn_mnist", "data=digits", "network=refinenet_small",
                    f"schedule={name}"])  # fmt: skip
    assert cfg.process.schedule == name
    process = instantiate(cfg.process)
    expected = sigma_schedule(name, 1.0, 0.01, 10)
    assert process.sigmas.tolist() == pytest.approx(expected.tolist(), rel=1e-12)


@pytest.mark.parametrize("name", BETA)
def test_a_beta_schedule_choice_sets_the_vp_betas(name):
    cfg = _compose([f"schedule={name}"])
    assert cfg.process.schedule == name
    betas = instantiate(cfg.process).discrete_betas
    assert betas.tolist() == beta_schedule(name, 1000, 0.1, 20.0).tolist()
    direct = linear_betas(1e-4, 0.02, 1000) if name == "beta_linear" else cosine_betas(1000)
    assert betas.tolist() == pytest.approx(direct.tolist(), rel=1e-12)


def test_sigma_cosine_and_beta_cosine_are_different_schedules():
    sigmas = instantiate(_compose(["process=ve", "schedule=cosine"]).process).sigmas
    betas = instantiate(_compose(["process=vp", "schedule=beta_cosine"]).process).discrete_betas
    expected = sigma_schedule("cosine", 50.0, 0.01, 1000)
    assert sigmas.tolist() == pytest.approx(expected.tolist(), rel=1e-12)
    assert betas.tolist() == cosine_betas(1000).tolist()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["schedule=cosine"], "schedule 'cosine' is a sigma schedule; process VPSDE / SubVPSDE "
         "needs a beta schedule: schedule=beta_linear or beta_cosine"),
        (["process=subvp", "schedule=geometric"], "'geometric' is a sigma schedule"),
        (["process=ve_ncsn", "schedule=beta_linear"], "schedule 'beta_linear' is a beta schedule; "
         "process VESDE needs a sigma schedule: schedule=geometric, linear, cosine, "
         "squared_cosine or sigmoid"),
        (["process=ve", "process.schedule=beta_cosine"], "'beta_cosine' is a beta schedule"),
    ],
)  # fmt: skip
def test_a_schedule_of_the_wrong_kind_is_a_config_error(overrides, message):
    cfg = _compose(overrides)
    with pytest.raises(ConfigError) as error:
        instantiate(cfg.process)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_wrong_kind_stops_the_run_before_training_with_one_line(tmp_path):
    result = cli.run(
        [sys.executable, "-m", "diffusion_lab.run", *QUIET, "schedule=cosine",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "diffusion_lab: error: schedule 'cosine' is a sigma schedule; process VPSDE / SubVPSDE "
        "needs a beta schedule: schedule=beta_linear or beta_cosine"
    )
    assert not (tmp_path / "checkpoints").exists()


def test_every_sampler_config_has_steps():
    for path in sorted((CONF / "sampler").glob("*.yaml")):
        cfg = _compose([f"sampler={path.stem}"])
        assert "steps" in cfg.sampler, path.name


def test_the_noise_schedule_sweep_runs(tmp_path):
    result = _multirun(
        tmp_path, "+experiment=ncsn_mnist", "data=digits", "network=refinenet_small",
        "sampler.n_steps_each=1", "schedule=" + ",".join(SIGMA),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for k, name in enumerate(SIGMA):
        resolved = (tmp_path / str(k) / "config.yaml").read_text()
        assert f"schedule: {name}\n" in resolved
        metrics = json.loads((tmp_path / str(k) / "final_metrics.json").read_text())
        assert metrics["nfe"] == 10 and metrics["num_samples"] == 4  # L = 10 levels, T = 1


def test_the_sampler_sweep_runs_with_the_default_config(tmp_path):
    samplers = ("ddim", "ancestral", "pc", "ode", "heun", "dpm_solver_pp", "edm_stochastic")
    # no validation sampling: the final samples carry the NFE (PC's 2001 evaluations twice
    # took half the test's time)
    result = _multirun(tmp_path, "network.base_channels=8", "method.num_eval_samples=0",
                       "sampler=" + ",".join(samplers))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    nfe = {}
    for k, name in enumerate(samplers):
        nfe[name] = json.loads((tmp_path / str(k) / "final_metrics.json").read_text())["nfe"]
    # each with its own steps: DDIM 50, ancestral every one of the 1000 levels (VP: no final
    # denoising evaluation), PC 1000 predictor + 1000 corrector steps + the final denoising,
    # Heun and Alg. 2 18 steps (2 x 18 - 1), DPM-Solver++ 20
    assert (nfe["ddim"], nfe["ancestral"], nfe["pc"]) == (50, 1000, 2001)
    assert (nfe["heun"], nfe["edm_stochastic"], nfe["dpm_solver_pp"]) == (35, 35, 20)
    assert nfe["ode"] > 0  # the adaptive solver's own count


def test_an_adaptive_sampler_refuses_a_step_count(tmp_path):
    result = _multirun(tmp_path, "sampler=ode", "sampler.steps=5")
    assert result.returncode == 2
    assert "chooses its own steps" in result.stderr.strip().splitlines()[-1]


def test_the_slurm_launcher_requeues_and_fits_the_multinode_trainer():
    """hydra/launcher=slurm_gpu with trainer=ddp_multinode: one task and one GPU per rank on
    each node; a timed-out job is requeued (max_num_timeout was 0: never), with the
    partition / account keys there to set. Composed by Hydra with the submitit plugin."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm_gpu", "trainer=ddp_multinode",
                      "hydra.launcher.partition=gpu"], return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.max_num_timeout == 3 and launcher.signal_delay_s > 0
    assert launcher.partition == "gpu" and "account" in launcher
