"""Wall-clock totals of the phases of one Fokker-Planck solve (``FPSolution.seconds``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

#: The phases a solve times, in the order ``FPSolution.seconds`` lists them (then "total").
PHASES = ("kde", "assembly", "factorisation", "solve", "transport")


class SolveTimer:
    """Named totals of ``time.perf_counter`` seconds; ``with timer("assembly"): ...`` adds the
    block's duration to that phase's total. The clock of "total" starts with the timer."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time the block into ``phase`` (one of :data:`PHASES`)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[phase] += time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        """The phase totals and "total", the seconds since the timer was made."""
        return {**self.totals, "total": time.perf_counter() - self.started}
