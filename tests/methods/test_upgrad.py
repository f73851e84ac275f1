"""UPGrad: the update conflicts with no task, reduces to the mean without conflict, and agrees
with torchjd's UPGrad weighting run with an independent (scipy NNLS) dual-cone projector."""

from __future__ import annotations

import pytest
import torch

from support.samplers import GENERIC_SAMPLERS, random_jacobian
from taskbalance.methods.upgrad import dual_cone_weights, upgrad_weights


@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS)
@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8, 20])
def test_update_is_non_conflicting(sampler, num_tasks):
    jacobian = sampler(num_tasks, 30, seed=num_tasks)
    gram = jacobian @ jacobian.T
    improvements = gram @ upgrad_weights(gram)
    # Exact active-set solve: only rounding, relative to the largest gradient's square norm.
    assert improvements.min() >= -1e-10 * gram.diagonal().max()


def test_no_conflict_gives_the_mean():
    jacobian = random_jacobian(4, 10, seed=1).abs()
    torch.testing.assert_close(
        upgrad_weights(jacobian @ jacobian.T), torch.full((4,), 0.25, dtype=torch.float64)
    )


@pytest.mark.parametrize("seed", range(10))
def test_projection_satisfies_the_kkt_conditions(seed):
    jacobian = GENERIC_SAMPLERS[seed % 4](5, 12, seed=seed)
    gram = jacobian @ jacobian.T
    u = torch.rand(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = dual_cone_weights(gram, u)
    products = gram @ v
    scale = gram.diagonal().max() * v.abs().max()
    assert (v >= u - 1e-15).all() and (products >= -1e-10 * scale).all()
    assert ((v - u) * products).abs().max() <= 1e-10 * scale  # complementary slackness


class _NNLSProjector:
    """An independent dual-cone projector for torchjd: Lawson-Hanson NNLS (scipy) on a square
    root of the Gramian, without torchjd's normalisation and 1e-4 regularisation."""

    def __call__(self, u_matrix: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        import numpy as np
        from scipy.optimize import nnls

        values, vectors = np.linalg.eigh(gram.numpy())
        root = (vectors * np.sqrt(np.clip(values, 0, None))).T  # root^T root = gram
        rows = []
        for u in u_matrix.numpy():
            x, _ = nnls(root, -root @ u, maxiter=1000)  # min ||root (u + x)||, x >= 0
            rows.append(u + x)
        return torch.tensor(np.array(rows), dtype=gram.dtype)


def test_agrees_with_torchjd_upgrad_on_hundreds_of_jacobians():
    pytest.importorskip("scipy")
    from torchjd.aggregation import UPGradWeighting

    # torchjd's UPGrad weighting (diag(1/T) rows, projected, summed) with the NNLS projector:
    # both solve the same QPs exactly in float64. NNLS works on a square root of K from an
    # eigendecomposition, which loses accuracy when K's diagonal spans 1e12 (scaled rows): the
    # aggregated vectors agree to 1e-4 relative in the worst case and to 1e-7 on most inputs.
    weighting = UPGradWeighting(projector=_NNLSProjector())
    tight = 0
    for seed in range(200):
        num_tasks = 2 + seed % 6
        jacobian = GENERIC_SAMPLERS[seed % 4](num_tasks, 30, seed=seed)
        gram = jacobian @ jacobian.T
        ours = upgrad_weights(gram) @ jacobian
        theirs = weighting(gram) @ jacobian
        error = float((ours - theirs).norm() / theirs.norm())
        assert error < 1e-4
        tight += error < 1e-7
    assert tight >= 190
