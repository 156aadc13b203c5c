"""The blur of Soft Diffusion's blur stage and the candidate blur levels (Daras et al. sec. 3.3,
App. C): the blur std grows from ``blur_min`` (0.01: the identity) to ``blur_max`` (23 for
CelebA-64, 18 for CIFAR-10; App. D) at constant noise sigma = 0.1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import numpy as np
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.operators import GaussianBlur

#: ``blur(x, std) -> x``: a zero-padded Gaussian blur of std ``std`` of a batch (B, C, H, W).
BlurFn = Callable[[torch.Tensor, float], torch.Tensor]

Spacing = Literal["linear", "geometric"]
SPACINGS: tuple[str, ...] = get_args(Spacing)


def gaussian_blur(
    x: torch.Tensor, std: float, half_size: int | None = None, method: str | None = None
) -> torch.Tensor:
    """The soft process's blur (``operators.GaussianBlur``, zero padding; ``method`` its
    implementation, None the default) of one std for the whole batch: the ``blur(x, std)`` the
    schedules use. ``half_size`` None: H - 1 or W - 1, which with zero padding is the untruncated
    kernel (taps further out only ever meet the padding). The kernel of std 0.01 is the identity
    to float precision."""
    x = torch.as_tensor(x)
    half = max(x.shape[-2:]) - 1 if half_size is None else int(half_size)
    return GaussianBlur(torch.full((x.shape[0],), float(std)), half, method).apply(x)


def candidate_blurs(
    blur_min: float = 0.01, blur_max: float = 23.0, num: int = 256, spacing: str = "linear"
) -> np.ndarray:
    """The candidate stds from ``blur_min`` to ``blur_max`` exactly (float64).

    ``linear`` (default): evenly spaced stds. ``geometric`` spends over a third of 256
    candidates from 0.01 to 23 below a std of 0.3, where a sampled kernel is nearly the identity
    and the coupled distances are nearly 0; on 16x16 digits (blur_max 8) its 32-level path put
    10 levels between stds 0.16 and 0.20, while linear spacing gave an even path (largest
    neighbour distance: 0.086 linear, 0.077 geometric, both far below the path's eps of 0.25).
    """
    if not 0 < blur_min <= blur_max:
        raise ConfigError(f"need 0 < blur_min <= blur_max, got {blur_min} and {blur_max}")
    if num < 2:
        raise ConfigError(f"need at least 2 candidate blur levels, got {num}")
    if spacing == "linear":
        stds = np.linspace(blur_min, blur_max, num)
    elif spacing == "geometric":
        stds = np.geomspace(blur_min, blur_max, num)
    else:
        raise ConfigError(f"unknown candidate spacing {spacing!r}: use {' or '.join(SPACINGS)}")
    stds[0], stds[-1] = blur_min, blur_max
    return stds
