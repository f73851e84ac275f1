"""GLS: its update is the gradient of the geometric mean of the losses."""

from __future__ import annotations

import pytest
import torch

from support.models import SharedBottom, batch, grads
from taskbalance import InvalidLossError
from taskbalance.methods.gls import GLS, gls_weights


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5])
def test_gradient_equals_autograd_of_the_geometric_mean(num_tasks):
    model, twin = SharedBottom(num_tasks), SharedBottom(num_tasks)
    GLS().backward(model.losses(*batch(num_tasks))[0])
    twin_losses, _ = twin.losses(*batch(num_tasks))
    torch.stack(list(twin_losses.values())).prod().pow(1 / num_tasks).backward()
    for ours, theirs in zip(grads(model), grads(twin), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_weighted_losses_sum_to_the_geometric_mean():
    losses = torch.tensor([0.5, 8.0, 2.0], dtype=torch.float64)
    weights = gls_weights(losses)
    torch.testing.assert_close((weights * losses).sum(), torch.tensor(2.0, dtype=torch.float64))


def test_scaling_one_loss_scales_the_update_by_its_t_th_root_only():
    plain, scaled = SharedBottom(3), SharedBottom(3)
    GLS().backward(plain.losses(*batch(3))[0])
    GLS().backward(scaled.losses(*batch(3), scales=[1.0, 8.0, 1.0])[0])
    for ours, theirs in zip(grads(scaled), grads(plain), strict=True):
        torch.testing.assert_close(ours, 2.0 * theirs)  # 8^(1/3) = 2


def test_extreme_loss_scales_and_many_tasks_give_finite_weights():
    losses = torch.logspace(-30, 30, 16)
    weights = gls_weights(losses)
    assert torch.isfinite(weights).all() and (weights > 0).all()
    torch.testing.assert_close(weights * losses, torch.full((16,), 1 / 16), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [0.0, -2.0])
def test_non_positive_loss_is_an_error_naming_the_task(bad):
    with pytest.raises(InvalidLossError, match=r"positive losses.*'1'") as caught:
        GLS().loss_weights(torch.tensor([1.0, bad]))
    assert caught.value.task == "1"
