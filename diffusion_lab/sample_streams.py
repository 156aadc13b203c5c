"""Per-sample random streams: sample i of a draw takes all its noise (its prior draw and every
sampler step's) from its own generator, seeded from (seed, i), so a sample depends neither on
the batch it is drawn in nor on which device or process draws it (EDM's per-image seeds and
``StackedRandomGenerator``, Karras et al. 2022, ``generate.py``).

Samplers and processes draw through :func:`randn`, :func:`rand` and :func:`randint`, which take
either a ``torch.Generator`` (one stream for the whole tensor, as torch draws) or
:class:`SampleStreams` (row i from stream i).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Device = torch.device | str


def stream_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s stream: (seed, index) mixed by numpy's SeedSequence, so
    that streams of neighbouring indices or seeds are unrelated."""
    state = np.random.SeedSequence([seed % 2**64, index]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


class SampleStreams:
    """One generator per sample of a batch: those of the global sample ``indices``, on
    ``device``. A draw of shape (B, ...) takes row i from stream i (B = the number of streams)."""

    def __init__(self, seed: int, indices: Sequence[int], device: Device = "cpu") -> None:
        self.generators = [
            torch.Generator(device=device).manual_seed(stream_seed(seed, int(i))) for i in indices
        ]

    def __len__(self) -> int:
        return len(self.generators)

    def rows(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of one row of a draw of ``shape``, which must have a row per stream."""
        if len(shape) == 0 or shape[0] != len(self):
            raise ValueError(
                f"a draw from {len(self)} per-sample streams needs one row per sample, "
                f"got shape {tuple(shape)}"
            )
        return tuple(shape[1:])

    def randn(
        self, shape: Sequence[int], device: Device, dtype: torch.dtype | None
    ) -> torch.Tensor:
        row = self.rows(shape)
        draws = [torch.randn(row, generator=g, device=device, dtype=dtype) for g in self.generators]
        return torch.stack(draws)

    def rand(self, shape: Sequence[int], device: Device, dtype: torch.dtype | None) -> torch.Tensor:
        row = self.rows(shape)
        draws = [torch.rand(row, generator=g, device=device, dtype=dtype) for g in self.generators]
        return torch.stack(draws)

    def randint(self, high: int, shape: Sequence[int], device: Device) -> torch.Tensor:
        row = self.rows(shape)
        draws = [torch.randint(high, row, generator=g, device=device) for g in self.generators]
        return torch.stack(draws)


Generator = torch.Generator | SampleStreams


def randn(
    shape: Sequence[int],
    generator: Generator | None,
    device: Device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` from ``generator`` (or the global one)."""
    if isinstance(generator, SampleStreams):
        return generator.randn(shape, device, dtype)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def rand(
    shape: Sequence[int],
    generator: Generator | None,
    device: Device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Uniform [0, 1) draws of ``shape`` from ``generator`` (or the global one)."""
    if isinstance(generator, SampleStreams):
        return generator.rand(shape, device, dtype)
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def randint(
    high: int, shape: Sequence[int], generator: Generator | None, device: Device = "cpu"
) -> torch.Tensor:
    """Integers in [0, high) of ``shape`` from ``generator`` (or the global one)."""
    if isinstance(generator, SampleStreams):
        return generator.randint(high, shape, device)
    return torch.randint(high, tuple(shape), generator=generator, device=device)
