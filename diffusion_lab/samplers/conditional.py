"""Controllable generation: sampling p_0(x | y) with an unconditional score (Khungurn sec. 7.4;
Song et al. 2021 sec. 5 and App. I).

The reverse SDE of p_t(x | y) needs grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x)
(Khungurn sec. 7.4, Bayes' rule). Two ways to supply the second term, both reusing the
predictor-corrector machinery of ``samplers.pc`` (its predictors, its Langevin corrector, its
time grid and final denoising step):

- as a score transform, for any sampler: :func:`guided_score` (class-conditional sampling with a
  time-dependent classifier, sec. 7.4.1);
- as a projection after each predictor and corrector step, :func:`samplers.pc.predictor_corrector` (its ``project`` hook)
  (Score SDE's ``get_pc_inpainter`` / ``get_pc_colorizer``): :func:`inpaint` (sec. 7.4.2),
  :func:`colorize` (sec. 7.4.3) and :func:`solve_linear_inverse_problem` (sec. 7.4.4).

All samplers work in model space (the range the score was trained in): map observations there
first (``DiffusionMethod.to_model_range``) and samples back after.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.sde import SDE, ScoreFn
from diffusion_lab.samplers.base import (
    SampleResult,
    StepCallback,
    gaussian_like,
)
from diffusion_lab.samplers.pc import predictor_corrector
from diffusion_lab.utils import append_dims, batch_time

Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``project(x, t, dt, generator)``: x at time t after a step of length dt -> conditioned x.


# --------------------------------------------------------------------------- class-conditional
def classifier_log_prob_grad(
    classifier: Classifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """grad_x log p_t(y | x) from a time-dependent classifier's logits (Khungurn sec. 7.4.1).

    Taken with autograd under ``enable_grad`` and ``inference_mode(False)``, so it also works
    inside samplers decorated with ``no_grad`` and in Lightning's validation loop.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, t.detach().clone()), dim=-1)
        selected = log_probs.gather(1, y.reshape(-1, 1).expand(x.shape[0], 1)).sum()
        (grad,) = torch.autograd.grad(selected, x_in)
    return grad.detach()


def guided_score(
    score_fn: ScoreFn, classifier: Classifier, y: torch.Tensor | int, scale: float = 1.0
) -> ScoreFn:
    """score(x, t) + scale * grad_x log p_t(y | x): the conditional score of sec. 7.4 for class y.

    ``y`` is one class for the whole batch or one per example; ``classifier(x, t) -> logits`` is
    time-dependent (``methods.classifier.NoisyClassifierMethod.classifier_fn()``) and takes x in
    the score's space. ``scale`` = 1 is Bayes' rule; > 1 sharpens p(y | x) (classifier guidance).
    Use the result with any sampler.
    """

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(y, device=x.device, dtype=torch.long)
        grad = classifier_log_prob_grad(classifier, x, t, labels)
        return score_fn(x, t) + scale * grad

    return fn


