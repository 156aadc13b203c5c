"""How training times are drawn; shared by every loss."""

from __future__ import annotations

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.processes.base import ForwardProcess
from diffusion_lab.utils import time_dtype

TIME_SAMPLING = ("levels", "uniform", "fixed")


def sample_times(
    process: ForwardProcess,
    like: torch.Tensor,
    time_sampling: str = "levels",
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    fixed_time: float | None = None,
) -> torch.Tensor:
    """Training times, one per example.

    ``"levels"``: a discrete level drawn uniformly per example (DDPM's i ~ U{1..N}, NCSN's
    sigma_i ~ U{sigma_1..sigma_L}); ``"uniform"``: t ~ U(eps, 1) (Score SDE, Khungurn eq. 9).
    eps is a real hyper-parameter (t ~ U(eps, 1) is not the discretised schedule's law).
    ``"fixed"``: every example at ``fixed_time`` (score matching at one noise level).

    One time per example of the batch ``like``, on its device, drawn in float32 (the same
    draws for any data dtype) and returned in ``time_dtype(like)``, the dtype the model and
    the process compute the schedule in, so that loss and model see the same sigma(t).
    """
    batch_size, device = like.shape[0], like.device
    if time_sampling == "levels":
        levels = process.fixed_table("level_times", device)
        index = torch.randint(len(levels), (batch_size,), device=device, generator=generator)
        t = levels[index]
    elif time_sampling == "uniform":
        if not 0 <= eps < 1:
            raise ConfigError(f"loss.eps must lie in [0, 1), got {eps}")
        u = torch.rand(batch_size, device=device, generator=generator)
        t = eps + (1 - eps) * u
    else:
        check_time_sampling(time_sampling, fixed_time)
        t = torch.full((batch_size,), float(fixed_time), device=device)
    return t.to(time_dtype(like))


def check_time_sampling(time_sampling: str, fixed_time: float | None = None) -> None:
    """A ConfigError for an unknown ``time_sampling`` or a ``fixed`` one without a time in [0, 1]."""
    if time_sampling not in TIME_SAMPLING:
        raise ConfigError(f"unknown time_sampling {time_sampling!r}: use one of {TIME_SAMPLING}")
    if time_sampling == "fixed" and (fixed_time is None or not 0 <= fixed_time <= 1):
        raise ConfigError(f"time_sampling fixed needs loss.fixed_time in [0, 1], got {fixed_time}")
