"""GradVac: the EMA targets, its reduction to PCGrad, state round-trip, and torchjd."""

from __future__ import annotations

import torch

from support.samplers import GENERIC_SAMPLERS, conflicting, unit_rows
from taskbalance.methods.gradvac import GradVac, gradvac_weights
from taskbalance.methods.pcgrad import pcgrad_weights


def test_targets_become_beta_times_the_cosines_after_one_step_with_two_tasks():
    jacobian = conflicting(2, 10, seed=0)
    targets = torch.zeros(2, 2, dtype=torch.float64)
    gradvac_weights(jacobian @ jacobian.T, targets, beta=0.3)
    cosine = unit_rows(jacobian)[0] @ unit_rows(jacobian)[1]
    torch.testing.assert_close(targets, 0.3 * cosine * (1 - torch.eye(2, dtype=torch.float64)))


def test_zero_targets_reduce_to_pcgrad_for_two_tasks():
    for seed in range(10):
        jacobian = conflicting(2, 10, seed=seed)
        gram = jacobian @ jacobian.T
        targets = torch.zeros(2, 2, dtype=torch.float64)
        torch.testing.assert_close(gradvac_weights(gram, targets, beta=0.0), pcgrad_weights(gram))


def test_corrected_cosine_reaches_the_target():
    jacobian = conflicting(2, 10, seed=4)
    targets = torch.tensor([[0.0, 0.4], [-1.0, 0.0]], dtype=torch.float64)
    # Row 1's cosine is never below -1, so only row 0 is corrected: g_0^PC = g_0 + w g_1.
    weights = gradvac_weights(jacobian @ jacobian.T, targets, beta=0.0)
    corrected = (weights - torch.tensor([0.0, 1.0], dtype=torch.float64)) @ jacobian
    cosine = corrected @ jacobian[1] / (corrected.norm() * jacobian[1].norm())
    assert abs(cosine.item() - 0.4) < 1e-7  # eps = 1e-8 in the denominators


def test_state_dict_round_trip_continues_identically():
    method = GradVac(tasks=4, beta=0.2, seed=3)
    grams = [conflicting(4, 12, seed=s) @ conflicting(4, 12, seed=s).T for s in range(4)]
    for gram in grams[:2]:
        method.shared_weights(torch.ones(4), gram)
    restored = GradVac(tasks=4, beta=0.2, seed=0)
    restored.load_state_dict(method.state_dict())
    torch.testing.assert_close(restored.targets, method.targets)
    for gram in grams[2:]:
        torch.testing.assert_close(
            restored.shared_weights(torch.ones(4), gram), method.shared_weights(torch.ones(4), gram)
        )


def test_agrees_with_torchjd_over_several_steps():
    from torchjd.aggregation import GradVacWeighting

    # Same draws (one randperm(T - 1) per task), same float64 arithmetic, state carried over
    # three steps: agreement to rounding.
    for seed in range(50):
        num_tasks = 2 + seed % 5
        theirs_weighting = GradVacWeighting(beta=0.3)
        targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        for step in range(3):
            jacobian = GENERIC_SAMPLERS[seed % 4](num_tasks, 25, seed=100 * seed + step)
            gram = jacobian @ jacobian.T
            torch.manual_seed(step)
            theirs = theirs_weighting(gram)
            ours = gradvac_weights(gram, targets, 0.3, torch.Generator().manual_seed(step))
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
