"""Linear operators on batches: the measurement A of a linear inverse problem (y = A x + n) and
the corruption C_t of Soft Diffusion (x_t = C_t x0 + sigma_t z: a blur, a mask, alpha(t) I).

A subclass gives ``apply``; the adjoint defaults to autograd (a vector-Jacobian product, valid
because the map is linear) and the per-example solve of (gamma A A^T + lam I) u = rhs to
conjugate gradients; subclasses with a closed form override them. Plain PyTorch, no Lightning.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffusion_lab.utils import append_dims


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    iters: int,
    tol: float = 1e-10,
) -> torch.Tensor:
    """Solve the symmetric positive definite systems matvec(u) = rhs, batched over rows."""
    u = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(1, keepdim=True)
    for _ in range(iters):
        ap = matvec(p)
        step = rs / (p * ap).sum(1, keepdim=True).clamp_min(1e-30)
        u, r = u + step * p, r - step * ap
        rs_new = (r * r).sum(1, keepdim=True)
        if float(rs_new.max()) < tol:
            break
        p = r + rs_new / rs.clamp_min(1e-30) * p
        rs = rs_new
    return u


class LinearOperator(abc.ABC):
    """A linear map A on batches: apply(x) -> A x (shape (B, ...)); adjoint(v, like) -> A^T v
    shaped like ``like``."""

    #: Iterations of the default (conjugate-gradient) :meth:`gram_solve`.
    cg_iters: int = 50

    @abc.abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A x for a batch x of shape (B, ...)."""

    def adjoint(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A^T v (v shaped like ``apply``'s output), shaped like ``like``: the vector-Jacobian
        product of ``apply`` at zeros_like(like), also inside ``no_grad`` / ``inference_mode``."""
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.zeros_like(like).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.apply(x), x, grad_outputs=v.detach().clone())
        return grad.detach()

    def gram_solve(
        self, rhs: torch.Tensor, like: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        """u with (gamma A A^T + lam I) u = rhs per example (rhs shaped like ``apply``'s output,
        gamma and lam of shape (B,)), by ``cg_iters`` conjugate-gradient iterations."""
        gamma, lam = append_dims(gamma.to(rhs), rhs.ndim), append_dims(lam.to(rhs), rhs.ndim)

        def matvec(u: torch.Tensor) -> torch.Tensor:
            u = u.reshape(rhs.shape)
            return (gamma * self.apply(self.adjoint(u, like)) + lam * u).flatten(1)

        return conjugate_gradient(matvec, rhs.flatten(1), self.cg_iters).reshape(rhs.shape)


@dataclass
class MatrixOperator(LinearOperator):
    """A (M, D) matrix acting on flattened x: apply gives (B, M); the solve is direct."""

    matrix: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.matrix.to(x).T

    def adjoint(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (v @ self.matrix.to(v)).reshape(like.shape)

    def gram_solve(
        self, rhs: torch.Tensor, like: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        """u with (gamma A A^T + lam I) u = rhs per example, by ``torch.linalg.solve``."""
        a = self.matrix.to(rhs)
        eye = torch.eye(a.shape[0], dtype=rhs.dtype, device=rhs.device)
        system = append_dims(gamma.to(rhs), 3) * (a @ a.T) + append_dims(lam.to(rhs), 3) * eye
        return torch.linalg.solve(system, rhs)


@dataclass
class FunctionOperator(LinearOperator):
    """A linear callable ``function(x) -> (B, ...)``; apply flattens its output to (B, M)."""

    function: Callable[[torch.Tensor], torch.Tensor]
    cg_iters: int = 50

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x).flatten(1)


@dataclass
class ScaleOperator(LinearOperator):
    """A x = scale x, ``scale`` a float or one per example (B,): C_t = alpha(t) I. Self-adjoint;
    the solve is a division."""

    scale: torch.Tensor | float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return append_dims(torch.as_tensor(self.scale).to(x), x.ndim) * x

    def adjoint(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.apply(v).reshape(like.shape)

    def gram_solve(
        self, rhs: torch.Tensor, like: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        """rhs / (gamma scale^2 + lam), per example."""
        scale = torch.as_tensor(self.scale).to(rhs)
        return rhs / append_dims(gamma.to(rhs) * scale**2 + lam.to(rhs), rhs.ndim)
