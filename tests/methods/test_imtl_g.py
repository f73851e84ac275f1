"""IMTL-G: the weights' defining property, their invariances, degenerate inputs, and torchjd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import taskbalance
from support.samplers import GENERIC_SAMPLERS, near_collinear, random_jacobian, unit_rows
from taskbalance import imtl_g_weights
from taskbalance.engine.placement import HostGramian


@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS)
@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
def test_update_projects_equally_on_unit_gradients(sampler, num_tasks):
    jacobian = sampler(num_tasks, dim=50, seed=num_tasks)
    update = imtl_g_weights(jacobian @ jacobian.T) @ jacobian
    projections = unit_rows(jacobian) @ update
    torch.testing.assert_close(
        projections, projections.mean().expand_as(projections), rtol=1e-7, atol=0
    )


@pytest.mark.parametrize("num_tasks", [2, 4, 8])
def test_weights_sum_to_one(num_tasks):
    jacobian = random_jacobian(num_tasks, 30, seed=7)
    assert imtl_g_weights(jacobian @ jacobian.T).sum().item() == pytest.approx(1.0, abs=1e-12)


def test_single_task_gets_weight_one():
    assert imtl_g_weights(torch.tensor([[4.0]])).tolist() == [1.0]


@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS)
def test_direction_is_invariant_to_positive_loss_scaling(sampler):
    jacobian = sampler(4, dim=20, seed=3)
    scaled = torch.tensor([[1e-3], [1.0], [10.0], [250.0]], dtype=torch.float64) * jacobian
    update = imtl_g_weights(jacobian @ jacobian.T) @ jacobian
    scaled_update = imtl_g_weights(scaled @ scaled.T) @ scaled
    torch.testing.assert_close(
        scaled_update / scaled_update.norm(), update / update.norm(), rtol=1e-8, atol=1e-10
    )


def test_weights_do_not_depend_on_the_overall_gradient_scale():
    jacobian = random_jacobian(3, 10, seed=0)
    gram = jacobian @ jacobian.T
    torch.testing.assert_close(imtl_g_weights(1e-12 * gram), imtl_g_weights(gram))


def test_weights_are_not_clamped_to_be_nonnegative():
    # Full-rank, yet equal projections need a negative weight on the first gradient.
    jacobian = torch.tensor(
        [[1.5, -0.3, -2.2], [0.6, -1.1, -1.4], [0.4, 0.8, -0.7]], dtype=torch.float64
    )
    weights = imtl_g_weights(jacobian @ jacobian.T)
    assert (weights < 0).any()
    projections = unit_rows(jacobian) @ (weights @ jacobian)
    torch.testing.assert_close(projections, projections.mean().expand(3), rtol=1e-9, atol=0)


def test_identical_gradients_get_equal_weights():
    row = torch.randn(1, 6, dtype=torch.float64)
    jacobian = row.repeat(3, 1)
    torch.testing.assert_close(
        imtl_g_weights(jacobian @ jacobian.T), torch.full((3,), 1 / 3, dtype=torch.float64)
    )


def test_zero_gradient_task_gets_weight_zero_and_others_stay_impartial():
    jacobian = random_jacobian(3, 8, seed=2)
    jacobian[1] = 0
    weights = imtl_g_weights(jacobian @ jacobian.T)
    assert weights[1] == 0
    alive = jacobian[[0, 2]]
    projections = unit_rows(alive) @ (weights @ jacobian)
    torch.testing.assert_close(projections[0], projections[1], rtol=1e-9, atol=0)


def test_all_zero_gradients_fall_back_to_equal_weights():
    torch.testing.assert_close(imtl_g_weights(torch.zeros(4, 4)), torch.full((4,), 0.25))


def test_exactly_opposite_gradients_fall_back_to_equal_weights():
    row = torch.randn(1, 5, dtype=torch.float64)
    jacobian = torch.cat([row, -row])
    torch.testing.assert_close(
        imtl_g_weights(jacobian @ jacobian.T), torch.tensor([0.5, 0.5], dtype=torch.float64)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_keep_the_gramian_dtype_and_solve_in_double(dtype):
    jacobian = near_collinear(4, 30, seed=5).to(dtype)
    weights = imtl_g_weights(jacobian @ jacobian.T)
    assert weights.dtype == dtype
    assert torch.isfinite(weights).all()


def test_rejects_a_non_square_gramian():
    with pytest.raises(ValueError, match="must be square"):
        imtl_g_weights(torch.ones(2, 3))


def test_agrees_with_torchjd_on_hundreds_of_jacobians():
    from torchjd.aggregation import IMTLG as TorchJDIMTLG

    torchjd_weighting = TorchJDIMTLG().gramian_weighting
    checked = 0
    for seed in range(300):
        sampler = GENERIC_SAMPLERS[seed % len(GENERIC_SAMPLERS)]
        num_tasks = 2 + seed % 7
        jacobian = sampler(num_tasks, dim=40, seed=seed)
        gram = jacobian @ jacobian.T
        ours = imtl_g_weights(gram)
        theirs = torchjd_weighting(gram)
        # Both solve the same pinv system in float64; the spread comes from conditioning.
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)
        checked += 1
    assert checked == 300


@pytest.mark.parametrize("method", [taskbalance.IMTLG(), taskbalance.IMTL(tasks=8)])
def test_the_steps_host_solve_equals_the_tensor_solve(method):
    checked = 0
    for seed in range(100):
        sampler = GENERIC_SAMPLERS[seed % len(GENERIC_SAMPLERS)]
        num_tasks = 2 + seed % 7
        gram = (lambda j: j @ j.T)(sampler(num_tasks, dim=40, seed=seed))
        k = gram.numpy()
        norms = np.sqrt(np.diagonal(k))
        host = HostGramian(norms, k / np.outer(norms, norms), torch.finfo(gram.dtype).eps)
        ours = method.host_weights(torch.ones(num_tasks), host)
        torch.testing.assert_close(torch.from_numpy(ours), imtl_g_weights(gram), rtol=1e-9, atol=0)
        checked += 1
    assert checked == 100
