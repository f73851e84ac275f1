"""ConFIG: equal unit projections, the length rule, degenerate input, and torchjd."""

from __future__ import annotations

import pytest
import torch

from support.samplers import GENERIC_SAMPLERS, random_jacobian, unit_rows
from taskbalance import imtl_g_weights
from taskbalance.methods.config import config_weights


@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS)
@pytest.mark.parametrize("num_tasks", [2, 3, 6])
def test_update_projects_equally_and_positively_on_unit_gradients(sampler, num_tasks):
    jacobian = sampler(num_tasks, 30, seed=num_tasks)
    update = config_weights(jacobian @ jacobian.T) @ jacobian
    projections = unit_rows(jacobian) @ update
    torch.testing.assert_close(
        projections, projections.mean().expand_as(projections), rtol=1e-7, atol=0
    )
    assert (projections > 0).all()


def test_length_is_the_sum_of_the_projections_on_the_direction():
    jacobian = random_jacobian(4, 12, seed=3)
    update = config_weights(jacobian @ jacobian.T) @ jacobian
    direction = update / update.norm()
    assert update.norm().item() == pytest.approx((jacobian @ direction).sum().item(), rel=1e-10)


def test_direction_is_imtl_g_direction():
    jacobian = GENERIC_SAMPLERS[1](5, 20, seed=4)
    gram = jacobian @ jacobian.T
    ours, imtl = config_weights(gram) @ jacobian, imtl_g_weights(gram) @ jacobian
    torch.testing.assert_close(ours / ours.norm(), imtl / imtl.norm(), rtol=1e-7, atol=1e-9)


def test_exactly_opposite_gradients_give_a_zero_update():
    row = random_jacobian(1, 6, seed=5)
    jacobian = torch.cat([row, -2 * row])
    assert config_weights(jacobian @ jacobian.T).abs().max() < 1e-12


def test_agrees_with_torchjd_on_hundreds_of_jacobians():
    from torchjd.aggregation import ConFIG as TorchJDConFIG

    # torchjd forms pinv(U) of the T x n unit rows, we pinv(C) of the T x T cosines: the same
    # vector in float64, up to the conditioning of C (near-collinear rows: ~1e-4 eigenvalues).
    aggregator = TorchJDConFIG()
    for seed in range(200):
        num_tasks = 2 + seed % 7
        jacobian = GENERIC_SAMPLERS[seed % 4](num_tasks, 20, seed=seed)
        ours = config_weights(jacobian @ jacobian.T) @ jacobian
        theirs = aggregator(jacobian)
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9 * theirs.norm())
