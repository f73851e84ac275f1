"""The shared T x T solvers against brute force and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support.samplers import DEGENERATE_SAMPLERS, GENERIC_SAMPLERS
from taskbalance.methods._simplex import active_set, nonnegative_qp, project_simplex, simplex_qp


@pytest.mark.parametrize("seed", range(20))
def test_projection_onto_the_simplex_is_the_closest_point(seed):
    generator = torch.Generator().manual_seed(seed)
    vector = 3 * torch.randn(6, generator=generator, dtype=torch.float64)
    projection = project_simplex(vector)
    assert projection.min() >= 0 and projection.sum().item() == pytest.approx(1.0, abs=1e-12)
    # Variational inequality: (v - p) . (q - p) <= 0 for every q in the simplex (vertices).
    assert ((torch.eye(6, dtype=torch.float64) - projection) @ (vector - projection)).max() <= 1e-12


@pytest.mark.parametrize("seed", range(30))
def test_simplex_qp_with_a_linear_term_matches_scipy(seed):
    optimize = pytest.importorskip("scipy.optimize")
    num = 2 + seed % 6
    jacobian = GENERIC_SAMPLERS[seed % 4](num, 20, seed=seed)
    q = jacobian @ jacobian.T
    b = q @ torch.randn(num, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = simplex_qp(q, b)
    result = optimize.minimize(
        lambda x: 0.5 * x @ q.numpy() @ x + b.numpy() @ x,
        torch.full((num,), 1.0 / num).numpy(),
        bounds=[(0, 1)] * num,
        constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},),
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    value = float(0.5 * ours @ q @ ours + b @ ours)
    assert value <= result.fun + 1e-9 * (abs(result.fun) + 1)


@pytest.mark.parametrize("seed", range(30))
def test_nonnegative_qp_matches_scipy_nnls(seed):
    np = pytest.importorskip("numpy")
    optimize = pytest.importorskip("scipy.optimize")
    num = 2 + seed % 6
    jacobian = GENERIC_SAMPLERS[seed % 4](num, 20, seed=seed)
    target = torch.randn(20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # min ||J^T x - t||^2 over x >= 0  <=>  1/2 x^T K x - (J t)^T x.
    ours = nonnegative_qp(jacobian @ jacobian.T, -(jacobian @ target))
    theirs, _ = optimize.nnls(jacobian.T.numpy(), target.numpy())
    residual = lambda x: np.linalg.norm(jacobian.T.numpy() @ x - target.numpy())  # noqa: E731
    assert residual(ours.numpy()) <= residual(theirs) * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("seed", range(40))
def test_trying_every_face_gives_the_active_set_loops_minimiser(seed):
    """A single problem of T <= 4 takes the every-face path; a batch of two takes the loop."""
    num = 2 + seed % 3
    sampler = (*GENERIC_SAMPLERS, *DEGENERATE_SAMPLERS)[seed % (len(GENERIC_SAMPLERS) + 2)]
    jacobian = sampler(num, 6, seed=seed)
    q = (jacobian @ jacobian.T).numpy()
    generator = torch.Generator().manual_seed(seed)
    b = (
        q @ torch.randn(num, generator=generator, dtype=torch.float64).numpy()
        if seed % 2
        else 0 * q[0]
    )
    faces = active_set(q, b, simplex=True)
    loop = active_set(q, np.stack([b, b]), simplex=True)[0]
    objective = lambda x: 0.5 * x @ q @ x + b @ x  # noqa: E731
    assert faces.min() >= 0 and faces.sum() == pytest.approx(1.0, abs=1e-12)
    assert objective(faces) <= objective(loop) + 1e-12 * (abs(objective(loop)) + np.abs(q).max())
    np.testing.assert_allclose(faces, loop, atol=1e-6)
