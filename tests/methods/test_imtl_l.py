"""IMTL-L: the scales' gradient, the scale-free equilibrium, and the user-facing guards."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from support.models import SharedBottom, batch
from taskbalance import IMTLL, InvalidLossError


def _fit_scales_alone(losses: torch.Tensor, steps: int = 400) -> torch.Tensor:
    """Minimise sum_t exp(s_t) L_t - s_t over s for fixed losses, with the method's own hook."""
    method = IMTLL(tasks=losses.numel())
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        weights, offsets = method.loss_weights(losses)
        (weights * losses + offsets).sum().backward()
        optimizer.step()
    return method.scales.detach()


def test_scaled_losses_reach_one_whatever_the_loss_scale():
    losses = torch.tensor([0.3, 2.0, 7.5], dtype=torch.float32)
    scales = _fit_scales_alone(losses)
    scales_x10 = _fit_scales_alone(losses * torch.tensor([10.0, 1.0, 1.0]))
    torch.testing.assert_close(torch.exp(scales) * losses, torch.ones(3), rtol=1e-4, atol=0)
    torch.testing.assert_close(scales_x10[0], scales[0] - math.log(10), rtol=0, atol=1e-4)
    torch.testing.assert_close(scales_x10[1:], scales[1:])


def test_scales_get_exp_s_times_loss_minus_one_and_the_optimizer_updates_them():
    model = SharedBottom(3)
    method = IMTLL(tasks=3)
    with torch.no_grad():
        method.scales.copy_(torch.tensor([0.5, -1.0, 0.0]))
    optimizer = torch.optim.SGD([*model.parameters(), *method.parameters()], lr=0.1)
    losses, _ = model.losses(*batch(3))
    values = torch.stack(list(losses.values())).detach().float()
    info = method.backward(losses)
    expected = torch.exp(method.scales.detach()) * values - 1
    torch.testing.assert_close(method.scales.grad, expected)
    torch.testing.assert_close(info.loss_weights, torch.exp(method.scales.detach()))
    before = method.scales.detach().clone()
    optimizer.step()
    torch.testing.assert_close(method.scales.detach(), before - 0.1 * expected)


def test_model_gradient_is_that_of_the_exp_scaled_losses():
    model, twin = SharedBottom(2), SharedBottom(2)
    method = IMTLL(tasks=2)
    with torch.no_grad():
        method.scales.copy_(torch.tensor([1.0, -2.0]))
    losses, _ = model.losses(*batch(2))
    method.backward(losses)
    twin_losses, _ = twin.losses(*batch(2))
    (math.e * twin_losses["task0"] + math.exp(-2.0) * twin_losses["task1"]).backward()
    for ours, expected in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, expected.grad)


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_non_positive_loss_is_a_clear_error(bad):
    method = IMTLL(tasks=["cls", "reg"])
    losses = {
        "cls": torch.tensor(1.0, requires_grad=True) * 1,
        "reg": torch.tensor(bad, requires_grad=True) * 1,
    }
    with pytest.raises(InvalidLossError, match=r"needs positive losses.*'reg'") as caught:
        method.backward(losses)
    assert caught.value.task == "reg"
    assert method.scales.grad is None


def test_tasks_are_required():
    with pytest.raises(TypeError, match=r"IMTLL\(tasks=3\)"):
        IMTLL()


def test_warns_once_when_no_optimizer_updates_the_scales():
    model = SharedBottom(2)
    method = IMTLL(tasks=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # the classic bug: scales forgotten
    with pytest.warns(RuntimeWarning, match="add method.parameters"):
        for _ in range(25):
            optimizer.zero_grad()
            losses, _ = model.losses(*batch(2))
            method.backward(losses)
            optimizer.step()


def test_no_warning_when_the_scales_are_trained():
    model = SharedBottom(2)
    method = IMTLL(tasks=2)
    optimizer = torch.optim.SGD([{"params": model.parameters()}, method.param_group()], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(25):
            optimizer.zero_grad()
            losses, _ = model.losses(*batch(2))
            method.backward(losses)
            optimizer.step()


def test_param_group_has_no_weight_decay():
    group = IMTLL(tasks=2).param_group(lr=0.01)
    assert group["weight_decay"] == 0.0 and len(group["params"]) == 1


def test_state_dict_round_trip_and_task_count_check():
    method = IMTLL(tasks=["a", "b"])
    with torch.no_grad():
        method.scales.copy_(torch.tensor([0.3, -0.7]))
    restored = IMTLL(tasks=["a", "b"])
    restored.load_state_dict(method.state_dict())
    torch.testing.assert_close(restored.scales, method.scales)
    assert restored.task_names == ("a", "b")
    with pytest.raises(ValueError, match="the state is for 2 tasks, this method has 3"):
        IMTLL(tasks=3).load_state_dict(method.state_dict())
