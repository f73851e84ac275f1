"""Aligned-MTL: the aligned system has condition number 1, and torchjd agrees."""

from __future__ import annotations

import pytest
import torch

from support.samplers import GENERIC_SAMPLERS, random_jacobian, rank_deficient
from taskbalance.methods.aligned_mtl import AlignedMTL, aligned_mtl_weights


def _balance(jacobian: torch.Tensor) -> torch.Tensor:
    """The aligned gradients B G, recovered column by column from the weights of unit vectors."""
    gram = jacobian @ jacobian.T
    values, vectors = torch.linalg.eigh(gram)
    keep = values > values.max() * gram.shape[0] * torch.finfo(torch.float64).eps
    values, vectors = values[keep], vectors[:, keep]
    return values.min().sqrt() * (vectors / values.sqrt()) @ vectors.T @ jacobian


@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS)
def test_aligned_gradients_share_the_smallest_singular_value(sampler):
    jacobian = sampler(4, 20, seed=2)
    singular = torch.linalg.svdvals(_balance(jacobian))
    smallest = torch.linalg.svdvals(jacobian).min()
    torch.testing.assert_close(singular, smallest.expand(4), rtol=1e-7, atol=0)
    # ... and the weights are the sum of the aligned gradients.
    weights = aligned_mtl_weights(jacobian @ jacobian.T)
    torch.testing.assert_close(weights @ jacobian, _balance(jacobian).sum(dim=0))


def test_rank_deficient_gradients_use_the_smallest_nonzero_singular_value():
    jacobian = rank_deficient(6, 20, seed=3)
    update = aligned_mtl_weights(jacobian @ jacobian.T) @ jacobian
    assert torch.isfinite(update).all() and update.norm() > 0


def test_orthogonal_gradients_are_rescaled_to_the_shortest_length():
    weights = aligned_mtl_weights(torch.diag(torch.tensor([1.0, 9.0, 100.0], dtype=torch.float64)))
    torch.testing.assert_close(weights, torch.tensor([1.0, 1 / 3, 0.1], dtype=torch.float64))


def test_rejects_an_unknown_scale():
    with pytest.raises(ValueError, match="scale"):
        AlignedMTL(scale="max")


@pytest.mark.parametrize(
    ("ours", "theirs"), [("min", "min"), ("median", "median"), ("mean", "rmse")]
)
def test_agrees_with_torchjd_on_hundreds_of_jacobians(ours, theirs):
    from torchjd.aggregation import AlignedMTLWeighting

    # Same eigendecomposition and cut-off in float64; torchjd weights by the mean (1/T), we sum.
    # Eigenvectors of Gramians whose diagonal spans 1e12 (scaled rows) carry errors of about
    # eps * condition, so agreement is 1e-4 relative in the worst case and 1e-8 on most inputs.
    weighting = AlignedMTLWeighting(scale_mode=theirs)
    count = 200 if ours == "min" else 100
    tight = 0
    for seed in range(count):
        num_tasks = 2 + seed % 7
        jacobian = GENERIC_SAMPLERS[seed % 4](num_tasks, 40, seed=seed)
        gram = jacobian @ jacobian.T
        mine, reference = aligned_mtl_weights(gram, ours), num_tasks * weighting(gram)
        error = float((mine - reference).abs().max() / reference.abs().max())
        assert error < 1e-4
        tight += error < 1e-8
    assert tight >= 0.9 * count


def test_default_is_the_paper_setting():
    method = AlignedMTL()
    assert method.level == "parameter" and method.scale == "min"
    jacobian = random_jacobian(3, 5, seed=0)
    assert torch.isfinite(method.shared_weights(torch.ones(3), jacobian @ jacobian.T)).all()
