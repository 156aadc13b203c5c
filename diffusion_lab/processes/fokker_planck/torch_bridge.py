"""The forward SDE dx = f dt + g dW of eq. 1 (Na, Gao, Wan 2024) as the float64 numpy functions the
solver takes, from a diffusion_lab SDE (VESDE, VPSDE, SubVPSDE)."""

from __future__ import annotations

import numpy as np
import torch

from .transport import DiffusionFn, DriftFn


def sde_coefficients(sde: object) -> tuple[DriftFn, DiffusionFn]:
    """(drift(x, t), diffusion(t)) in float64 numpy from a diffusion_lab SDE:
    ``sde.sde(x[None], t[None])`` evaluated in float64 torch."""

    def drift(x: np.ndarray, t: float) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))[None]
        f, _ = sde.sde(xt, torch.tensor([t], dtype=torch.float64))
        return f[0].detach().cpu().numpy().astype(np.float64)

    def diffusion(t: float) -> float:
        x = torch.zeros((1, 1), dtype=torch.float64)
        _, g = sde.sde(x, torch.tensor([t], dtype=torch.float64))
        return float(g[0])

    return drift, diffusion
