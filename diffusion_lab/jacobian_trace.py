"""The trace of a Jacobian, exact or by Hutchinson's estimator, via vector-Jacobian products.

Shared by the likelihood's divergence of the probability flow (Song et al. 2021 App. D.2) and
by implicit / sliced score matching (Hyvarinen 2005; Khungurn sec. 2, Theorem 1), whose loss
holds tr(grad_x s(x)).

Hutchinson (1990): tr(J) = E[e^T J e] for any probe with E[e e^T] = I. Rademacher probes (+-1)
have the smaller variance (2 sum_{i != j} J_ij^2 against Gaussian's 2 ||J||_F^2, for symmetric
J); both are unbiased. One probe costs one vector-Jacobian product; the exact trace costs D.
"""

from __future__ import annotations

import torch

from diffusion_lab.errors import ConfigError

PROBES = ("rademacher", "gaussian")


def make_probe(
    x: torch.Tensor, kind: str = "rademacher", generator: torch.Generator | None = None
) -> torch.Tensor:
    """A probe e shaped like x with E[e e^T] = I: Rademacher (+-1) or standard Gaussian."""
    if kind == "rademacher":
        bits = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
        return (2 * bits - 1).to(x.dtype)
    if kind == "gaussian":
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    raise ConfigError(f"unknown probe {kind!r}: use one of {PROBES}")


def hutchinson_trace(
    y: torch.Tensor, x: torch.Tensor, probe: torch.Tensor, create_graph: bool = False
) -> torch.Tensor:
    """e^T (dy/dx) e per example (B,), for y = f(x) shaped like x, from one vector-Jacobian
    product; ``create_graph`` keeps it differentiable (for a loss)."""
    (vjp,) = torch.autograd.grad(y, x, grad_outputs=probe, create_graph=create_graph)
    return (vjp * probe).flatten(1).sum(1)


def exact_trace(y: torch.Tensor, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """tr(dy/dx) per example (B,): the D diagonal entries, one vector-Jacobian product each
    (each example's y depends only on its own x)."""
    flat_y, dim = y.flatten(1), x[0].numel()
    trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(dim):
        keep = create_graph or i < dim - 1
        (row,) = torch.autograd.grad(
            flat_y[:, i].sum(), x, retain_graph=keep, create_graph=create_graph
        )
        trace = trace + row.flatten(1)[:, i]
    return trace
