"""PCGrad: no remaining conflict, reproducible randomness, and exact agreement with torchjd."""

from __future__ import annotations

import pytest
import torch

from support.samplers import GENERIC_SAMPLERS, conflicting, random_jacobian
from taskbalance.methods.pcgrad import PCGrad, pcgrad_projections, pcgrad_weights


@pytest.mark.parametrize("seed", range(20))
def test_two_tasks_keep_no_conflict_after_projection(seed):
    jacobian = conflicting(2, 15, seed=seed)
    gram = jacobian @ jacobian.T
    projected = pcgrad_projections(gram) @ gram  # row i: g_i^PC . g_j
    assert projected[0, 1] >= -1e-12 * gram.diagonal().max()
    assert projected[1, 0] >= -1e-12 * gram.diagonal().max()
    update = pcgrad_weights(gram) @ jacobian
    assert (jacobian @ update >= -1e-12 * gram.diagonal().max()).all()


def test_non_conflicting_gradients_are_summed_unchanged():
    jacobian = random_jacobian(4, 10, seed=0).abs()  # all inner products positive
    assert pcgrad_weights(jacobian @ jacobian.T).tolist() == [1.0] * 4


def test_projection_removes_exactly_the_conflicting_component():
    gram = torch.tensor([[1.0, -1.0], [-1.0, 4.0]], dtype=torch.float64)
    # g_1^PC = g_1 + (1/4) g_2 and g_2^PC = g_2 + g_1.
    torch.testing.assert_close(
        pcgrad_projections(gram), torch.tensor([[1.0, 0.25], [1.0, 1.0]], dtype=torch.float64)
    )


def test_zero_gradient_neither_projects_nor_is_projected():
    jacobian = conflicting(3, 8, seed=1)
    jacobian[2] = 0
    coefficients = pcgrad_projections(jacobian @ jacobian.T)
    assert coefficients[:, 2].tolist() == [0.0, 0.0, 1.0]


def test_same_seed_gives_the_same_weights():
    gram = conflicting(6, 20, seed=2) @ conflicting(6, 20, seed=2).T
    first = PCGrad(seed=7).shared_weights(torch.ones(6), gram)
    second = PCGrad(seed=7).shared_weights(torch.ones(6), gram)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_state_dict_restores_the_generator():
    jacobian = conflicting(6, 20, seed=3)
    gram = jacobian @ jacobian.T
    method = PCGrad(seed=1)
    method.shared_weights(torch.ones(6), gram)
    saved = method.state_dict()
    expected = method.shared_weights(torch.ones(6), gram)
    restored = PCGrad(seed=99)
    restored.load_state_dict(saved)
    torch.testing.assert_close(restored.shared_weights(torch.ones(6), gram), expected)


def test_parameter_level_is_the_default():
    assert PCGrad().level == "parameter"


def test_agrees_exactly_with_torchjd_under_the_same_seed():
    from torchjd.aggregation import PCGradWeighting

    # Same draws (one randperm(T) per task from a generator in the same state), same float64
    # arithmetic: the weights agree to rounding.
    for seed in range(200):
        num_tasks = 2 + seed % 5
        jacobian = GENERIC_SAMPLERS[seed % 4](num_tasks, 30, seed=seed)
        gram = jacobian @ jacobian.T
        torch.manual_seed(seed)
        theirs = PCGradWeighting()(gram)
        ours = pcgrad_weights(gram, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
