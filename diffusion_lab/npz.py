"""The sample batch FID evaluators read: a ``.npz`` whose ``arr_0`` holds uint8 images of shape
(N, H, W, C), values round(clip(x * 255, 0, 255)) for x the samples mapped to [0, 1] (the
format of guided-diffusion's ``image_sample.py`` and ``evaluations/evaluator.py``). Grey images
keep C = 1."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def to_uint8_hwc(samples: torch.Tensor, value_range: Sequence[float]) -> np.ndarray:
    """(N, C, H, W) images in ``value_range`` as uint8 (N, H, W, C). Computed in float64, where
    x * 255 of a float32 x in [0, 1] is exact: no value rounds to the wrong side of a half."""
    lo, hi = value_range
    unit = (samples.detach().cpu().double() - lo) / (hi - lo)
    pixels = (unit * 255).clamp(0, 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def save_npz(samples: torch.Tensor, value_range: Sequence[float], path: str | Path) -> Path:
    """Write ``samples`` (images in ``value_range``) as ``arr_0`` of an uncompressed ``.npz`` at
    ``path``, through a temporary file renamed into place (never a truncated file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as handle:
            np.savez(handle, arr_0=to_uint8_hwc(samples, value_range))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
