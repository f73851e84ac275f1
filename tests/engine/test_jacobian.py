"""The engine's per-task gradients and Gramian against an explicit autograd loop."""

from __future__ import annotations

import warnings

import pytest
import torch

from support.models import SharedBottom, batch
from taskbalance.engine import combine, gramian, task_jacobian
from taskbalance.engine import jacobian as jacobian_module


def _explicit(losses, inputs):
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["batched", "loop", "auto"])
@pytest.mark.parametrize("level", ["parameter", "feature"])
def test_jacobian_and_gramian_equal_an_explicit_loop(mode, level):
    model = SharedBottom(num_tasks=4)
    losses, z = model.losses(*batch(4))
    values = list(losses.values())
    inputs = list(model.trunk.parameters()) if level == "parameter" else [z]
    blocks = task_jacobian(values, inputs, mode)
    flat = torch.cat([b.reshape(4, -1) for b in blocks], dim=1)
    expected = _explicit(values, inputs)
    torch.testing.assert_close(flat, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gramian(blocks, 4), expected @ expected.T, rtol=1e-12, atol=1e-12)


def test_unused_input_gives_none():
    used, unused = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    for mode in ("loop", "batched"):
        blocks = task_jacobian([used.sum(), 2 * used.sum()], [used, unused], mode)
        assert blocks[0] is not None and blocks[1] is None


def test_combine_is_the_weighted_sum_of_rows():
    block = torch.randn(3, 2, 4, dtype=torch.float64)
    weights = torch.tensor([0.2, -1.0, 3.0], dtype=torch.float64)
    (combined,) = combine(weights, [block])
    torch.testing.assert_close(combined, (weights[:, None, None] * block).sum(0))


def test_gramian_upcasts_half_precision():
    block = torch.randn(2, 5).to(torch.bfloat16)
    assert gramian([block], 2).dtype == torch.float32


def test_auto_mode_falls_back_to_the_loop_with_one_warning(monkeypatch):
    def no_batching(outputs, inputs):
        raise RuntimeError("Batching rule not implemented for aten::fake")

    monkeypatch.setattr(jacobian_module, "batched_grads", no_batching)
    monkeypatch.setattr(jacobian_module, "_warned_fallback", False)
    x = torch.ones(3, requires_grad=True)
    outputs = [x.sum(), (x * x).sum()]
    monkeypatch.setattr(jacobian_module, "batching_pays_off", lambda device: True)
    with pytest.warns(RuntimeWarning, match="Batching rule not implemented"):
        first = task_jacobian(outputs, [x], "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task_jacobian(outputs, [x], "auto")
    torch.testing.assert_close(first[0], torch.stack([torch.ones(3), 2 * torch.ones(3)]))
    with pytest.raises(RuntimeError, match="Batching rule"):
        task_jacobian(outputs, [x], "batched")


def test_auto_mode_uses_the_loop_on_cpu(monkeypatch):
    def fail(outputs, inputs):
        raise AssertionError("the batched path must not run on CPU in auto mode")

    monkeypatch.setattr(jacobian_module, "batched_grads", fail)
    x = torch.ones(2, requires_grad=True)
    task_jacobian([x.sum()], [x], "auto")


def test_rejects_an_unknown_mode():
    x = torch.ones(1, requires_grad=True)
    with pytest.raises(ValueError, match="'auto', 'batched' or 'loop'"):
        task_jacobian([x * 1], [x], "vmap")
