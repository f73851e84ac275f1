"""UW: the log-variances' gradient, their equilibrium log L, and the user-facing guards."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from support.models import SharedBottom, batch, grads
from taskbalance import InvalidLossError, get_method
from taskbalance.methods.uw import UW


def _fit_alone(losses: torch.Tensor, half: bool = False, steps: int = 400) -> torch.Tensor:
    method = UW(tasks=losses.numel(), half=half)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        weights, offsets = method.loss_weights(losses)
        (weights * losses + offsets).sum().backward()
        optimizer.step()
    return method.log_vars.detach()


def test_log_variances_get_one_minus_exp_minus_s_times_loss():
    model, method = SharedBottom(3), UW(tasks=3)
    with torch.no_grad():
        method.log_vars.copy_(torch.tensor([0.5, -1.0, 0.0]))
    losses, _ = model.losses(*batch(3))
    values = torch.stack(list(losses.values())).detach().float()
    info = method.backward(losses)
    expected = 1 - torch.exp(-method.log_vars.detach()) * values
    torch.testing.assert_close(method.log_vars.grad, expected)
    torch.testing.assert_close(info.loss_weights.float(), torch.exp(-method.log_vars.detach()))


def test_optimal_log_variance_is_the_log_of_the_loss_in_both_forms():
    losses = torch.tensor([0.3, 2.0, 75.0])
    torch.testing.assert_close(_fit_alone(losses), losses.log(), rtol=0, atol=1e-4)
    torch.testing.assert_close(
        _fit_alone(losses, half=True, steps=800), losses.log(), atol=1e-4, rtol=0
    )


def test_half_form_halves_weights_and_offsets():
    s = torch.tensor([0.4, -0.3])
    full, half = UW(tasks=2), UW(tasks=2, half=True)
    for method in (full, half):
        with torch.no_grad():
            method.log_vars.copy_(s)
    (w_full, c_full), (w_half, c_half) = (m.loss_weights(torch.ones(2)) for m in (full, half))
    torch.testing.assert_close(w_half, w_full / 2)
    torch.testing.assert_close(c_half, c_full / 2)


def test_model_gradient_is_that_of_the_exp_minus_s_weighted_losses():
    model, twin, method = SharedBottom(2), SharedBottom(2), UW(tasks=2)
    with torch.no_grad():
        method.log_vars.copy_(torch.tensor([1.0, -2.0]))
    method.backward(model.losses(*batch(2))[0])
    twin_losses, _ = twin.losses(*batch(2))
    (math.exp(-1.0) * twin_losses["task0"] + math.exp(2.0) * twin_losses["task1"]).backward()
    for ours, expected in zip(grads(model), grads(twin), strict=True):
        torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_non_positive_loss_is_an_error_naming_the_task(bad):
    method = UW(tasks=["cls", "reg"])
    losses = {"cls": torch.tensor(1.0, requires_grad=True) * 1, "reg": torch.tensor(bad) * 1}
    losses["reg"].requires_grad_(True)
    with pytest.raises(InvalidLossError, match=r"needs positive losses.*'reg'") as caught:
        method.backward(losses)
    assert caught.value.task == "reg" and method.log_vars.grad is None


def test_tasks_are_required_and_the_registry_builds_it():
    with pytest.raises(TypeError, match=r"UW\(tasks=3\)"):
        UW()
    assert isinstance(get_method("uw", tasks=2, half=True), UW)


def test_param_group_has_no_weight_decay():
    group = UW(tasks=2).param_group(lr=0.01)
    assert group["weight_decay"] == 0.0 and group["params"][0].shape == (2,)


def test_warns_when_no_optimizer_trains_the_log_variances():
    model, method = SharedBottom(2), UW(tasks=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.warns(RuntimeWarning, match="add method.parameters"):
        for _ in range(25):
            optimizer.zero_grad()
            method.backward(model.losses(*batch(2))[0])
            optimizer.step()


def _steps(model, method, optimizer, seeds):
    for seed in seeds:
        optimizer.zero_grad()
        method.backward(model.losses(*batch(2, seed=seed))[0])
        optimizer.step()


def test_state_dict_mid_run_continues_identically():
    model, method = SharedBottom(2), UW(tasks=["task0", "task1"])
    optimizer = torch.optim.Adam([*model.parameters(), *method.parameters()], lr=0.05)
    _steps(model, method, optimizer, range(3))
    saved = [copy.deepcopy(x.state_dict()) for x in (model, method, optimizer)]
    _steps(model, method, optimizer, range(3, 6))
    model2, method2 = SharedBottom(2, seed=5), UW(tasks=["task0", "task1"])
    optimizer2 = torch.optim.Adam([*model2.parameters(), *method2.parameters()], lr=0.05)
    for target, state in zip((model2, method2, optimizer2), saved, strict=True):
        target.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _steps(model2, method2, optimizer2, range(3, 6))
    torch.testing.assert_close(method2.log_vars, method.log_vars, rtol=0, atol=0)
    for ours, theirs in zip(model2.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
