"""Soft Diffusion samplers (Daras et al. 2022): Naive (Alg. 1), Momentum (Alg. 2, eq. 16) and
probability-flow Momentum (App. B, eq. 43-44).

They run on any process of the core contract, x_t = mean(x_0, t) + std(t) z with a linear mean
C_t x_0 (``processes.corruption.LinearCorruption``: a blur, a mask; the SDEs, where
C_t = alpha(t) I), reading only ``process.mean``, ``process.std``, ``process.level_times``
(through :func:`soft_grid`) and ``process.prior_sampling``, and the model's clean-image estimate
x0_hat = ``model.denoised(x_t, t)`` (for the ``x0_residual`` parameterisation phi(x_t, t) + x_t,
eq. 10). A plain score function serves only on an SDE, where Tweedie's formula gives x0_hat; on
a corruption without an inverse the score fixes only C_t x0_hat, not the C_{t-dt} x0_hat that
every step needs, so a model with ``denoised`` is required there (a clear error says so).

Each step costs one network evaluation (at t); ``denoise=True`` adds one at the last level and
returns x0_hat there (sigma_0 = 0.01 on the soft process, not 0), like the other samplers' final
denoising step. Writing e = C_t x0_hat - x_t (Alg. 2's eps_hat_t) and using eq. 8,
score = e / sigma_t^2:

Naive (Alg. 1)::

    x_{t-dt} = C_{t-dt} x0_hat + sigma_{t-dt} eta

Momentum (Alg. 2; eq. 16 is the same update in one line). The text of Alg. 2 is::

    y  = C_t x0_hat,  e = y - x_t,
    z  = x_t - ((sigma_{t-dt}^2 - sigma_t^2) / sigma_t^2) e + sqrt(sigma_t^2 - sigma_{t-dt}^2) eta,
    x_{t-dt} = z + C_{t-dt} x0_hat - y.

Derivation and sign check. For one image alpha the corruption solves the SDE (eq. 13)
dx = C'_t alpha dt + sqrt(d sigma^2/dt) dw, whose reverse is (eq. 14)
dx = [C'_t alpha - (d sigma^2/dt) grad log q_t] dt + sqrt(d sigma^2/dt) dw_bar. Euler-Maruyama
from t down to t - dt, with the derivatives replaced by finite differences, is eq. 15::

    x_{t-dt} - x_t = (C_{t-dt} - C_t) alpha - (sigma_{t-dt}^2 - sigma_t^2) grad log q_t
                     + sqrt(sigma_t^2 - sigma_{t-dt}^2) eta.

With alpha -> x0_hat and grad log q_t -> e / sigma_t^2 (eq. 8) this is Alg. 2 term by term: the
score term is -(sigma_{t-dt}^2 - sigma_t^2) / sigma_t^2 e, i.e. +(sigma_t^2 - sigma_{t-dt}^2) /
sigma_t^2 e, a positive fraction of e that moves x_t towards C_t x0_hat (denoising) as sigma falls;
eq. 15's minus sign and Alg. 2's minus sign agree, and z + C_{t-dt} x0_hat - y adds the
deblurring term (C_{t-dt} - C_t) x0_hat. For C_t = I this is exactly the reverse-diffusion
predictor of the VE SDE, x + (sigma_t^2 - sigma_{t-dt}^2) s + sqrt(sigma_t^2 - sigma_{t-dt}^2) eta
(Song et al. 2021b; ``samplers.pc.reverse_diffusion_predictor``), as the paper says below Alg. 2.
(Across a whole batch the same argument holds for the data mixture: the Markovian projection of
the corruption has drift C'_t E[x_0 | x_t], the forward SDE whose reverse these samplers
discretise with x0_hat ~ E[x_0 | x_t].)

Probability-flow Momentum (eq. 43-44): Euler on the ODE dx = [C'_t alpha - 1/2 (d sigma^2/dt)
grad log q_t] dt (eq. 42), from t down to t - dt::

    x_{t-dt} - x_t = (C_{t-dt} - C_t) x0_hat - 1/2 ((sigma_{t-dt}^2 - sigma_t^2) / sigma_t^2) e,

the same signs as eq. 15 with half the score term and no noise. For C_t = I it is the
probability-flow discretisation x + 1/2 (sigma_t^2 - sigma_{t-dt}^2) s of the VE SDE
(``ReverseSDE.discretize`` with ``probability_flow=True``). Where sigma is constant (the blur
stage of the soft process) the score and noise terms of Alg. 2 and eq. 44 both vanish and the two
samplers take the same step x + (C_{t-dt} - C_t) x0_hat.

Time grid (``time_grid="levels"``): :func:`soft_grid`, the process's levels through the shared
``level_grid`` (``steps`` of them from t = 1 down, ``spacing`` as for DDIM, default
``"trailing"``), which appends t = 0 when the levels do not hold it. The last step goes to t = 0
when the process has noise there (std(0) > 0: sigma_0 = 0.01 on the soft process, sigma_min on
VE), because t = 0 is then the least corrupted level the process defines; the network at t = 0 is
evaluated only by ``denoise``. Where std(0) = 0 (VP, sub-VP: t = 0 is the clean data itself, not a
level) the appended 0 is replaced by the smallest noisy level (t = 1/N), where the grid ends: a
step to sigma = 0 would end Alg. 2 with x = C_0 x0_hat + sigma_t eta, a last step of full noise
(an anomalous last step), and eq. 8 would divide by
zero there. NFE = len(grid) - 1, + 1 with ``denoise``; with ``"trailing"``, len(grid) - 1 = ``steps``
whenever the strided levels stop above the smallest one (steps up to about 2N/3; with every level,
steps = N, it is N on the soft process and N - 1 on VE, whose levels hold t = 0).

Which existing samplers run on a soft (non-SDE) process: annealed Langevin (NCSN's Alg. 1),
which needs only the score of each level (eq. 8 from the model's x0_hat) and noise at its last
level (``noisy_at_zero``: sigma_0 = 0.01), with the model's own x0_hat as its final step. DDIM,
ancestral, predictor-corrector (reverse diffusion, Euler-Maruyama, Langevin corrector) and the
probability-flow ODE require ``gaussian_sde`` or ``sde`` (they call ``process.sde`` /
``discretize`` / ``ancestral_step`` / ``denoise``, which assume an invertible scalar mean); ``check_sampler``
refuses each of them on a ``LinearCorruption`` with one line at build time
(tests/samplers/test_soft_samplers.py). The three samplers here run on the soft process
and on the SDEs alike (``linear_mean``: C_(t-dt) x0_hat must exist for any x0_hat, which the FP
embedding's per-image table does not give); on VE they are VE samplers (the C_t = I tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusion_lab.config_types import PositiveInt
from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.base import ForwardProcess
from diffusion_lab.samplers.base import (
    CountingModel,
    Model,
    SampleResult,
    StepCallback,
    gaussian_like,
    initial_state,
    report,
    sampler,
    step_pairs,
)
from diffusion_lab.samplers.grids import level_grid
from diffusion_lab.utils import append_dims, batch_time

#: One reverse step: (process, x_t, t, t_prev, x0_hat, generator) -> x_{t_prev}; t, t_prev (B,).
Step = Callable[
    [
        ForwardProcess,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        "torch.Generator | None",
    ],
    torch.Tensor,
]


def soft_grid(
    process: ForwardProcess, steps: int | None, spacing: str = "trailing"
) -> torch.Tensor:
    """Decreasing times from t = 1: ``level_grid(process, steps, spacing)``, whose final t = 0 is
    replaced by the smallest noisy level where the process has no noise at t = 0 (std(0) = 0),
    or dropped if that level is already the one before it (module docstring)."""
    times = level_grid(process, steps, spacing)
    if len(times) > 1 and float(process.std(times[-1:])[0]) == 0.0:
        levels = process.level_times().to(times)
        smallest = levels[process.std(levels) > 0].min()
        times = times[:-1] if times[-2] <= smallest else torch.cat([times[:-1], smallest[None]])
    return times


def _sigmas(process: ForwardProcess, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor):
    sigma = append_dims(process.std(t), x.ndim).to(x.dtype)
    sigma_prev = append_dims(process.std(t_prev), x.ndim).to(x.dtype)
    return sigma, sigma_prev


def naive_step(process, x, t, t_prev, x0_hat, generator=None):
    """Alg. 1: x_{t-dt} = C_{t-dt} x0_hat + sigma_{t-dt} eta (x_t enters only through x0_hat)."""
    sigma_prev = append_dims(process.std(t_prev), x.ndim).to(x.dtype)
    return process.mean(x0_hat, t_prev) + sigma_prev * gaussian_like(x, generator)


def momentum_step(process, x, t, t_prev, x0_hat, generator=None):
    """Alg. 2 (eq. 16): y = C_t x0_hat, e = y - x_t,
    z = x_t - ((sigma_{t-dt}^2 - sigma_t^2) / sigma_t^2) e + sqrt(sigma_t^2 - sigma_{t-dt}^2) eta,
    x_{t-dt} = z + C_{t-dt} x0_hat - y. The noise variance is clamped at 0 (a constant sigma
    must not give sqrt of a rounding-negative number)."""
    sigma, sigma_prev = _sigmas(process, x, t, t_prev)
    y = process.mean(x0_hat, t)
    e = y - x
    z = (
        x
        - (sigma_prev**2 - sigma**2) / sigma**2 * e
        + (sigma**2 - sigma_prev**2).clamp(min=0).sqrt() * gaussian_like(x, generator)
    )
    return z + process.mean(x0_hat, t_prev) - y


def probability_flow_momentum_step(process, x, t, t_prev, x0_hat, generator=None):
    """Eq. 44: x_{t-dt} = x_t + (C_{t-dt} - C_t) x0_hat
    - 1/2 ((sigma_{t-dt}^2 - sigma_t^2) / sigma_t^2) (C_t x0_hat - x_t). Deterministic."""
    sigma, sigma_prev = _sigmas(process, x, t, t_prev)
    y = process.mean(x0_hat, t)
    return (
        x
        + (process.mean(x0_hat, t_prev) - y)
        - 0.5 * (sigma_prev**2 - sigma**2) / sigma**2 * (y - x)
    )


def _check_model(model: Model, process: ForwardProcess) -> None:
    if getattr(model, "denoised", None) is None and not hasattr(process, "denoise"):
        raise ConfigError(
            f"the Soft Diffusion samplers need the model's clean-image estimate (a model with "
            f"denoised(x, t), e.g. parameterization x0 or x0_residual): a score alone does not "
            f"give C_(t-dt) x0_hat on {type(process).__name__}"
        )


def _soft_loop(
    step: Step,
    name: str,
    model: Model,
    process: ForwardProcess,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: int | None,
    callback: StepCallback | None,
    generator: torch.Generator | None,
    spacing: str,
    denoise: bool,
    return_trajectory: bool,
    progress: bool,
) -> SampleResult:
    _check_model(model, process)
    net = CountingModel(model, process)
    x = initial_state(process, x_or_shape, generator)
    times = soft_grid(process, steps, spacing)
    trajectory = [] if return_trajectory else None
    for k, t, t_next in step_pairs(times, progress, name):
        t_b = batch_time(t, x)
        t_prev = batch_time(t_next, x)
        x0_hat = net.denoised(x, t_b)
        x = step(process, x, t_b, t_prev, x0_hat, generator)
        report(callback, trajectory, x=x, t=t_next, step=k, denoised=x0_hat)
    if denoise:
        x = net.denoised(x, batch_time(float(times[-1]), x))
    return SampleResult(x, net.nfe, trajectory or [])


@sampler(requires=("linear_mean",), time_grid="levels")
@torch.no_grad()
def soft_naive(
    model: Model,
    process: ForwardProcess,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: PositiveInt | None = None,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    spacing: str = "trailing",
    denoise: bool = True,
    return_trajectory: bool = False,
    progress: bool = True,
) -> SampleResult:
    """The Naive Sampler (Alg. 1): predict x0_hat, corrupt it afresh to the next level.

    Lacks diversity (sec. 4, Fig. 4: FID 27.82 against 1.85 for Momentum on CelebA-64): x0_hat
    is a conditional mean, and re-corrupting it with fresh noise loses the spread of q_0 at
    every step (the Gaussian-oracle test measures the deficit). Grid, NFE and ``denoise``: the
    module docstring.
    """
    return _soft_loop(
        naive_step, "soft naive", model, process, x_or_shape, steps, callback, generator,
        spacing, denoise, return_trajectory, progress,
    )  # fmt: skip


@sampler(requires=("linear_mean",), time_grid="levels")
@torch.no_grad()
def soft_momentum(
    model: Model,
    process: ForwardProcess,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: PositiveInt | None = None,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    spacing: str = "trailing",
    denoise: bool = True,
    return_trajectory: bool = False,
    progress: bool = True,
) -> SampleResult:
    """The Momentum Sampler (Alg. 2, eq. 16): Euler-Maruyama on the reverse SDE of eq. 14.

    On VE (C_t = I) it is the reverse-diffusion predictor step for step. Grid, NFE and
    ``denoise``: the module docstring.
    """
    return _soft_loop(
        momentum_step, "soft momentum", model, process, x_or_shape, steps, callback, generator,
        spacing, denoise, return_trajectory, progress,
    )  # fmt: skip


@sampler(requires=("linear_mean",), time_grid="levels")
@torch.no_grad()
def soft_pf_momentum(
    model: Model,
    process: ForwardProcess,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: PositiveInt | None = None,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    spacing: str = "trailing",
    denoise: bool = True,
    return_trajectory: bool = False,
    progress: bool = True,
) -> SampleResult:
    """The Probability Flow Momentum Sampler (App. B, eq. 44): Euler on the ODE of eq. 42.

    Deterministic given the initial state (the generator only draws it from the prior). Grid,
    NFE and ``denoise``: the module docstring.
    """
    return _soft_loop(
        probability_flow_momentum_step, "soft pf momentum", model, process, x_or_shape, steps,
        callback, generator, spacing, denoise, return_trajectory, progress,
    )  # fmt: skip
