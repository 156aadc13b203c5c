"""Inpainting and colorization: sampling p_0(x | known entries) with an unconditional score
(Khungurn sec. 7.4.2-7.4.3; Song et al. 2021 App. I.2-I.3).

After each predictor and corrector step of ``samplers.pc.predictor_corrector`` (its ``project``
hook; Score SDE's ``get_pc_inpainter`` / ``get_pc_colorizer``) the known entries are replaced by a
draw of x(t) | x(0) = y. Colorization is inpainting in an orthonormal colour basis whose first
channel is the gray level. Everything is in model space (the range the score was trained in): map
observations there first (``DiffusionMethod.to_model_range``) and samples back after.
"""

from __future__ import annotations

import math

import torch

from diffusion_lab.config_types import PositiveInt
from diffusion_lab.processes.sde import SDE
from diffusion_lab.samplers.base import Model, SampleResult, StepCallback, gaussian_like
from diffusion_lab.samplers.pc import predictor_corrector
from diffusion_lab.utils import batch_time


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
    t_b = batch_time(t, x)
    perturbed = process.sample_marginal(observed, t_b, gaussian_like(observed, generator))
    return torch.where(mask, perturbed, x)


def inpaint(
    model: Model,
    process: SDE,
    observed: torch.Tensor,
    steps: PositiveInt = 1000,
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
        model,
        process,
        x_init,
        steps,
        callback,
        generator,
        project=lambda x, t, dt, g: replace_known(x, observed, mask, process, t, g),
        finalize=lambda x: torch.where(mask, observed, x),
        **options,
    )


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
    model: Model,
    process: SDE,
    gray: torch.Tensor,
    steps: PositiveInt = 1000,
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
        model,
        process,
        x_init,
        steps,
        callback,
        generator,
        project=project,
        finalize=lambda x: couple(torch.where(mask, observed, decouple(x))),
        **options,
    )
