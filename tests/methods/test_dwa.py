"""DWA: weights from a known loss history, both ways of advancing it, and its state."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from support.models import SharedBottom, batch, grads
from taskbalance import InvalidLossError
from taskbalance.methods.dwa import DWA, dwa_weights


def _softmax_times_t(ratios, temperature=2.0):
    exps = [math.exp(r / temperature) for r in ratios]
    return torch.tensor([len(ratios) * e / sum(exps) for e in exps], dtype=torch.float64)


def test_first_two_steps_use_weight_one():
    method = DWA(tasks=3)
    for losses in ([1.0, 2.0, 3.0], [0.5, 2.0, 9.0]):
        weights, offsets = method.loss_weights(torch.tensor(losses))
        assert offsets is None
        torch.testing.assert_close(weights, torch.ones(3))


def test_step_mode_weights_follow_the_last_two_steps_ratios():
    method = DWA(tasks=3, temperature=2.0)
    history = [[4.0, 1.0, 2.0], [2.0, 1.5, 2.0], [1.0, 1.5, 3.0]]
    for losses in history:
        method.loss_weights(torch.tensor(losses, dtype=torch.float64))
    weights, _ = method.loss_weights(torch.ones(3, dtype=torch.float64))
    # ratios of step 3 over step 2
    torch.testing.assert_close(weights, _softmax_times_t([0.5, 1.0, 1.5]))


def test_the_slower_task_gets_more_weight_and_weights_sum_to_t():
    weights = dwa_weights(torch.tensor([0.9, 0.1, 0.5]), torch.tensor([1.0, 1.0, 1.0]))
    assert weights.argmax() == 0 and weights.argmin() == 1
    torch.testing.assert_close(weights.sum(), torch.tensor(3.0))


def test_temperature_flattens_the_weights():
    args = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])
    sharp, flat = dwa_weights(*args, temperature=0.5), dwa_weights(*args, temperature=100.0)
    assert sharp[0] - sharp[1] > flat[0] - flat[1] > 0
    torch.testing.assert_close(flat, torch.ones(2), atol=1e-2, rtol=0)


def test_epoch_mode_uses_epoch_means_and_holds_weights_within_an_epoch():
    method = DWA(tasks=2, advance="epoch")
    epochs = [[[4.0, 1.0], [2.0, 3.0]], [[1.0, 2.0], [2.0, 2.0]]]  # means [3, 2] then [1.5, 2]
    for epoch in epochs:
        for losses in epoch:
            torch.testing.assert_close(method.loss_weights(torch.tensor(losses))[0], torch.ones(2))
        method.end_epoch()
    expected = _softmax_times_t([1.5 / 3.0, 2.0 / 2.0]).float()
    for losses in ([5.0, 0.1], [0.1, 5.0]):  # the running epoch does not move the weights
        torch.testing.assert_close(method.loss_weights(torch.tensor(losses))[0], expected)


def test_end_epoch_is_an_error_in_step_mode_and_a_no_op_on_an_empty_epoch():
    with pytest.raises(RuntimeError, match="advance='epoch'"):
        DWA(tasks=2).end_epoch()
    method = DWA(tasks=2, advance="epoch")
    method.end_epoch()
    assert int(method.periods) == 0


def test_a_huge_ratio_gives_finite_weights():
    weights = dwa_weights(torch.tensor([1e30, 1.0]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(weights, torch.tensor([2.0, 0.0]))


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_non_positive_loss_is_an_error_naming_the_task_and_leaves_the_history(bad):
    method = DWA(tasks=["seg", "depth"])
    method.loss_weights(torch.tensor([1.0, 1.0]))
    before = method.history.clone()
    with pytest.raises(InvalidLossError, match=r"'depth'") as caught:
        method.loss_weights(torch.tensor([1.0, bad]))
    assert caught.value.task == "depth"
    torch.testing.assert_close(method.history, before)


def test_bad_hyperparameters_are_errors():
    with pytest.raises(ValueError, match="temperature"):
        DWA(tasks=2, temperature=0.0)
    with pytest.raises(ValueError, match="advance"):
        DWA(tasks=2, advance="batch")
    with pytest.raises(TypeError, match="tasks"):
        DWA()


def test_model_gradient_is_the_dwa_weighted_sum():
    model, twin, method = SharedBottom(2), SharedBottom(2), DWA(tasks=2)
    for losses in ([2.0, 1.0], [1.0, 1.0]):
        method.loss_weights(torch.tensor(losses, dtype=torch.float64))
    info = method.backward(model.losses(*batch(2))[0], shared=model.trunk)
    expected = _softmax_times_t([0.5, 1.0])
    torch.testing.assert_close(info.loss_weights, expected)
    twin_losses, _ = twin.losses(*batch(2))
    (expected[0] * twin_losses["task0"] + expected[1] * twin_losses["task1"]).backward()
    for ours, theirs in zip(grads(model), grads(twin), strict=True):
        torch.testing.assert_close(ours, theirs)


def _steps(model, method, optimizer, seeds):
    for seed in seeds:
        optimizer.zero_grad()
        method.backward(model.losses(*batch(2, seed=seed))[0])
        optimizer.step()
        if seed % 2 == 1:
            method.end_epoch()


def test_state_dict_mid_epoch_continues_identically():
    model, method = SharedBottom(2), DWA(tasks=2, advance="epoch")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _steps(model, method, optimizer, range(5))  # ends in the middle of an epoch
    saved = [copy.deepcopy(x.state_dict()) for x in (model, method, optimizer)]
    _steps(model, method, optimizer, range(5, 10))
    model2, method2 = SharedBottom(2, seed=7), DWA(tasks=2, advance="epoch")
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    for target, state in zip((model2, method2, optimizer2), saved, strict=True):
        target.load_state_dict(state)
    _steps(model2, method2, optimizer2, range(5, 10))
    for name, buffer in method.state_dict().items():
        if isinstance(buffer, torch.Tensor):
            torch.testing.assert_close(method2.state_dict()[name], buffer, rtol=0, atol=0)
    for ours, theirs in zip(model2.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
