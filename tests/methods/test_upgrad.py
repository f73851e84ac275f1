"""UPGrad: the update conflicts with no task, reduces to the mean without conflict, and agrees
with torchjd's UPGrad weighting run with an independent (scipy NNLS) dual-cone projector."""

from __future__ import annotations

import pytest
import torch

from support.samplers import DEGENERATE_SAMPLERS, GENERIC_SAMPLERS, random_jacobian
from taskbalance.methods._simplex import nonnegative_qp
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


def _conflicting_pairs(num_tasks: int, dim: int, seed: int) -> torch.Tensor:
    """The first half of the gradients pushed towards the second half: many conflicts."""
    jacobian = random_jacobian(num_tasks, dim, seed)
    half = num_tasks // 2
    jacobian[:half] += 2 * jacobian[half : 2 * half]
    return jacobian


_ALL_SAMPLERS = [*GENERIC_SAMPLERS, *DEGENERATE_SAMPLERS, _conflicting_pairs]


@pytest.mark.parametrize("sampler", _ALL_SAMPLERS)
@pytest.mark.parametrize(("num_tasks", "dim"), [(3, 30), (8, 30), (16, 10), (32, 20), (32, 200)])
def test_every_batched_projection_satisfies_the_kkt_conditions(sampler, num_tasks, dim):
    """The warm-started batch of T problems, each checked directly: x >= 0, K x + c >= 0 and
    x_j (K x + c)_j = 0, with c = K u_i, up to rounding of |K v_i| <= max(diag K) |v_i|_1."""
    for seed in range(3):
        jacobian = sampler(num_tasks, dim, seed=seed)
        gram = jacobian @ jacobian.T
        base = torch.eye(num_tasks, dtype=torch.float64) / num_tasks
        x = nonnegative_qp(gram, gram / num_tasks)
        gradient = (base + x) @ gram  # row i: K (u_i + x_i) = K x_i + c_i (K symmetric)
        scale = gram.diagonal().max() * (base + x).abs().sum(dim=1, keepdim=True) + 1e-300
        assert (x >= 0).all()
        assert (gradient >= -1e-10 * scale).all()
        assert ((x * gradient).abs() <= 1e-10 * scale * x.abs().max()).all()


@pytest.mark.parametrize("sampler", _ALL_SAMPLERS)
@pytest.mark.parametrize(("num_tasks", "dim"), [(8, 30), (32, 20), (32, 2000)])
def test_agrees_with_torchjd_upgrad_up_to_32_tasks_and_on_degenerate_jacobians(
    sampler, num_tasks, dim
):
    """torchjd's UPGrad weighting with the independent NNLS projector, on more tasks than
    dimensions (the dual cone is then often {0}, and the weights are not unique: only the
    aggregated vector is compared, relative to the largest gradient)."""
    pytest.importorskip("scipy")
    from torchjd.aggregation import UPGradWeighting

    weighting = UPGradWeighting(projector=_NNLSProjector())
    for seed in range(2):
        jacobian = sampler(num_tasks, dim, seed=seed)
        gram = jacobian @ jacobian.T
        ours = upgrad_weights(gram) @ jacobian
        theirs = weighting(gram) @ jacobian
        largest = float(jacobian.norm(dim=1).max()) + 1e-300
        assert float((ours - theirs).norm()) <= 1e-6 * largest
