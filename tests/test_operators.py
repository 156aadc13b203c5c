"""Linear operators: adjoint identities, matrix and callable forms agreeing, scale, CG solves."""

import pytest
import torch

from diffusion_lab.operators import (
    FunctionOperator,
    LinearOperator,
    MatrixOperator,
    ScaleOperator,
    conjugate_gradient,
)

B, SHAPE, M = 4, (2, 3, 3), 7
D = 2 * 3 * 3


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def random_matrix() -> torch.Tensor:
    return torch.randn(M, D, generator=generator(), dtype=torch.float64)


def operators() -> dict[str, LinearOperator]:
    a = random_matrix()
    scale = torch.rand(B, generator=generator(), dtype=torch.float64) + 0.5
    return {
        "matrix": MatrixOperator(a),
        "function": FunctionOperator(lambda x: x.flatten(1) @ a.T),
        "function_image_output": FunctionOperator(lambda x: x.flip(-1) * 2.0 - x.roll(1, -2)),
        "scale_float": ScaleOperator(0.7),
        "scale_per_example": ScaleOperator(scale),
    }


@pytest.mark.parametrize("name", list(operators()))
def test_adjoint_identity(name):
    """<A x, v> = <x, A^T v> for random x and v."""
    op = operators()[name]
    g = generator()
    x = torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
    ax = op.apply(x)
    v = torch.randn(ax.shape, generator=g, dtype=torch.float64)
    atv = op.adjoint(v, x)
    assert atv.shape == x.shape
    lhs, rhs = (ax * v).flatten(1).sum(1), (x * atv).flatten(1).sum(1)
    assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-10)


def test_adjoint_by_autograd_works_under_inference_mode():
    op = operators()["function"]
    x = torch.randn(B, *SHAPE, dtype=torch.float64)
    v = torch.randn(B, M, dtype=torch.float64)
    with torch.inference_mode():
        atv = op.adjoint(v, x)
    assert torch.allclose(atv, MatrixOperator(random_matrix()).adjoint(v, x))


def test_matrix_and_function_operators_agree():
    """The same matrix as a MatrixOperator (direct solve) and as a FunctionOperator (autograd
    adjoint, conjugate gradients): same apply, adjoint and gram_solve."""
    a = random_matrix()
    by_matrix, by_function = MatrixOperator(a), FunctionOperator(lambda x: x.flatten(1) @ a.T)
    g = generator()
    x = torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
    v = torch.randn(B, M, generator=g, dtype=torch.float64)
    gamma = torch.rand(B, generator=g, dtype=torch.float64) + 0.1
    lam = torch.rand(B, generator=g, dtype=torch.float64) + 0.1
    assert by_matrix.apply(x).shape == (B, M)
    assert torch.allclose(by_matrix.apply(x), by_function.apply(x), atol=1e-12)
    assert torch.allclose(by_matrix.adjoint(v, x), by_function.adjoint(v, x), atol=1e-12)
    u_direct = by_matrix.gram_solve(v, x, gamma, lam)
    u_cg = by_function.gram_solve(v, x, gamma, lam)
    assert torch.allclose(u_direct, u_cg, atol=1e-8)
    residual = (
        gamma[:, None] * by_matrix.apply(by_matrix.adjoint(u_direct, x)) + lam[:, None] * u_direct
    )
    assert torch.allclose(residual, v, atol=1e-10)


def test_default_gram_solve_with_image_shaped_output():
    """The conjugate-gradient default serves operators whose output is shaped like x (a blur)."""
    op = operators()["function_image_output"]
    g = generator()
    x = torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
    rhs = torch.randn(op.apply(x).shape, generator=g, dtype=torch.float64)
    gamma, lam = (
        torch.full((B,), 0.5, dtype=torch.float64),
        torch.full((B,), 0.2, dtype=torch.float64),
    )
    u = op.gram_solve(rhs, x, gamma, lam)
    assert u.shape == rhs.shape
    residual = 0.5 * op.apply(op.adjoint(u, x)) + 0.2 * u
    assert torch.allclose(residual, rhs, atol=1e-8)


def test_scale_operator_per_example_matches_direct_multiplication():
    scale = torch.tensor([0.5, 1.0, 2.0, -3.0], dtype=torch.float64)
    op = ScaleOperator(scale)
    g = generator()
    x = torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
    direct = torch.stack([s * xi for s, xi in zip(scale, x, strict=True)])
    assert op.apply(x).shape == x.shape
    assert torch.equal(op.apply(x), direct) and torch.equal(op.adjoint(x, x), direct)
    gamma, lam = (
        torch.full((B,), 0.3, dtype=torch.float64),
        torch.full((B,), 0.1, dtype=torch.float64),
    )
    u = op.gram_solve(x, x, gamma, lam)
    assert torch.allclose(0.3 * op.apply(op.adjoint(u, x)) + 0.1 * u, x, atol=1e-12)
    points = torch.randn(B, 2, generator=g, dtype=torch.float64)  # 2-D toy points too
    assert torch.equal(op.apply(points), scale[:, None] * points)


def test_conjugate_gradient_matches_linalg_solve_on_spd_system():
    g = generator()
    q = torch.randn(6, 6, generator=g, dtype=torch.float64)
    spd = q @ q.T + 0.5 * torch.eye(6, dtype=torch.float64)
    rhs = torch.randn(3, 6, generator=g, dtype=torch.float64)
    u = conjugate_gradient(lambda p: p @ spd.T, rhs, iters=50)
    expected = torch.linalg.solve(spd, rhs.T).T
    assert torch.allclose(u, expected, atol=1e-8)
