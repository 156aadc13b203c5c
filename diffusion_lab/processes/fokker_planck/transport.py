"""The known coefficients of each step, and the transport of the image (Na, Gao, Wan 2024,
sec. 3.4, eq. 21, with the velocity of eq. 3).

Erratum: eq. 20 prints (f - 1/2 g^2) grad m; the transport ODE has velocity f - 1/2 g^2 grad m.
a^{n-1} = f(x^{n-1}, t_{n-1}) - 1/2 g(t_{n-1})^2 s^{n-1}, x^n = x^{n-1} + dt a^{n-1}
(``velocity="previous"``), with the score s^n = D m^n (eq. 19, zero padded). Since
f^n = f(x^n, t_n) enters the step for m^n and x^n needs m^{n-1}, the march INTERLEAVES:
x^n = transport(x^{n-1}, m^{n-1}) first, then f^n = f(x^n, t_n), then the fixed-point solve for
m^n. ``velocity="average"`` is Heun's method: the predictor x~^n = x^{n-1} + dt a^{n-1},
f^n = f(x~^n, t_n), m^n solved at the predictor, a^n = f^n - 1/2 (g^n)^2 D m^n, and the corrector
x^n = x^{n-1} + dt (a^{n-1} + a^n) / 2 (m^n is not re-solved at the corrected x^n).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from .grid import grad_sum
from .timer import SolveTimer

DriftFn = Callable[[np.ndarray, float], np.ndarray]
DiffusionFn = Callable[[float], float]

VELOCITIES = ("previous", "average")


class Fields(Protocol):
    """The known coefficients of step n of the march: f^n and the forcing of eq. 15."""

    def begin(self) -> None:
        """Called at the start of every pass over the horizon."""

    def before(self, n: int, m_prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(f^n, forcing^n), given m^{n-1}."""

    def after(self, n: int, m: np.ndarray) -> None:
        """Called with m^n once it is solved."""


def transport_step(
    x_prev: np.ndarray, drift_prev: np.ndarray, g_prev: float, score_prev: np.ndarray, dt: float
) -> np.ndarray:
    """Eq. 21 with the velocity of eq. 3: x^n = x^{n-1} + dt (f^{n-1} - 1/2 (g^{n-1})^2 s^{n-1})."""
    return x_prev + dt * (drift_prev - 0.5 * g_prev**2 * score_prev)


class TransportFields:
    """f^n = f(x^n, t_n) with x^n transported from x^{n-1} by m^{n-1} (interleaved), forcing
    -(D f^n); ``x`` holds x^0 = image .. x^N."""

    def __init__(
        self,
        image: np.ndarray,
        drift: DriftFn,
        diffusion: DiffusionFn,
        times: np.ndarray,
        h: float,
        velocity: str,
        timer: SolveTimer,
    ) -> None:
        self.drift, self.diffusion, self.times, self.h = drift, diffusion, times, h
        self.velocity, self.timer = velocity, timer
        self.dt = float(times[1] - times[0])
        self.x = np.zeros((len(times), *image.shape))
        self.x[0] = image

    def begin(self) -> None:
        self.drift_prev = np.asarray(self.drift(self.x[0], float(self.times[0])), dtype=np.float64)

    def before(self, n: int, m_prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.timer("transport"):
            g_prev = self.diffusion(float(self.times[n - 1]))
            score_prev = grad_sum(m_prev, self.h)
            self.a_prev = self.drift_prev - 0.5 * g_prev**2 * score_prev
            self.x[n] = transport_step(self.x[n - 1], self.drift_prev, g_prev, score_prev, self.dt)
            f = np.asarray(self.drift(self.x[n], float(self.times[n])), dtype=np.float64)
            self.drift_prev = f
        return f, -grad_sum(f, self.h)

    def after(self, n: int, m: np.ndarray) -> None:
        if self.velocity == "previous":
            return
        with self.timer("transport"):  # Heun: correct x^n with a^n at the predictor
            g = self.diffusion(float(self.times[n]))
            a_n = self.drift_prev - 0.5 * g**2 * grad_sum(m, self.h)
            self.x[n] = self.x[n - 1] + self.dt * 0.5 * (self.a_prev + a_n)
            x_n, t_n = self.x[n], float(self.times[n])
            self.drift_prev = np.asarray(self.drift(x_n, t_n), dtype=np.float64)
