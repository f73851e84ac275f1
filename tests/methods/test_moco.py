"""MoCo: one step by hand, convergence to MGDA's weights on a fixed Jacobian, and state."""

from __future__ import annotations

import pytest
import torch

from support.samplers import conflicting, random_jacobian
from taskbalance.methods.mgda import mgda_weights
from taskbalance.methods.moco import MoCo, moco_step


def test_one_step_by_hand():
    tracked = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    jacobian = torch.tensor([[3.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    y, lam, update = moco_step(tracked, weights, jacobian, beta=0.5, gamma=0.1)
    torch.testing.assert_close(y, torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    # l - 0.1 * diag(4, 1) l = [0.3, 0.45] -> projection onto the simplex adds 0.125 to each.
    torch.testing.assert_close(lam, torch.tensor([0.425, 0.575], dtype=torch.float64))
    torch.testing.assert_close(update, lam @ y)


def test_weights_converge_to_mgda_on_a_fixed_jacobian():
    jacobian = conflicting(3, 10, seed=0)
    jacobian = jacobian / jacobian.norm(dim=1).max()
    method = MoCo(tasks=3, gamma=0.5, gamma_sigma=0.0)
    for _ in range(3000):
        method.aggregate(torch.ones(3), jacobian)
    torch.testing.assert_close(
        method.weights, mgda_weights(jacobian @ jacobian.T), rtol=0, atol=1e-6
    )


def test_weights_stay_on_the_simplex():
    method = MoCo(tasks=4)
    for seed in range(20):
        method.aggregate(torch.ones(4), random_jacobian(4, 6, seed=seed))
        assert method.weights.min() >= 0
        assert method.weights.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_state_dict_round_trip_including_the_tracked_gradients():
    method = MoCo(tasks=2)
    jacobians = [random_jacobian(2, 5, seed=s) for s in range(4)]
    for jacobian in jacobians[:2]:
        method.aggregate(torch.ones(2), jacobian)
    restored = MoCo(tasks=2)
    restored.load_state_dict(method.state_dict())
    for jacobian in jacobians[2:]:
        torch.testing.assert_close(
            restored.aggregate(torch.ones(2), jacobian), method.aggregate(torch.ones(2), jacobian)
        )


def test_normalize_tracks_loss_scaled_unit_gradients():
    method = MoCo(tasks=2, normalize=True)
    jacobian = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    method.aggregate(torch.tensor([2.0, 1.0], dtype=torch.float64), jacobian)
    torch.testing.assert_close(
        method.tracked, torch.tensor([[1.2, 1.6], [0.0, 1.0]], dtype=torch.float64)
    )


def test_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="MoCo needs"):
        MoCo(tasks=2, beta=0.0)


def _plain_simplex_projection(vector):
    """argmin ||a - v|| on the simplex: a = max(v - tau, 0) with sum(a) = 1, tau by bisection."""
    low, high = vector.min().item() - 1.0, vector.max().item()
    for _ in range(200):
        tau = (low + high) / 2
        if (vector - tau).clamp_min(0).sum() > 1:
            low = tau
        else:
            high = tau
    return (vector - (low + high) / 2).clamp_min(0)


def _plain_moco(jacobians, losses, beta, beta_sigma, gamma, gamma_sigma, rho, normalize):
    """The paper's update written out step by step, in float64, with the Gramian itself."""
    num = jacobians[0].shape[0]
    tracked, weights, steps = None, torch.full((num,), 1.0 / num, dtype=torch.float64), []
    for k, (jacobian, loss) in enumerate(zip(jacobians, losses, strict=True), start=1):
        g = jacobian.double()
        if normalize:
            g = loss.double()[:, None] * g / g.norm(dim=1, keepdim=True)
        tracked = g.clone() if tracked is None else tracked
        tracked = tracked - beta / k**beta_sigma * (tracked - g)
        gramian = tracked @ tracked.T + rho * torch.eye(num, dtype=torch.float64)
        weights = _plain_simplex_projection(weights - gamma / k**gamma_sigma * gramian @ weights)
        steps.append((tracked, weights, weights @ tracked))
    return steps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "options",
    [{}, {"rho": 0.3, "beta": 0.9, "gamma": 0.7, "gamma_sigma": 0.0}, {"normalize": True}],
)
@pytest.mark.parametrize("shape", [(3, 40), (32, 1000)])
def test_steps_and_state_match_the_formulas(shape, options, dtype):
    num, dim = shape
    defaults = dict(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0, normalize=False)
    jacobians = [random_jacobian(num, dim, seed=s) / dim**0.5 for s in range(6)]
    losses = [torch.linspace(0.5, 2.0, num, dtype=torch.float64) * (s + 1) for s in range(6)]
    expected = _plain_moco(jacobians, losses, **{**defaults, **options})
    method = MoCo(tasks=num, **options)
    # float32 is the method's working precision on the T x n side: its rounding, not the maths.
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    for step, (jacobian, loss, (tracked, weights, update)) in enumerate(
        zip(jacobians, losses, expected, strict=True), start=1
    ):
        got = method.aggregate(loss.to(dtype), jacobian.to(dtype))
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), update, **tol)
        torch.testing.assert_close(method.tracked.double(), tracked, **tol)
        torch.testing.assert_close(method.weights, weights, **tol)
        assert int(method.step) == step
