"""FAMO: the loss weights, the logit update on hand-computed examples, and the update API."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch

from support.models import SharedBottom, batch, grads
from taskbalance import InvalidLossError
from taskbalance.methods.famo import FAMO, famo_logit_gradient, famo_weights


def test_loss_weights_are_z_over_l_normalised():
    logits = torch.tensor([0.0, math.log(3.0)])  # z = [1/4, 3/4]
    losses = torch.tensor([1.0, 6.0])  # z / L = [1/4, 1/8]
    torch.testing.assert_close(famo_weights(logits, losses), torch.tensor([2 / 3, 1 / 3]))


def test_logit_update_by_hand_with_plain_steps_and_decay():
    method = FAMO(tasks=2, optimizer="sgd", lr=1.0, gamma=0.5)
    method.loss_weights(torch.tensor([1.0, 1.0]))
    method.update(torch.tensor([0.5, 1.0]))
    # delta = [log 2, 0], z = [1/2, 1/2]: grad = z * (delta - z.delta) = [log2/4, -log2/4]
    q = math.log(2) / 4
    torch.testing.assert_close(method.logits, torch.tensor([-q, q]))
    method.loss_weights(torch.tensor([1.0, 1.0]))
    method.update(torch.tensor([1.0, 1.0]))  # no progress: only the decay gamma * xi acts
    torch.testing.assert_close(method.logits, torch.tensor([-q, q]) * (1 - 0.5))


def test_equal_log_decreases_leave_the_logits_unchanged():
    gradient = famo_logit_gradient(
        torch.tensor([0.3, -0.2, 0.1]),
        torch.tensor([2.0, 4.0, 0.5]),
        torch.tensor([1.0, 2.0, 0.25]),
    )
    torch.testing.assert_close(gradient, torch.zeros(3))


def test_adam_logit_steps_match_torch_adam_with_l2_decay():
    method = FAMO(tasks=3, lr=0.1, gamma=0.01)
    logits = torch.zeros(3, requires_grad=True)
    reference = torch.optim.Adam([logits], lr=0.1, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        old, new = torch.rand(3, generator=gen) + 0.5, torch.rand(3, generator=gen) + 0.5
        method.loss_weights(old)
        logits.grad = famo_logit_gradient(logits.detach(), old, new)
        method.update(new)
        reference.step()
        torch.testing.assert_close(method.logits, logits.detach())


def test_next_step_mode_equals_manual_updates_with_the_next_losses():
    sequence = [torch.tensor(v) for v in ([2.0, 1.0], [1.0, 0.9], [0.7, 0.8], [0.6, 0.4])]
    auto, manual = FAMO(tasks=2, update="next_step"), FAMO(tasks=2)
    for current, following in itertools.pairwise(sequence):
        auto.loss_weights(current)
        manual.loss_weights(current)
        manual.update(following)
    auto.loss_weights(sequence[-1])
    torch.testing.assert_close(auto.logits, manual.logits)
    with pytest.raises(RuntimeError, match="updates itself"):
        auto.update(sequence[0])


def test_warns_once_when_update_is_never_called():
    method = FAMO(tasks=2)
    method.loss_weights(torch.ones(2))
    with pytest.warns(RuntimeWarning, match=r"update\(new_losses\) was not called"):
        method.loss_weights(torch.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.loss_weights(torch.ones(2))


def test_update_without_a_pending_step_is_an_error():
    method = FAMO(tasks=2)
    with pytest.raises(RuntimeError, match="needs a preceding step"):
        method.update(torch.ones(2))
    method.loss_weights(torch.ones(2))
    method.update(torch.ones(2))
    with pytest.raises(RuntimeError, match="needs a preceding step"):
        method.update(torch.ones(2))


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_non_positive_losses_are_errors_naming_the_task(bad):
    method = FAMO(tasks=["seg", "depth"])
    with pytest.raises(InvalidLossError, match=r"'seg'") as caught:
        method.loss_weights(torch.tensor([bad, 1.0]))
    assert caught.value.task == "seg"
    method.loss_weights(torch.ones(2))
    with pytest.raises(InvalidLossError, match=r"'depth'"):
        method.update({"seg": 1.0, "depth": bad})
    with pytest.raises(InvalidLossError, match="expected 2 losses"):
        method.update([1.0, 1.0, 1.0])


def test_model_gradient_is_the_famo_weighted_sum():
    model, twin = SharedBottom(3), SharedBottom(3)
    method = FAMO(tasks=3)
    method.logits.copy_(torch.tensor([0.2, -0.4, 0.1]))
    info = method.backward(model.losses(*batch(3))[0])
    twin_losses, _ = twin.losses(*batch(3))
    values = torch.stack(list(twin_losses.values()))
    weights = famo_weights(method.logits.double(), values.detach())
    torch.testing.assert_close(info.loss_weights, weights)
    (weights * values).sum().backward()
    for ours, theirs in zip(grads(model), grads(twin), strict=True):
        torch.testing.assert_close(ours, theirs)


def _steps(model, method, optimizer, seeds):
    for seed in seeds:
        data = batch(3, seed=seed)
        optimizer.zero_grad()
        method.backward(model.losses(*data)[0])
        optimizer.step()
        with torch.no_grad():  # the same batch re-evaluated, as the authors' example does
            method.update(model.losses(*data)[0])


def test_training_moves_the_weights_and_state_dict_mid_run_continues_identically():
    model, method = SharedBottom(3), FAMO(tasks=["task0", "task1", "task2"], lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _steps(model, method, optimizer, range(3))
    assert not torch.equal(method.logits, torch.zeros(3))
    saved = [copy.deepcopy(x.state_dict()) for x in (model, method, optimizer)]
    _steps(model, method, optimizer, range(3, 6))
    model2, method2 = SharedBottom(3, seed=2), FAMO(tasks=["task0", "task1", "task2"], lr=0.1)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    for target, state in zip((model2, method2, optimizer2), saved, strict=True):
        target.load_state_dict(state)
    _steps(model2, method2, optimizer2, range(3, 6))
    for name, value in method.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(method2.state_dict()[name], value, rtol=0, atol=0)
    for ours, theirs in zip(model2.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
