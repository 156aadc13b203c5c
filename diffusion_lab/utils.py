"""Small tensor helpers shared by every part of the project."""

from __future__ import annotations

import torch


def append_dims(value: torch.Tensor | float, ndim: int) -> torch.Tensor:
    """Give a per-example value of shape (B,) trailing singleton dims up to ``ndim``.

    The one way to broadcast a per-example scalar against a batch, so that the same code serves
    2-D toy points (B, 2) and images (B, C, H, W).
    """
    value = torch.as_tensor(value)
    if value.ndim > ndim:
        raise ValueError(f"cannot broadcast a tensor with {value.ndim} dims to {ndim} dims")
    return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def time_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype times and schedule coefficients are computed in for data like ``like``: its
    own, promoted to at least float32 (a bfloat16 time cannot tell DDPM's 1000 levels apart)."""
    return torch.promote_types(like.dtype, torch.float32)


def batch_time(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A time (scalar or (B,)) as a tensor of shape (B,) for the batch ``like``: on its device,
    in :func:`time_dtype` of it (float32 for float32 and bfloat16 data, float64 for float64)."""
    t = torch.as_tensor(t, dtype=time_dtype(like), device=like.device)
    return t.expand(like.shape[0]).clone() if t.ndim == 0 else t
