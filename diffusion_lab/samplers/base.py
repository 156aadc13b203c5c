"""What every sampler shares: the result type, NFE counting, initial states and the build-time
check of a sampler against its process (the time grids are in ``samplers.grids``).

Samplers are plain functions with one signature: ``sampler(model, process,
x_or_shape, steps, callback=None, generator=None, **options) -> SampleResult``. The model is any
callable ``score(x, t)``; a trained ``ScoreModel`` also gives ``denoised(x, t)``, and for a plain
score function :class:`CountingModel` derives it by Tweedie's formula, so an analytic score and
a trained network are interchangeable wherever a score is all a sampler needs.

``steps`` means one thing for every sampler: the number of reverse-time steps, i.e. of levels
or grid times visited (NFE per step is the sampler's: 1 for DDIM and ancestral, 1 + corrector
steps for predictor-corrector, ``n_steps_each`` for annealed Langevin). Adaptive solvers choose
their own steps and take ``steps=None``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.base import CAPABILITIES, ForwardProcess
from diffusion_lab.sample_streams import Generator, randn
from diffusion_lab.samplers.grids import TIME_GRIDS, declare_time_grid
from diffusion_lab.utils import append_dims, batch_time, time_dtype

StepCallback = Callable[[dict], None]
#: A model: ``model(x, t) -> score``, optionally with ``model.denoised(x, t) -> x0_hat``.
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@declare_time_grid("adaptive")
def _check_adaptive(name: str, process: ForwardProcess, options: Mapping[str, object]) -> None:
    """An adaptive solver chooses its own steps."""
    if options["steps"] is not None:
        raise ConfigError(
            f"sampler {name} chooses its own steps (set its rtol / atol): leave sampler.steps null"
        )


@dataclass
class SampleResult:
    """Samples, the number of score evaluations (NFE) and, if asked for, the visited states."""

    samples: torch.Tensor
    nfe: int
    trajectory: list[torch.Tensor] = field(default_factory=list)


class CountingModel:
    """Wraps a model and counts its (batched) evaluations: one call is one NFE.

    Calling it gives the score; :meth:`denoised` the clean-image estimate, the model's own when
    it has one, else Tweedie's formula on the score (``process.denoise``).
    """

    def __init__(self, model: Model, process: ForwardProcess | None = None) -> None:
        self.model = model
        self.process = process
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.model(x, batch_time(t, x))

    def denoised(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t = x] from the model."""
        t = batch_time(t, x)
        own = getattr(self.model, "denoised", None)
        if own is not None:
            self.nfe += 1
            return own(x, t)
        return self.process.denoise(x, t, self(x, t))

    def predictions(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from one evaluation: the model's own (``ScoreModel.predictions``),
        else eps from its ``denoised`` (eps = (x - mean(x0_hat)) / sigma), else both from the
        score (eps = -sigma s and Tweedie)."""
        t = batch_time(t, x)
        own = getattr(self.model, "predictions", None)
        if own is not None:
            self.nfe += 1
            return own(x, t)
        sigma = append_dims(self.process.std(t), x.ndim).to(x.dtype)
        if getattr(self.model, "denoised", None) is not None:
            x0 = self.denoised(x, t)
            return x0, (x - self.process.mean(x0, t)) / sigma
        score = self(x, t)
        return self.process.denoise(x, t, score), -sigma * score


class ModelAtDtype:
    """``model`` called with its inputs cast to ``dtype`` (the dtype the sampler was given), so
    that the state may be kept in a wider dtype between evaluations; ``denoised`` only where
    the model has one."""

    def __init__(self, model: Model, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype
        if getattr(model, "denoised", None) is not None:
            self.denoised = lambda x, t: model.denoised(x.to(dtype), t)
        if getattr(model, "predictions", None) is not None:
            self.predictions = lambda x, t: model.predictions(x.to(dtype), t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype), t)


def keep_input_dtype(fn: Callable[..., SampleResult]) -> Callable[..., SampleResult]:
    """Run ``fn`` so that the caller's dtype holds: a bfloat16 (or float64) initial state gives
    bfloat16 (float64) samples and trajectory, and the model only ever sees that dtype. In
    between, the state is kept in :func:`~diffusion_lab.utils.time_dtype` (float32 for
    bfloat16), the schedule's precision: a bfloat16 state would lose every step smaller than
    1/256 of itself (annealed Langevin's, DDPM's late ones) to rounding."""

    @functools.wraps(fn)
    def run(model: Model, process: ForwardProcess, x_or_shape, *args, **kwargs) -> SampleResult:
        if not isinstance(x_or_shape, torch.Tensor):
            return fn(model, process, x_or_shape, *args, **kwargs)
        dtype = x_or_shape.dtype
        state = x_or_shape.to(time_dtype(x_or_shape))
        result = fn(ModelAtDtype(model, dtype), process, state, *args, **kwargs)
        trajectory = [x.to(dtype) for x in result.trajectory]
        return SampleResult(result.samples.to(dtype), result.nfe, trajectory)

    return run


def sampler(
    requires: Iterable[str] = ("gaussian_sde",),
    time_grid: str = "levels",
    option_requires: Mapping[str, Mapping[object, Iterable[str]]] | None = None,
) -> Callable[[Callable[..., SampleResult]], Callable[..., SampleResult]]:
    """Mark a sampler with the process capabilities it needs and how it reads ``steps``
    (a kind of ``samplers.grids.TIME_GRIDS``), for :func:`check_sampler`; it keeps its input's dtype
    (:func:`keep_input_dtype`). ``option_requires`` adds what one value of an option needs,
    e.g. ``{"predictor": {"ancestral": ("gaussian_sde",)}}``."""
    option_requires = {
        option: {value: frozenset(needs) for value, needs in values.items()}
        for option, values in (option_requires or {}).items()
    }
    named = set(requires).union(*(n for v in option_requires.values() for n in v.values()))
    unknown = named - set(CAPABILITIES)
    if unknown or time_grid not in TIME_GRIDS:
        raise ValueError(f"unknown capabilities {sorted(unknown)} or time grid {time_grid!r}")

    def mark(fn: Callable[..., SampleResult]) -> Callable[..., SampleResult]:
        fn = keep_input_dtype(fn)
        fn.requires = frozenset(requires)  # type: ignore[attr-defined]
        fn.option_requires = option_requires  # type: ignore[attr-defined]
        fn.time_grid = time_grid  # type: ignore[attr-defined]
        return fn

    return mark


def check_sampler(sample: Callable[..., SampleResult], process: ForwardProcess) -> None:
    """Stop with one line if ``sample`` (a sampler, or a partial of one as Hydra builds it,
    nested or not) cannot run on ``process``: a missing capability, or ``steps`` out of range."""
    fn, options = sample, {}
    while isinstance(fn, functools.partial):  # partials of partials: the outer keywords win
        fn, options = fn.func, {**fn.keywords, **options}
    name = getattr(fn, "__name__", repr(fn))
    defaults = {k: v.default for k, v in inspect.signature(fn).parameters.items()}
    options = {**defaults, **options}
    requires = set(getattr(fn, "requires", frozenset()))
    for option, values in getattr(fn, "option_requires", {}).items():
        needs = values.get(options.get(option), frozenset())
        requires |= needs
        name = f"{name} with {option}={options.get(option)}" if needs else name
    missing = sorted(requires - process.provides)
    if missing:
        raise ConfigError(
            f"sampler {name} needs a process that {CAPABILITIES[missing[0]]}; "
            f"{type(process).__name__} is not one: choose another sampler or process"
        )
    grid = getattr(fn, "time_grid", None)
    if grid is not None:
        TIME_GRIDS[grid](name, process, options)


def initial_state(
    process: ForwardProcess,
    x_or_shape: torch.Tensor | tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The given starting tensor, or a draw of the given shape from the process prior."""
    if isinstance(x_or_shape, torch.Tensor):
        return x_or_shape
    return process.prior_sampling(tuple(x_or_shape), generator=generator, device=device or "cpu")


def gaussian_like(x: torch.Tensor, generator: Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, from ``generator`` when given (reproducible; per
    sample for :class:`~diffusion_lab.sample_streams.SampleStreams`)."""
    return randn(x.shape, generator, x.device, x.dtype)


def step_pairs(
    times: torch.Tensor, progress: bool, desc: str
) -> Iterator[tuple[int, float, float]]:
    """(index, t, t_next) over consecutive grid times, with a progress bar."""
    pairs: Iterable = enumerate(zip(times[:-1].tolist(), times[1:].tolist()))
    for k, (t, t_next) in tqdm(
        pairs, total=len(times) - 1, desc=desc, disable=not progress, leave=False
    ):
        yield k, t, t_next


def report(
    callback: StepCallback | None, trajectory: list[torch.Tensor] | None, **state: object
) -> None:
    """Pass a step's state to the callback and keep x in the trajectory if one is kept."""
    if callback is not None:
        callback(state)
    if trajectory is not None:
        trajectory.append(state["x"].detach().clone())  # type: ignore[union-attr]


def final_denoise(
    model: CountingModel, process: ForwardProcess, x: torch.Tensor, t: float, denoise: bool
) -> torch.Tensor:
    """The clean-image estimate at the last time if it still carries noise (Tweedie's
    x + sigma^2 s(x, sigma), divided by alpha, for a score model; the model's own ``denoised``
    otherwise); skipping it costs about 5 FID points (reported by users of score_sde_pytorch's forks)."""
    if not denoise or float(process.std(torch.tensor([t], dtype=torch.float64))) == 0.0:
        return x  # (the std of the grid's last time, on the host: no wait for the device)
    return model.denoised(x, batch_time(t, x))
