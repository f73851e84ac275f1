"""STCH: the weights are the softmax of the scaled gaps, the gradient of mu * logsumexp."""

from __future__ import annotations

import copy

import pytest
import torch

from support.models import SharedBottom, batch, grads
from taskbalance.methods.stch import STCH, stch_weights


def test_weights_equal_the_softmax_of_the_gaps_over_mu():
    losses, ideal = torch.tensor([1.0, 2.5, 0.5]), torch.tensor([0.5, 0.5, 0.0])
    torch.testing.assert_close(
        stch_weights(losses, ideal, mu=0.5), torch.softmax((losses - ideal) / 0.5, dim=0)
    )
    method = STCH(tasks=3, mu=0.5, ideal=[0.5, 0.5, 0.0])
    torch.testing.assert_close(
        method.loss_weights(losses)[0], torch.softmax((losses - ideal) / 0.5, dim=0)
    )


def test_gradient_equals_autograd_of_mu_logsumexp():
    model, twin = SharedBottom(3), SharedBottom(3)
    STCH(tasks=3, mu=2.0).backward(model.losses(*batch(3))[0])
    twin_losses, _ = twin.losses(*batch(3))
    (2.0 * torch.logsumexp(torch.stack(list(twin_losses.values())) / 2.0, dim=0)).backward()
    for ours, theirs in zip(grads(model), grads(twin), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_small_mu_picks_the_worst_task_large_mu_averages():
    losses = torch.tensor([1.0, 1.2, 0.3])
    torch.testing.assert_close(
        stch_weights(losses, torch.zeros(3), mu=1e-3), torch.tensor([0.0, 1.0, 0.0])
    )
    torch.testing.assert_close(
        stch_weights(losses, torch.zeros(3), mu=1e4), torch.full((3,), 1 / 3), atol=1e-4, rtol=0
    )


def test_preference_multiplies_gaps_and_weights():
    lam = torch.tensor([2.0, 1.0])
    weights = stch_weights(torch.tensor([1.0, 1.0]), torch.zeros(2), mu=1.0, preference=lam)
    torch.testing.assert_close(weights, lam * torch.softmax(lam, dim=0))


def test_running_minimum_ideal_point():
    method = STCH(tasks=2, ideal="min", mu=1.0)
    method.loss_weights(torch.tensor([3.0, 1.0]))
    method.loss_weights(torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(method.ideal_point, torch.tensor([2.0, 1.0], dtype=torch.float64))
    weights, _ = method.loss_weights(torch.tensor([2.5, 1.5]))  # gaps [0.5, 0.5]
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5]))


def test_warmup_is_linear_then_gaps_are_normalised_by_the_warmup_means():
    method = STCH(tasks=2, mu=1.0, warmup_steps=2)
    for losses in ([10.0, 0.1], [30.0, 0.3]):  # means [20, 0.2]
        torch.testing.assert_close(
            method.loss_weights(torch.tensor(losses))[0], torch.tensor([0.5, 0.5])
        )
    weights, _ = method.loss_weights(torch.tensor([20.0, 0.4], dtype=torch.float64))  # gaps [1, 2]
    scale = torch.tensor([20.0, 0.2], dtype=torch.float64)
    expected = torch.softmax(torch.tensor([1.0, 2.0], dtype=torch.float64), 0) / scale
    torch.testing.assert_close(weights, expected)


def test_huge_losses_give_finite_weights():
    weights, _ = STCH(tasks=2, mu=1e-3).loss_weights(torch.tensor([1e30, 3e30]))
    torch.testing.assert_close(weights, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mu": 0.0}, "mu"),
        ({"ideal": [0.0]}, "ideal must hold 2"),
        ({"ideal": "nadir"}, "ideal must be"),
        ({"preference": [1.0, -1.0]}, "preference"),
        ({"warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_bad_hyperparameters_are_errors(options, message):
    with pytest.raises(ValueError, match=message):
        STCH(tasks=2, **options)


def _steps(model, method, optimizer, seeds):
    for seed in seeds:
        optimizer.zero_grad()
        method.backward(model.losses(*batch(2, seed=seed))[0])
        optimizer.step()


def test_state_dict_mid_warmup_continues_identically():
    def build():
        return STCH(tasks=2, ideal="min", warmup_steps=4, mu=0.5)

    model, method = SharedBottom(2), build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _steps(model, method, optimizer, range(2))
    saved = [copy.deepcopy(x.state_dict()) for x in (model, method, optimizer)]
    _steps(model, method, optimizer, range(2, 7))
    model2, method2 = SharedBottom(2, seed=4), build()
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    for target, state in zip((model2, method2, optimizer2), saved, strict=True):
        target.load_state_dict(state)
    _steps(model2, method2, optimizer2, range(2, 7))
    for ours, theirs in zip(model2.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
