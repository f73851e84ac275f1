"""IMTL (hybrid, Algorithm 1): each of its five steps, at both levels."""

from __future__ import annotations

import pytest
import torch

from support.models import SharedBottom, batch, grads
from taskbalance import IMTL, IMTLG, imtl_g_weights

SCALES = torch.tensor([0.7, -1.2, 0.1])


def _imtl(level: str, scales: torch.Tensor):
    model = SharedBottom(3)
    method = IMTL(tasks=3, level=level)
    with torch.no_grad():
        method.scales.copy_(scales)
    losses, z = model.losses(*batch(3))
    info = method.backward(losses, shared=model.trunk, features=z)
    return model, method, info


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_reduces_to_imtl_g_when_all_scales_are_zero(level):
    model, _, info = _imtl(level, torch.zeros(3))
    reference = SharedBottom(3)
    losses, z = reference.losses(*batch(3))
    ref_info = IMTLG(level=level).backward(losses, shared=reference.trunk, features=z)
    torch.testing.assert_close(info.gradient_weights, ref_info.gradient_weights)
    for ours, expected in zip(grads(model), grads(reference), strict=True):
        torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_heads_get_their_own_scaled_loss_not_weighted_by_a(level):
    model, _, _ = _imtl(level, SCALES)
    reference = SharedBottom(3)
    losses, _ = reference.losses(*batch(3))
    sum(torch.exp(s) * loss for s, loss in zip(SCALES, losses.values(), strict=True)).backward()
    for ours, expected in zip(model.heads.parameters(), reference.heads.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, expected.grad)


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_scales_get_exp_s_times_loss_minus_one(level):
    _, method, info = _imtl(level, SCALES)
    torch.testing.assert_close(
        method.scales.grad, (torch.exp(SCALES) * info.losses.float() - 1).to(method.scales.dtype)
    )


def test_parameter_level_shared_gradient_is_a_weighted_sum_of_scaled_task_gradients():
    model, _, info = _imtl("parameter", SCALES)
    reference = SharedBottom(3)
    losses, _ = reference.losses(*batch(3))
    shared = list(reference.trunk.parameters())
    jacobian = torch.stack(
        [
            torch.cat(
                [
                    g.flatten()
                    for g in torch.autograd.grad(torch.exp(s) * loss, shared, retain_graph=True)
                ]
            )
            for s, loss in zip(SCALES, losses.values(), strict=True)
        ]
    )
    weights = imtl_g_weights(jacobian @ jacobian.T)
    torch.testing.assert_close(info.gradient_weights, weights)
    ours = torch.cat([p.grad.flatten() for p in model.trunk.parameters()])
    torch.testing.assert_close(ours, weights @ jacobian)


def test_update_is_impartial_to_the_unscaled_task_gradients_too():
    # exp(s_t) is a positive per-task scale, which IMTL-G's direction ignores.
    model_scaled, _, _ = _imtl("parameter", SCALES)
    model_plain, _, _ = _imtl("parameter", torch.zeros(3))
    a = torch.cat([p.grad.flatten() for p in model_scaled.trunk.parameters()])
    b = torch.cat([p.grad.flatten() for p in model_plain.trunk.parameters()])
    torch.testing.assert_close(a / a.norm(), b / b.norm())


def test_level_is_validated():
    with pytest.raises(ValueError, match=r"supports level in \['feature', 'parameter'\]"):
        IMTL(tasks=2, level="layer")
