"""GradNorm: weights move toward the slower task, keep sum T, and balance gradient norms."""

from __future__ import annotations

import copy

import pytest
import torch

from support.models import SharedBottom, batch
from taskbalance import InvalidLossError
from taskbalance.methods.gradnorm import GradNorm, gradnorm_update


def test_weights_move_toward_the_slower_task_and_keep_sum_t():
    # equal gradient norms; task 2's loss has not fallen, task 0's has fallen most
    weights = gradnorm_update(
        torch.ones(3), torch.ones(3), torch.tensor([0.2, 0.5, 1.0]), torch.ones(3)
    )
    assert weights[2] > 1 > weights[0]
    torch.testing.assert_close(weights.sum(), torch.tensor(3.0))


def test_hand_computed_step():
    # G = [1, 2], equal rates: target 1.5; dL/dw = [-1, +2]; w = [1.025, 0.95] -> sum 2
    weights = gradnorm_update(torch.ones(2), torch.tensor([1.0, 2.0]), torch.ones(2), torch.ones(2))
    torch.testing.assert_close(weights, torch.tensor([1.025, 0.95]) * 2 / 1.975)


def test_repeated_steps_equalise_the_weighted_gradient_norms_when_rates_are_equal():
    raw_norms = torch.tensor([1.0, 4.0], dtype=torch.float64)
    weights = torch.ones(2, dtype=torch.float64)
    for _ in range(400):
        weights = gradnorm_update(
            weights, weights * raw_norms, torch.ones(2), torch.ones(2), lr=0.005
        )
    # w proportional to 1 / ||grad L_t|| with sum 2; the L1 subgradient steps oscillate by ~lr
    torch.testing.assert_close(
        weights, torch.tensor([1.6, 0.4], dtype=torch.float64), atol=0.03, rtol=0
    )


def test_weights_stay_positive_after_an_overshooting_step():
    weights = gradnorm_update(
        torch.ones(2), torch.tensor([1.0, 100.0]), torch.ones(2), torch.ones(2), lr=10.0
    )
    assert (weights > 0).all()
    torch.testing.assert_close(weights.sum(), torch.tensor(2.0))


def test_parameter_level_norms_are_those_of_the_weighted_losses_on_the_given_layer():
    model, method = SharedBottom(2), GradNorm(tasks=2, level="parameter")
    method.task_weights.copy_(torch.tensor([1.5, 0.5], dtype=torch.float64))
    method.initial_losses.copy_(torch.tensor([2.0, 300.0], dtype=torch.float64))
    method.has_initial.fill_(True)
    last_layer = model.trunk[-1]
    losses, _ = model.losses(*batch(2))
    values = torch.stack(list(losses.values()))
    norms = torch.stack(
        [
            torch.cat(
                [
                    g.flatten()
                    for g in torch.autograd.grad(
                        w * loss, list(last_layer.parameters()), retain_graph=True
                    )
                ]
            ).norm()
            for w, loss in zip(method.task_weights, losses.values(), strict=True)
        ]
    )
    expected = gradnorm_update(
        method.task_weights.clone(), norms, values.detach(), method.initial_losses
    )
    info = method.backward(losses, shared=last_layer)
    torch.testing.assert_close(info.loss_weights, torch.tensor([1.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(info.gradient_weights, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(method.task_weights, expected)


def test_first_losses_are_kept_as_the_initial_losses():
    method = GradNorm(tasks=2)
    method.loss_weights(torch.tensor([2.0, 3.0]))
    method.loss_weights(torch.tensor([1.0, 0.0]))  # a later zero loss is allowed
    torch.testing.assert_close(method.initial_losses, torch.tensor([2.0, 3.0], dtype=torch.float64))


def test_bad_losses_are_errors_naming_the_task():
    with pytest.raises(InvalidLossError, match=r"'b'.*") as caught:
        GradNorm(tasks=["a", "b"]).loss_weights(torch.tensor([1.0, 0.0]))
    assert caught.value.task == "b"
    method = GradNorm(tasks=["a", "b"])
    method.loss_weights(torch.tensor([1.0, 1.0]))
    with pytest.raises(InvalidLossError, match=r"'a'"):
        method.loss_weights(torch.tensor([-1.0, 1.0]))


def _steps(model, method, optimizer, seeds):
    for seed in seeds:
        optimizer.zero_grad()
        losses, z = model.losses(*batch(2, seed=seed))
        method.backward(losses, shared=model.trunk, features=z)
        optimizer.step()


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_training_keeps_sum_t_and_state_dict_mid_run_continues_identically(level):
    model, method = SharedBottom(2), GradNorm(tasks=2, level=level, lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _steps(model, method, optimizer, range(3))
    assert not torch.equal(method.task_weights, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(method.task_weights.sum(), torch.tensor(2.0, dtype=torch.float64))
    saved = [copy.deepcopy(x.state_dict()) for x in (model, method, optimizer)]
    _steps(model, method, optimizer, range(3, 6))
    model2, method2 = SharedBottom(2, seed=6), GradNorm(tasks=2, level=level, lr=0.1)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    for target, state in zip((model2, method2, optimizer2), saved, strict=True):
        target.load_state_dict(state)
    _steps(model2, method2, optimizer2, range(3, 6))
    torch.testing.assert_close(method2.task_weights, method.task_weights, rtol=0, atol=0)
    torch.testing.assert_close(method2.initial_losses, method.initial_losses, rtol=0, atol=0)
    for ours, theirs in zip(model2.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
