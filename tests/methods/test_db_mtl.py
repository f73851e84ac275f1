"""DB-MTL: log losses, then every shared task gradient scaled to the largest (averaged) norm."""

from __future__ import annotations

import copy

import pytest
import torch

from support.models import SharedBottom, batch, grads
from taskbalance import InvalidLossError
from taskbalance.methods.db_mtl import DBMTL, db_mtl_gradient_weights


def _log_loss_jacobian(model: SharedBottom, scales=None) -> torch.Tensor:
    losses, _ = model.losses(*batch(3), scales=scales)
    shared = list(model.trunk.parameters())
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(loss.log(), shared, retain_graph=True)])
        for loss in losses.values()
    ]
    return torch.stack(rows)


def _trunk_grad(model: SharedBottom) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.trunk.parameters()])


def test_first_step_shared_gradient_scales_each_log_loss_gradient_to_the_largest_norm():
    model = SharedBottom(3)
    jacobian = _log_loss_jacobian(SharedBottom(3))
    norms = jacobian.norm(dim=1)
    info = DBMTL(tasks=3).backward(model.losses(*batch(3))[0], shared=model.trunk)
    torch.testing.assert_close(info.gradient_weights, norms.max() / norms)
    torch.testing.assert_close(_trunk_grad(model), (norms.max() / norms) @ jacobian)
    scaled_rows = (norms.max() / norms)[:, None] * jacobian
    torch.testing.assert_close(scaled_rows.norm(dim=1), norms.max().expand(3))


def test_heads_are_trained_on_the_sum_of_log_losses():
    model, twin = SharedBottom(3), SharedBottom(3)
    DBMTL(tasks=3).backward(model.losses(*batch(3))[0], shared=model.trunk)
    twin_losses, _ = twin.losses(*batch(3))
    sum(loss.log() for loss in twin_losses.values()).backward()
    for ours, theirs in zip(grads(model.heads), grads(twin.heads), strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_update_does_not_change_when_a_loss_is_scaled(level):
    plain, scaled = SharedBottom(3), SharedBottom(3)
    for model, scales in ((plain, None), (scaled, [1.0, 1e4, 1e-3])):
        losses, z = model.losses(*batch(3), scales=scales)
        DBMTL(tasks=3, level=level).backward(losses, shared=model.trunk, features=z)
    for ours, theirs in zip(grads(scaled), grads(plain), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_norm_average_follows_the_ema_from_the_first_norms():
    method = DBMTL(tasks=2, beta=0.9)
    first = method.shared_weights(torch.ones(2), torch.diag(torch.tensor([1.0, 4.0])))
    torch.testing.assert_close(first, torch.tensor([2.0, 1.0]))
    second = method.shared_weights(torch.ones(2), torch.diag(torch.tensor([4.0, 4.0])))
    averages = torch.tensor([0.9 * 1 + 0.1 * 2, 0.9 * 2 + 0.1 * 2])  # [1.1, 2.0]
    torch.testing.assert_close(second, averages.max() / averages)
    torch.testing.assert_close(method.average_norms.float(), averages)


def test_zero_norms_give_the_documented_finite_fallbacks():
    torch.testing.assert_close(
        db_mtl_gradient_weights(torch.tensor([0.0, 2.0])), torch.tensor([0.0, 1.0])
    )
    torch.testing.assert_close(db_mtl_gradient_weights(torch.zeros(3)), torch.ones(3))


@pytest.mark.parametrize("bad", [0.0, -0.1])
def test_non_positive_loss_is_an_error_naming_the_task(bad):
    with pytest.raises(InvalidLossError, match=r"'b'") as caught:
        DBMTL(tasks=["a", "b"]).loss_weights(torch.tensor([1.0, bad]))
    assert caught.value.task == "b"


def test_bad_beta_is_an_error():
    with pytest.raises(ValueError, match="beta"):
        DBMTL(tasks=2, beta=1.0)


def _steps(model, method, optimizer, seeds):
    for seed in seeds:
        optimizer.zero_grad()
        losses, z = model.losses(*batch(3, seed=seed))
        method.backward(losses, shared=model.trunk, features=z)
        optimizer.step()


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_state_dict_mid_run_continues_identically(level):
    model, method = SharedBottom(3), DBMTL(tasks=3, level=level)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _steps(model, method, optimizer, range(3))
    saved = [copy.deepcopy(x.state_dict()) for x in (model, method, optimizer)]
    _steps(model, method, optimizer, range(3, 6))
    model2, method2 = SharedBottom(3, seed=3), DBMTL(tasks=3, level=level)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    for target, state in zip((model2, method2, optimizer2), saved, strict=True):
        target.load_state_dict(state)
    _steps(model2, method2, optimizer2, range(3, 6))
    torch.testing.assert_close(method2.average_norms, method.average_norms, rtol=0, atol=0)
    for ours, theirs in zip(model2.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
