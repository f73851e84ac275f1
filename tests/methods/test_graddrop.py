"""GradDrop: sign purity masks, the leak, reproducibility, and exact agreement with torchjd."""

from __future__ import annotations

import pytest
import torch

from support.samplers import GENERIC_SAMPLERS, conflicting, random_jacobian
from taskbalance.methods.graddrop import GradDrop, graddrop_update


def test_full_leak_is_the_plain_sum():
    jacobian = conflicting(3, 20, seed=0)
    torch.testing.assert_close(graddrop_update(jacobian, leak=1.0), jacobian.sum(dim=0))


def test_coordinates_of_one_sign_pass_unchanged():
    jacobian = random_jacobian(4, 30, seed=1).abs() * torch.tensor([1.0, -1.0]).repeat(15)
    torch.testing.assert_close(graddrop_update(jacobian), jacobian.sum(dim=0))


def test_each_coordinate_keeps_only_one_sign():
    jacobian = conflicting(5, 200, seed=2)
    update = graddrop_update(jacobian, generator=torch.Generator().manual_seed(0))
    positive = jacobian.clamp_min(0).sum(dim=0)
    negative = jacobian.clamp_max(0).sum(dim=0)
    kept = torch.isclose(update, positive) | torch.isclose(update, negative)
    assert kept.all()


def test_expected_update_is_the_purity_weighted_sum():
    # E[update_j] = P_j * (sum of positive parts) + (1 - P_j) * (sum of negative parts).
    jacobian = conflicting(3, 4, seed=3)
    generator = torch.Generator().manual_seed(1)
    mean = torch.stack([graddrop_update(jacobian, generator=generator) for _ in range(4000)]).mean(
        0
    )
    purity = 0.5 * (1 + jacobian.sum(0) / jacobian.abs().sum(0))
    expected = purity * jacobian.clamp_min(0).sum(0) + (1 - purity) * jacobian.clamp_max(0).sum(0)
    spread = jacobian.abs().sum(0)
    assert ((mean - expected).abs() <= 0.05 * spread).all()  # 4000 draws: ~6 standard errors


def test_zero_columns_give_zero_without_nan():
    jacobian = torch.zeros(3, 5, dtype=torch.float64)
    assert graddrop_update(jacobian).tolist() == [0.0] * 5


def test_per_task_leaks_and_their_validation():
    jacobian = conflicting(2, 6, seed=4)
    update = graddrop_update(jacobian, leak=[1.0, 1.0])
    torch.testing.assert_close(update, jacobian.sum(0))
    with pytest.raises(ValueError, match="leak"):
        GradDrop(leak=1.5)
    with pytest.raises(ValueError, match="leak"):
        graddrop_update(jacobian, leak=[0.1, 0.2, 0.3])


def test_state_dict_restores_the_generator():
    jacobian = conflicting(3, 50, seed=5)
    method = GradDrop(seed=2)
    method.aggregate(torch.ones(3), jacobian)
    restored = GradDrop(seed=0)
    restored.load_state_dict(method.state_dict())
    torch.testing.assert_close(
        restored.aggregate(torch.ones(3), jacobian), method.aggregate(torch.ones(3), jacobian)
    )


def test_feature_level_is_the_default():
    assert GradDrop().level == "feature"


def test_agrees_exactly_with_torchjd_under_the_same_seed():
    from torchjd.aggregation import GradDrop as TorchJDGradDrop

    # Same uniform draws (torch.rand(n) in float64 from a generator in the same state), same
    # masks: the vectors agree to rounding.
    for seed in range(200):
        num_tasks = 2 + seed % 7
        jacobian = GENERIC_SAMPLERS[seed % 4](num_tasks, 40, seed=seed)
        leak = torch.linspace(0.0, 0.5, num_tasks, dtype=torch.float64)
        torch.manual_seed(seed)
        theirs = TorchJDGradDrop(leak=leak)(jacobian)
        ours = graddrop_update(jacobian, leak, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
