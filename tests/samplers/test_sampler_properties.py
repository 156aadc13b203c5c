"""Every sampler config in conf/sampler on every process config it admits, driven by the exact
score of a Gaussian: NFE equals the model's calls for any steps (hypothesis), the data's mean
and std are kept within the Monte-Carlo bound at a generous step count, and float64 and
bfloat16 inputs come back in their own dtype with the model never seeing another."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from helpers import CONF
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from hypothesis import given
from hypothesis import strategies as st

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.sde import SDE
from diffusion_lab.samplers.base import check_sampler
from diffusion_lab.utils import time_dtype

SAMPLER_CONFIGS = sorted(path.stem for path in (CONF / "sampler").glob("*.yaml"))
PROCESS_CONFIGS = ("ve", "vp", "subvp", "flow", "ve_ncsn")
#: Processes ending in pure noise (alpha(1) = 0): a plain score gives no clean image there, so
#: their model always brings its exact ``denoised``.
FLOWS = ("flow",)
MU, S = 0.3, 0.5  # the data: N(MU, S^2) in one dimension
#: Generous settings: each well past where its discretisation error falls below the
#: Monte-Carlo bound of N_SAMPLES draws (measured at 20,000 draws: within 3.3 SE).
GENEROUS = {
    "ancestral": {"steps": 500},
    "annealed_langevin": {},  # ve_ncsn: 10 levels x 100 steps
    "ddim": {"steps": 200},
    "dpm_solver_pp": {"steps": 100},
    "dpm_solver_pp_3m": {"steps": 100},
    "unipc": {"steps": 100},
    "edm_stochastic": {"steps": 100},
    "euler": {"steps": 400},
    "heun": {"steps": 100},
    "ode": {},
    "pc": {"steps": 500},
    "sde_dpm_solver_pp": {"steps": 200},
    "sde_dpm_solver_pp_heun": {"steps": 200},
    "soft_momentum": {},  # every level (first order: at 250 of 1000 the PF error is 6 SE)
    "soft_naive": {},
    "soft_pf_momentum": {},
}
N_SAMPLES = 2000


@functools.cache
def built(group: str, name: str):
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=[f"{group}={name}"])
    return instantiate(cfg[group])


def admitted_pairs() -> list[tuple[str, str]]:
    """(sampler, process) pairs that check_sampler admits with the sampler's own steps; the
    10-level ve_ncsn only for annealed Langevin (NCSN's own sampler)."""
    pairs = []
    for sampler in SAMPLER_CONFIGS:
        for process in PROCESS_CONFIGS:
            if (process == "ve_ncsn") != (sampler == "annealed_langevin"):
                continue
            try:
                check_sampler(built("sampler", sampler), built("process", process))
            except ConfigError:
                continue
            pairs.append((sampler, process))
    return pairs


PAIRS = admitted_pairs()


def gaussian_score(process: SDE):
    """grad log p_t of x_t = alpha x0 + sigma z with x0 ~ N(MU, S^2): -(x - alpha MU) / v,
    v = alpha^2 S^2 + sigma^2, computed in the dtype of x."""

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (c.to(x.dtype)[:, None] for c in process.marginal_coefficients(t))
        return -(x - alpha * MU) / (alpha**2 * S**2 + sigma**2)

    return score


class Recording:
    """A model that counts its calls (score and clean-image estimate alike) and records the
    dtypes of what it is handed."""

    def __init__(self, process: SDE, with_denoised: bool = False) -> None:
        self.score, self.process = gaussian_score(process), process
        self.calls, self.x_dtypes, self.t_dtypes, self.devices = 0, set(), set(), set()
        if with_denoised:
            self.denoised = self._denoised

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.x_dtypes.add(x.dtype)
        self.t_dtypes.add(t.dtype)
        self.devices |= {x.device, t.device}
        return self.score(x, t)

    def _denoised(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] = MU + alpha S^2 / v (x - alpha MU), finite where alpha = 0."""
        self.calls += 1
        self.x_dtypes.add(x.dtype)
        self.t_dtypes.add(t.dtype)
        self.devices |= {x.device, t.device}
        alpha, sigma = (c.to(x.dtype)[:, None] for c in self.process.marginal_coefficients(t))
        return MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * MU)


def test_the_pairs_cover_every_sampler_config():
    assert {sampler for sampler, _ in PAIRS} == set(SAMPLER_CONFIGS)
    assert len(PAIRS) >= 3 * (len(SAMPLER_CONFIGS) - 1)


@st.composite
def nfe_cases(draw: st.DrawFn) -> tuple[str, str, dict, bool]:
    sampler, process = draw(st.sampled_from(PAIRS))
    levels = len(built("process", process).level_times())
    options: dict = {}
    if sampler != "ode":  # the adaptive solver takes no steps
        options["steps"] = draw(st.integers(1, min(levels, 40)))
    if sampler == "annealed_langevin":
        options["n_steps_each"] = draw(st.integers(1, 3))
    if sampler == "pc":
        options["n_corrector_steps"] = draw(st.integers(0, 2))
    if sampler in ("ddim", "dpm_solver_pp", "dpm_solver_pp_3m", "unipc", "euler", "heun",
                   "edm_stochastic"):  # fmt: skip
        options["grid"] = draw(st.sampled_from(["levels", "uniform", "logsnr", "karras"]))
    if sampler == "ddim":
        options["eta"] = draw(st.sampled_from([0.0, 1.0]))
    return sampler, process, options, process in FLOWS or draw(st.booleans())


@given(nfe_cases())
def test_nfe_equals_the_model_calls_for_any_steps(case):
    sampler, process_name, options, with_denoised = case
    process = built("process", process_name)
    model = Recording(process, with_denoised)
    x = process.prior_sampling((8, 1), generator=torch.Generator().manual_seed(0))
    result = built("sampler", sampler)(model, process, x, progress=False, **options)
    assert result.nfe == model.calls > 0
    assert bool(torch.isfinite(result.samples).all())


@pytest.mark.parametrize("sampler, process_name", PAIRS)
def test_the_exact_gaussian_score_keeps_mean_and_std(sampler: str, process_name: str):
    """Mean within 4.5 standard errors S / sqrt(n), std within 4.5 of S / sqrt(2n). The Naive
    Sampler is checked for its mean only: it loses the spread by design (Daras et al. sec. 4:
    x0_hat is a conditional mean, re-corrupted with fresh noise at every step)."""
    process = built("process", process_name)
    generator = torch.Generator().manual_seed(0)
    x = process.prior_sampling((N_SAMPLES, 1), generator=generator).double()
    run = built("sampler", sampler)
    model = Recording(process, with_denoised=process_name in FLOWS)
    samples = run(model, process, x, generator=generator, progress=False,
                  **GENEROUS[sampler]).samples  # fmt: skip
    mean_error = abs(float(samples.mean()) - MU) / (S / N_SAMPLES**0.5)
    std_error = abs(float(samples.std()) - S) / (S / (2 * N_SAMPLES) ** 0.5)
    assert mean_error < 4.5, (float(samples.mean()), mean_error)
    if sampler != "soft_naive":
        assert std_error < 4.5, (float(samples.std()), std_error)


def one_pair_per_sampler() -> list[tuple[str, str]]:
    chosen: dict[str, str] = {}
    for sampler, process in PAIRS:
        chosen.setdefault(sampler, process)
    return sorted(chosen.items())


def sample_on(device: str, sampler: str, process_name: str, dtype: torch.dtype):
    """``sampler`` on ``process_name`` from a prior draw in ``dtype`` on ``device``, 8 steps,
    with its trajectory: (the result, the recording model, the initial state)."""
    process = copy.deepcopy(built("process", process_name)).to(device)  # the cached one stays
    model = Recording(process, with_denoised=process_name in FLOWS)
    generator = torch.Generator(device).manual_seed(0)
    x = process.prior_sampling((64, 1), generator=generator, device=device).to(dtype)
    options = {k: v for k, v in GENEROUS[sampler].items() if k != "steps"}
    if sampler != "ode":
        options["steps"] = 8
    if sampler == "annealed_langevin":
        options["n_steps_each"] = 5
    result = built("sampler", sampler)(model, process, x, generator=generator, progress=False,
                                       return_trajectory=sampler != "ode", **options)  # fmt: skip
    return result, model, x


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sampler, process_name", one_pair_per_sampler())
def test_samples_keep_the_input_dtype_and_the_model_sees_no_other(sampler, process_name, dtype):
    """A bfloat16 or float64 initial state: the samples and the trajectory come back in it,
    the model is only handed x in it and times in float32 (bfloat16) or float64, and the
    result is finite (a bfloat16 time, or a schedule looked up in bfloat16, crashed every
    sampler with an index out of range)."""
    result, model, x = sample_on("cpu", sampler, process_name, dtype)
    assert result.samples.dtype == dtype
    assert {state.dtype for state in result.trajectory} <= {dtype}
    assert model.x_dtypes == {dtype}
    assert model.t_dtypes == {time_dtype(x)}
    assert bool(torch.isfinite(result.samples).all())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sampler, process_name", one_pair_per_sampler())
def test_every_sampler_stays_on_the_gpu(sampler, process_name, dtype):
    """On CUDA: the model is handed only tensors on the input's device, the samples and the
    trajectory come back there in the input's dtype, finite."""
    result, model, x = sample_on("cuda", sampler, process_name, dtype)
    assert model.devices == {x.device}
    assert result.samples.device == x.device and result.samples.dtype == dtype
    assert {(s.device, s.dtype) for s in result.trajectory} <= {(x.device, dtype)}
    assert bool(torch.isfinite(result.samples).all())


@pytest.mark.parametrize("sampler, options", [("ancestral", {}), ("ddim", {"eta": 1.0})])
def test_the_last_transition_into_ve_noisy_t0_keeps_its_noise(sampler, options):
    """Found by reading: the VE ancestral and DDIM (eta > 0) steps dropped the noise of their
    last transition although Tweedie's step follows (x at t = 0 was then no draw of p_0).
    Data N(0.3, 0.005^2) under sigma_min = 0.01: without denoising x(0) has std
    sqrt(s^2 + sigma_min^2) = 0.01118 (0.01077 with the noise dropped, 7 SE off); denoised,
    s^2 / sqrt(s^2 + sigma_min^2) = 0.002236."""
    from diffusion_lab.processes.sde import VESDE

    process, mu, s, n = VESDE(sigma_min=0.01, sigma_max=1.0, num_steps=1000), 0.3, 0.005, 20000

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -(x - mu) / (s**2 + process.std(t).to(x)[:, None] ** 2)

    x = process.prior_sampling((n, 1), generator=torch.Generator().manual_seed(0)).double()
    run = built("sampler", sampler)
    for denoise, expected in (
        (False, (s**2 + 0.01**2) ** 0.5),
        (True, s**2 / (s**2 + 0.01**2) ** 0.5),
    ):
        generator = torch.Generator().manual_seed(1)
        samples = run(score, process, x, steps=100, generator=generator, progress=False,
                      denoise=denoise, **options).samples  # fmt: skip
        assert abs(float(samples.std()) - expected) < 4 * expected / (2 * n) ** 0.5, denoise


@pytest.mark.parametrize("sampler, process_name", [p for p in PAIRS if p[0] != "ode"])
def test_no_sampler_reads_a_value_back_from_the_device(sampler, process_name):
    """Sampling on the meta device (shapes without values: reading a value back raises, and so
    does mixing in a tensor of another device), 8 steps: no host sync and no tensor made on the
    wrong device anywhere in the loop. The EDM samplers read alpha(t) back from the device at
    every model evaluation, and every sampler the final denoise's sigma once. (``ode`` runs its
    solver on the host by design: scipy's solve_ivp.)"""
    process = copy.deepcopy(built("process", process_name)).to("meta")
    model = Recording(process, with_denoised=process_name in FLOWS)
    x = torch.empty(64, 1, device="meta")
    options = {k: v for k, v in GENEROUS[sampler].items() if k != "steps"}
    options["steps"] = 8
    if sampler == "annealed_langevin":
        options["n_steps_each"] = 5
    result = built("sampler", sampler)(model, process, x, progress=False, **options)
    assert result.samples.device.type == "meta" and model.devices == {x.device}
    assert model.calls > 0
