"""Mixed precision: GradScaler-scaled steps equal unscaled ones, overflows are skipped the
way GradScaler skips them, and bfloat16 autocast gives finite, close weights."""

from __future__ import annotations

import pytest
import torch

from support.models import SharedBottom, batch
from taskbalance import EW, IMTL, IMTLG


def _train(method_factory, scaler=None, steps=3, level_kw=None):
    model = SharedBottom(3, dtype=torch.float32)
    method = method_factory()
    optimizer = torch.optim.SGD([{"params": model.parameters()}, method.param_group()], lr=0.01)
    x, y = batch(3, dtype=torch.float32)
    for _ in range(steps):
        losses, z = model.losses(x, y)
        optimizer.zero_grad()
        method.backward(losses, shared=model.trunk, features=z, scaler=scaler)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
    return [p.detach().clone() for p in [*model.parameters(), *method.parameters()]]


FACTORIES = {
    "ew": EW,
    "imtl_feature": lambda: IMTL(tasks=3),
    "imtl_parameter": lambda: IMTL(tasks=3, level="parameter"),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_grad_scaler_steps_equal_unscaled_steps(name):
    plain = _train(FACTORIES[name])
    scaled = _train(FACTORIES[name], scaler=torch.amp.GradScaler("cpu", init_scale=2.0**14))
    for a, b in zip(scaled, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _OverflowInBackward(torch.autograd.Function):
    """Identity forward; the backward multiplies by 1e30 (an fp16-style overflow under scale)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e30


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_an_overflowing_step_is_skipped_and_the_scale_lowered(level):
    model = SharedBottom(2, dtype=torch.float32)
    method = IMTL(tasks=2, level=level)
    optimizer = torch.optim.SGD([{"params": model.parameters()}, method.param_group()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(2, dtype=torch.float32)
    z = model.trunk(x)
    amplified = _OverflowInBackward.apply(z)  # the per-task gradients overflow under scale
    losses = {
        f"t{t}": (h(amplified).squeeze(-1) - y[:, t]).pow(2).mean()
        for t, h in enumerate(model.heads)
    }
    optimizer.zero_grad()
    info = method.backward(losses, shared=model.trunk, features=z, scaler=scaler)
    scaler.step(optimizer)
    scaler.update()
    assert info.gradient_weights is None  # the method did not run on the overflow
    assert scaler.get_scale() < 2.0**30
    for a, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(a.detach(), b)


def test_overflow_without_a_scaler_is_a_clear_error():
    model = SharedBottom(2, dtype=torch.float32)
    x, y = batch(2, dtype=torch.float32)
    z = model.trunk(x)
    amplified = _OverflowInBackward.apply(_OverflowInBackward.apply(z))
    losses = [(h(amplified).squeeze(-1) - y[:, t]).pow(2).mean() for t, h in enumerate(model.heads)]
    with pytest.raises(FloatingPointError, match="pass scaler="):
        IMTLG().backward(losses, features=z)


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_bfloat16_autocast_gives_finite_weights_close_to_float32(level):
    model = SharedBottom(4, dtype=torch.float32)
    x, y = batch(4, dtype=torch.float32)
    losses, z = model.losses(x, y)
    reference = IMTLG(level=level).backward(losses, shared=model.trunk, features=z)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, z = model.losses(x, y)
    assert z.dtype == torch.bfloat16
    info = IMTLG(level=level).backward(losses, shared=model.trunk, features=z)
    assert info.gradient_weights.dtype == torch.float32
    torch.testing.assert_close(
        info.gradient_weights, reference.gradient_weights, rtol=0.05, atol=0.02
    )
    assert all(torch.isfinite(p.grad).all() for p in model.trunk.parameters())