# ------------------------------------------------------------------------- projected PC loop
@torch.no_grad()
# -------------------------------------------------------------------------------- inpainting
def replace_known(
    x: torch.Tensor,
    observed: torch.Tensor,
    mask: torch.Tensor,
    process: SDE,
    t: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """x with its known entries (``mask`` true) replaced by a draw of x(t) | x(0) = observed,
    alpha(t) y + sigma(t) z: the sample of p_t(Omega(x(t)) | Omega(x(0)) = y) of sec. 7.4.2."""
    t_b = batch_time(t, x.shape[0], x.device)
    perturbed = process.sample_marginal(observed, t_b, gaussian_like(observed, generator))
    return torch.where(mask, perturbed, x)


def inpaint(
    score_fn: ScoreFn,
    process: SDE,
    observed: torch.Tensor,
    steps: int = 1000,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    *,
    mask: torch.Tensor,
    **options: object,
) -> SampleResult:
    """Fill the unknown entries of ``observed`` (where ``mask`` is false) by sampling
    p_0(x | known entries) (Khungurn sec. 7.4.2; Song et al. 2021 App. I.2).

    After every predictor and corrector step at time t the known entries are replaced by
    alpha(t) y + sigma(t) z (fresh z each time), which approximates the conditional score by
    grad_z log p_t(z(t), hat Omega(x(t))); at the end they are set to y exactly. ``mask`` (true
    = known) broadcasts against ``observed``. Options as ``samplers.pc.predictor_corrector``.
    """
    mask = mask.to(torch.bool).expand_as(observed)
    x_init = process.prior_sampling(tuple(observed.shape), generator, observed.device)
    return predictor_corrector(
        score_fn,
        process,
        x_init,
        steps,
        callback,
        generator,
        project=lambda x, t, dt, g: replace_known(x, observed, mask, process, t, g),
        finalize=lambda x: torch.where(mask, observed, x),
        **options,
    )


# ------------------------------------------------------------------------------ colorization
#: The orthonormal colour transform of Song et al. 2021 App. I.3 (Khungurn sec. 7.4.3), rows
#: = output channels: channel 0 is (R + G + B) / sqrt(3), so a gray image (g, g, g) maps to
#: (sqrt(3) g, 0, 0); M M^T = I, so N(0, I) noise stays N(0, I) in the new basis.
COLOR_TRANSFORM = torch.tensor(
    [
        [1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
        [-math.sqrt(2) / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(6)],
        [0.0, 1 / math.sqrt(2), -1 / math.sqrt(2)],
    ],
    dtype=torch.float64,
)


def decouple(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, ...) RGB -> the decoupled basis M x (channel 0: sqrt(3) times the gray level)."""
    return torch.einsum("ij,bj...->bi...", COLOR_TRANSFORM.to(rgb), rgb)


def couple(decoupled: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`decouple`: M^T x (M is orthonormal)."""
    return torch.einsum("ji,bj...->bi...", COLOR_TRANSFORM.to(decoupled), decoupled)


def colorize(
    score_fn: ScoreFn,
    process: SDE,
    gray: torch.Tensor,
    steps: int = 1000,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
    **options: object,
) -> SampleResult:
    """Colour images from gray ones (B, 1, H, W) or (B, 3, H, W) with equal channels, in model
    space (Khungurn sec. 7.4.3; Song et al. 2021 App. I.3).

    Inpainting in the decoupled basis of ``COLOR_TRANSFORM``: channel 0 (the gray level) is known,
    channels 1 and 2 are sampled; the score model sees RGB throughout. The output's channel mean
    equals ``gray`` exactly. (The map of [0, 1] to the model range acts on every channel alike,
    so a gray image stays gray in model space.)
    """
    if gray.ndim != 4 or gray.shape[1] not in (1, 3):
        raise ValueError(f"gray images must be (B, 1 or 3, H, W), got {tuple(gray.shape)}")
    rgb = gray.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    observed = decouple(rgb)
    mask = torch.zeros_like(observed, dtype=torch.bool)
    mask[:, 0] = True

    def project(x: torch.Tensor, t: float, dt: float, g: torch.Generator | None) -> torch.Tensor:
        return couple(replace_known(decouple(x), observed, mask, process, t, g))

    x_init = process.prior_sampling(tuple(rgb.shape), generator, rgb.device)
    return predictor_corrector(
        score_fn,
        process,
        x_init,
        steps,
        callback,
        generator,
        project=project,
        finalize=lambda x: couple(torch.where(mask, observed, decouple(x))),
        **options,
    )


# -------------------------------------------------------------------- linear inverse problems
@dataclass
class LinearMeasurement:
    """y = A x + n, n ~ N(0, noise_std^2 I), with A a (M, D) matrix acting on flattened x or a
    linear callable ``A(x) -> (B, ...)`` (its adjoint is then taken by autograd and systems in
    the measurement space are solved by conjugate gradients, ``cg_iters`` iterations)."""

    operator: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
    y: torch.Tensor
    noise_std: float = 0.0
    cg_iters: int = 50

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A x, shape (B, M)."""
        if isinstance(self.operator, torch.Tensor):
            return x.flatten(1) @ self.operator.to(x).T
        return self.operator(x).flatten(1)

    def adjoint(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A^T v, shaped like ``like``."""
        if isinstance(self.operator, torch.Tensor):
            return (v @ self.operator.to(v)).reshape(like.shape)
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.zeros_like(like).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.apply(x), x, grad_outputs=v.detach().clone())
        return grad.detach()

    def solve(self, rhs: torch.Tensor, like: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor):
        """u with (gamma A A^T + lam I) u = rhs, per example (gamma, lam of shape (B,))."""
        gamma, lam = gamma.to(rhs)[:, None], lam.to(rhs)[:, None]
        if isinstance(self.operator, torch.Tensor):
            a = self.operator.to(rhs)
            eye = torch.eye(a.shape[0], dtype=rhs.dtype, device=rhs.device)
            system = gamma[:, :, None] * (a @ a.T) + lam[:, :, None] * eye
            return torch.linalg.solve(system, rhs)

        def matvec(u: torch.Tensor) -> torch.Tensor:
            return gamma * self.apply(self.adjoint(u, like)) + lam * u

        return conjugate_gradient(matvec, rhs, self.cg_iters)

    def project(
        self, x: torch.Tensor, process: SDE, t: float, dt: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The step x <- x + gamma grad_x log p(hat y(t) | x), taken implicitly (see
        :func:`solve_linear_inverse_problem`): x + gamma A^T (gamma A A^T + alpha^2 nu^2 I)^{-1}
        (hat y(t) - A x), with hat y(t) = alpha y + sigma A z a draw of p(y(t) | y)."""
        t_b = batch_time(t, x.shape[0], x.device)
        alpha, sigma = process.marginal_coefficients(t_b)
        _, step_std = process.transition_coefficients((t_b - dt).clamp(min=0), t_b)
        noise = gaussian_like(x, generator)
        y_t = append_dims(alpha, 2) * self.y.to(x) + append_dims(sigma, 2) * self.apply(noise)
        gamma = step_std**2
        u = self.solve(y_t - self.apply(x), x, gamma, (alpha * self.noise_std) ** 2)
        return x + append_dims(gamma, x.ndim) * self.adjoint(u, x)


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    iters: int,
    tol: float = 1e-10,
) -> torch.Tensor:
    """Solve the symmetric positive definite systems matvec(u) = rhs, batched over rows."""
    u = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(1, keepdim=True)
    for _ in range(iters):
        ap = matvec(p)
        step = rs / (p * ap).sum(1, keepdim=True).clamp_min(1e-30)
        u, r = u + step * p, r - step * ap
        rs_new = (r * r).sum(1, keepdim=True)
        if float(rs_new.max()) < tol:
            break
        p = r + rs_new / rs.clamp_min(1e-30) * p
        rs = rs_new
    return u


def solve_linear_inverse_problem(
    score_fn: ScoreFn,
    process: SDE,
    measurement: LinearMeasurement,
    x_or_shape: torch.Tensor | tuple[int, ...],
    steps: int = 1000,
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
    :func:`inpaint`'s replacement. Options as ``samplers.pc.predictor_corrector``, except that the
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
        score_fn,
        process,
        x_or_shape,
        steps,
        callback,
        generator,
        project=lambda x, t, dt, g: measurement.project(x, process, t, dt, g),
        **options,
    )
