"""Rows of docs/reliability.md that no other test file covers: each bad or extreme input gives
a clear error or the documented safe behaviour, never a silent NaN."""

from __future__ import annotations

import pytest
import torch

from support.models import SharedBottom, batch, grads
from taskbalance import EW, IMTL, IMTLG, IMTLL, InvalidLossError, get_method


def test_skip_option_skips_counts_and_touches_nothing():
    model = SharedBottom(2)
    method = IMTL(tasks=2)
    losses, z = model.losses(*batch(2))
    losses["task1"] = losses["task1"] * float("inf")
    info = method.backward(losses, features=z, on_nonfinite="skip")
    assert info.skipped and info.loss_weights.tolist() == [0.0, 0.0]
    assert all(p.grad is None for p in [*model.parameters(), *method.parameters()])
    assert method.skipped_steps == 1
    restored = IMTL(tasks=2)
    restored.load_state_dict(method.state_dict())
    assert restored.skipped_steps == 1


def test_unknown_on_nonfinite_value_lists_the_valid_ones():
    model = SharedBottom(2)
    losses, _ = model.losses(*batch(2))
    with pytest.raises(ValueError, match="'raise', 'skip' or 'propagate', got 'ignore'"):
        EW().backward(losses, on_nonfinite="ignore")


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_one_hundred_tasks(level):
    model = SharedBottom(100, dim_hidden=16)
    losses, z = model.losses(*batch(100))
    info = IMTL(tasks=100, level=level).backward(losses, shared=model.trunk, features=z)
    assert info.gradient_weights.shape == (100,)
    assert all(torch.isfinite(g).all() for g in grads(model))
    assert info.gradient_weights.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["ew", "imtl_l", "imtl_g", "imtl"])
def test_a_single_task_gets_a_plain_backward(name):
    model, plain = SharedBottom(1), SharedBottom(1)
    losses, z = model.losses(*batch(1))
    method = get_method(name, tasks=1)
    info = method.backward(losses, shared=model.trunk, features=z)
    plain_losses, _ = plain.losses(*batch(1))
    plain_losses["task0"].backward()
    for ours, expected in zip(grads(model), grads(plain), strict=True):
        torch.testing.assert_close(ours, expected)
    assert info.weights.tolist() == [1.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_losses_are_upcast(dtype):
    model = SharedBottom(2, dtype=torch.float32)
    losses, z = model.losses(*batch(2, dtype=torch.float32))
    half = {name: loss.to(dtype) for name, loss in losses.items()}
    info = IMTLG().backward(half, features=z)
    assert info.losses.dtype == torch.float32
    assert torch.isfinite(info.gradient_weights).all()


def test_losses_on_different_devices_are_an_error():
    on_cpu = torch.ones((), requires_grad=True) * 1.0
    on_meta = torch.ones((), device="meta", requires_grad=True) * 1.0
    with pytest.raises(InvalidLossError, match="different devices"):
        EW().backward({"a": on_cpu, "b": on_meta})


def test_zero_gradients_give_finite_equal_weights_and_a_zero_update():
    model = SharedBottom(2)
    losses, _ = model.losses(*batch(2))
    flat = {name: loss * 0.0 + 1.0 for name, loss in losses.items()}  # reach z, zero gradient
    info = IMTLG(level="parameter").backward(flat, shared=model.trunk)
    assert info.gradient_weights.tolist() == [0.5, 0.5]
    assert all((p.grad == 0).all() for p in model.trunk.parameters())


def test_a_state_for_another_number_of_tasks_is_refused():
    with pytest.raises(ValueError, match="the state is for 2 tasks, this method has 3"):
        IMTLG(tasks=3).load_state_dict(IMTLG(tasks=2).state_dict())


def test_stateful_method_needs_the_tasks():
    with pytest.raises(TypeError, match="needs the tasks at construction"):
        IMTLL()
