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


def batch_time(
    t: torch.Tensor | float,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A time (scalar or (B,)) as a float tensor of shape (B,) on ``device``."""
    t = torch.as_tensor(t, dtype=dtype, device=device)
    return t.expand(batch_size).clone() if t.ndim == 0 else t
