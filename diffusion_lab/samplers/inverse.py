"""Linear inverse problems: sampling p_0(x | y) for y = A x + n with an unconditional score
(Khungurn sec. 7.4.4; Song et al. 2021 App. I.4).

The likelihood term is taken implicitly after each predictor-corrector step (the ``project`` hook
of ``samplers.pc.predictor_corrector``); A is an ``operators.LinearOperator``. Everything is in
model space (the range the score was trained in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import InitVar, dataclass

import torch

from diffusion_lab.config_types import PositiveInt
from diffusion_lab.errors import ConfigError
from diffusion_lab.operators import FunctionOperator, LinearOperator, MatrixOperator
from diffusion_lab.processes.sde import SDE
from diffusion_lab.samplers.base import Model, SampleResult, StepCallback, gaussian_like
from diffusion_lab.samplers.pc import predictor_corrector
from diffusion_lab.utils import append_dims, batch_time


@dataclass
class LinearMeasurement:
    """y = A x + n, n ~ N(0, noise_std^2 I), with A a ``LinearOperator``, or a (M, D) matrix
    acting on flattened x (a ``MatrixOperator``), or a linear callable ``A(x) -> (B, ...)`` (a
    ``FunctionOperator``: adjoint by autograd, systems solved by ``cg_iters`` conjugate-gradient
    iterations)."""

    operator: LinearOperator | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
    y: torch.Tensor
    noise_std: float = 0.0
    cg_iters: InitVar[int] = 50

    def __post_init__(self, cg_iters: int) -> None:
        if isinstance(self.operator, torch.Tensor):
            self.operator = MatrixOperator(self.operator)
        elif not isinstance(self.operator, LinearOperator):
            self.operator = FunctionOperator(self.operator, cg_iters)

    def project(
        self, x: torch.Tensor, process: SDE, t: float, dt: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The step x <- x + gamma grad_x log p(hat y(t) | x), taken implicitly (see
        :func:`solve_linear_inverse_problem`): x + gamma A^T (gamma A A^T + alpha^2 nu^2 I)^{-1}
        (hat y(t) - A x), with hat y(t) = alpha y + sigma A z a draw of p(y(t) | y)."""
        t_b = batch_time(t, x)
        alpha, sigma = process.marginal_coefficients(t_b)
        _, step_std = process.transition_coefficients((t_b - dt).clamp(min=0), t_b)
        a = self.operator
        measured_noise = a.apply(gaussian_like(x, generator))
        ndim = measured_noise.ndim
        y_t = append_dims(alpha, ndim) * self.y.to(x) + append_dims(sigma, ndim) * measured_noise
        gamma = step_std**2
        u = a.gram_solve(y_t - a.apply(x), x, gamma, (alpha * self.noise_std) ** 2)
        return x + append_dims(gamma, x.ndim) * a.adjoint(u, x)


def solve_linear_inverse_problem(
    model: Model,
    process: SDE,
    measurement: LinearMeasurement,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: PositiveInt = 1000,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    **options: object,
) -> SampleResult:
    """Sample p_0(x | y) for y = A x + n by the approximation of Khungurn sec. 7.4.4 (Song et al.
    2021 App. I.4): grad log p_t(x | y) ~ s(x, t) + grad_x log p_t(hat y(t) | x), hat y(t) a draw
    of p(y(t) | y).

    With y(t) := A x(t) + alpha(t) n, both densities are exact: p(y(t) | y) = N(alpha y, sigma^2
    A A^T) (draw: alpha y + sigma A z) and p(y(t) | x(t)) = N(A x(t), alpha^2 nu^2 I), whose
    gradient is A^T (hat y - A x) / (alpha^2 nu^2). That term is stiff (its curvature
    ||A||^2 / (alpha^2 nu^2) grows without bound as alpha -> 0 or nu -> 0), so an explicit step
    diverges; the sampler splits it off: the predictor-corrector steps use s, and after each
    step of variance gamma (the process's transition over one grid step) the likelihood term is
    taken implicitly, x <- argmin |x' - x|^2 / (2 gamma) - log p(hat y | x'), in closed form
    (``LinearMeasurement.project``). For nu = 0 and A a pixel mask this is exactly
    ``samplers.inpainting.inpaint``'s replacement. Options as ``samplers.pc.predictor_corrector``, except that the
    corrector defaults to none: the implicit step's gamma matches a predictor step, not a Langevin
    step (whose size the corrector sets itself), so with nu > 0 the Langevin corrector would
    weigh prior and likelihood wrongly and is refused (with nu = 0 the step is a projection, which
    does not depend on gamma, and the corrector is allowed).
    """
    options.setdefault("corrector", "none")
    if options["corrector"] != "none" and measurement.noise_std > 0:
        raise ConfigError(
            "solve_linear_inverse_problem: the Langevin corrector needs noise_std = 0; "
            "use corrector='none' for noisy measurements"
        )
    return predictor_corrector(
        model,
        process,
        x_or_shape,
        steps,
        callback,
        generator,
        project=lambda x, t, dt, g: measurement.project(x, process, t, dt, g),
        **options,
    )
