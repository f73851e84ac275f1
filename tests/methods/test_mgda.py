"""MGDA: optimality (KKT) of the min-norm weights, normalisations, and agreement with torchjd."""

from __future__ import annotations

import pytest
import torch

from support.samplers import GENERIC_SAMPLERS, random_jacobian
from taskbalance import InvalidLossError
from taskbalance.methods.mgda import MGDA, mgda_weights


def _kkt_residuals(jacobian: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
    """Scale-free KKT violations: ``(g_t . d - ||d||^2) / (||g_t|| ||d||)``, below zero for
    any task and away from zero on the support."""
    update = weights @ jacobian
    squared = update @ update
    relative = (jacobian @ update - squared) / (jacobian.norm(dim=1) * update.norm())
    return float(-relative.min().clamp_max(0)), float(relative[weights > 0].abs().max())


@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS)
@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8, 40])
def test_weights_satisfy_the_kkt_conditions(sampler, num_tasks):
    jacobian = sampler(num_tasks, 50, seed=num_tasks)
    weights = mgda_weights(jacobian @ jacobian.T)
    assert weights.min() >= 0 and weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    below, off_support = _kkt_residuals(jacobian, weights)
    # Exact solve in float64: violations at rounding level of the scale-free quantities.
    assert below < 1e-9 and off_support < 1e-9


def test_update_is_a_common_descent_direction():
    jacobian = random_jacobian(4, 30, seed=1)
    update = mgda_weights(jacobian @ jacobian.T) @ jacobian
    assert (jacobian @ update >= update @ update * (1 - 1e-12)).all()


def test_zero_gradient_task_makes_the_update_zero():
    jacobian = random_jacobian(3, 10, seed=2)
    jacobian[1] = 0
    update = mgda_weights(jacobian @ jacobian.T) @ jacobian
    assert update.norm() < 1e-12


def test_l2_normalisation_solves_on_unit_gradients():
    jacobian = GENERIC_SAMPLERS[1](4, 20, seed=3)
    unit = jacobian / jacobian.norm(dim=1, keepdim=True)
    weights = MGDA(normalization="l2").shared_weights(torch.ones(4), jacobian @ jacobian.T)
    torch.testing.assert_close(weights, mgda_weights(unit @ unit.T), rtol=1e-9, atol=1e-12)


def test_loss_normalisation_divides_the_gradients_by_the_losses():
    jacobian = random_jacobian(3, 20, seed=4)
    losses = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    scaled = jacobian / losses[:, None]
    weights = MGDA(normalization="loss").shared_weights(losses, jacobian @ jacobian.T)
    torch.testing.assert_close(weights, mgda_weights(scaled @ scaled.T), rtol=1e-9, atol=1e-12)


def test_loss_normalisation_names_the_task_with_a_nonpositive_loss():
    method = MGDA(tasks=["seg", "depth"], normalization="loss+")
    with pytest.raises(InvalidLossError, match="'depth' = 0"):
        method.shared_weights(torch.tensor([1.0, 0.0]), torch.eye(2))


def test_rejects_an_unknown_normalisation():
    with pytest.raises(ValueError, match="normalization"):
        MGDA(normalization="l1")


def test_feature_level_is_the_default():
    assert MGDA().level == "feature"


def test_agrees_with_torchjd_frank_wolfe_on_hundreds_of_jacobians():
    from torchjd.aggregation import MGDAWeighting

    # torchjd runs the paper's Frank-Wolfe, which stops early; ours is exact. So: our objective
    # is never worse, and since our update d is the min-norm point of the convex hull and
    # theirs d' lies in it, ||d' - d||^2 <= ||d'||^2 - ||d||^2 (the projection inequality).
    frank_wolfe = MGDAWeighting()  # torchjd's defaults: epsilon 1e-3, at most 100 iterations
    for seed in range(200):
        num_tasks = 2 + seed % 5
        jacobian = GENERIC_SAMPLERS[seed % 4](num_tasks, 30, seed=seed)
        gram = jacobian @ jacobian.T
        ours = mgda_weights(gram) @ jacobian
        theirs = frank_wolfe(gram) @ jacobian
        scale = jacobian.norm(dim=1).max() ** 2
        assert ours @ ours <= theirs @ theirs + 1e-12 * scale
        gap = (theirs @ theirs - ours @ ours).clamp_min(0)
        assert (theirs - ours) @ (theirs - ours) <= gap + 1e-10 * scale
        # Where Frank-Wolfe converged, both updates coincide.
        if gap <= 1e-12 * scale:
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale.sqrt())
