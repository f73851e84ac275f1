"""The feature level's one backward: the same rows, the same gradients everywhere, as the
per-task passes; and the per-task passes wherever the rows cannot be told apart by task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import taskbalance
from taskbalance.engine import task_jacobian
from taskbalance.engine.edge_capture import backward_through_heads


def _model(seed: int = 0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    heads = nn.ModuleList(
        [nn.Linear(6, 1).double(), nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))]
    ).double()
    heads.append(nn.Linear(6, 3).double())
    return trunk, heads


def _losses(trunk, heads, z=None):
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z = trunk(x) if z is None else z
    # Head 0 reads z twice: its two edges into z add up in its row.
    losses = [(heads[0](z) + z[:, :1]).pow(2).mean(), heads[1](z).abs().mean()]
    losses.append(heads[2](z).sin().sum())
    return losses, z


def test_rows_match_the_per_task_passes_and_every_gradient_the_substituted_backward():
    trunk, heads = _model()
    losses, z = _losses(trunk, heads)
    weights = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    outputs = [w * loss for w, loss in zip(weights, losses, strict=True)]
    (expected,) = task_jacobian(outputs, [z], "loop")
    combination = torch.tensor([0.2, -1.0, 3.0], dtype=torch.float64)
    substitute = torch.einsum("t,t...->...", combination, expected)
    params = [*trunk.parameters(), *heads.parameters()]
    reference = torch.autograd.grad(sum(outputs), list(heads.parameters()), retain_graph=True)
    reference += torch.autograd.grad(z, list(trunk.parameters()), substitute, retain_graph=True)
    seen = []
    run = backward_through_heads(
        sum(outputs), outputs, z, lambda block: seen.append(block) or substitute
    )
    assert run and len(seen) == 1
    torch.testing.assert_close(seen[0], expected, rtol=1e-12, atol=1e-14)
    for param, grad in zip([*heads.parameters(), *trunk.parameters()], reference, strict=True):
        torch.testing.assert_close(param.grad, grad, rtol=1e-12, atol=1e-14)
    assert len(params) == len(reference)


def test_shared_node_above_z_falls_back_having_run_nothing():
    trunk, heads = _model()
    z = trunk(torch.randn(3, 5, dtype=torch.float64))
    shared = z.tanh()  # one node that every task reads: its edge into z mixes them
    losses = [heads[0](shared).sum(), heads[2](shared).sum()]
    assert not backward_through_heads(sum(losses), losses, z, lambda block: block.sum(0))
    assert all(p.grad is None for p in [*trunk.parameters(), *heads.parameters()])


def test_hook_on_z_or_a_task_off_z_falls_back():
    trunk, heads = _model()
    losses, z = _losses(trunk, heads)
    w = torch.ones(1, dtype=torch.float64, requires_grad=True)
    off = [*losses, (w * 2).sum()]  # reaches no feature
    assert not backward_through_heads(sum(off), off, z, lambda block: block.sum(0))
    z.register_hook(lambda g: 2 * g)
    assert not backward_through_heads(sum(losses), losses, z, lambda block: block.sum(0))
    assert w.grad is None


def test_an_error_in_the_substitute_stops_the_backward_at_z_and_leaves_no_hook_behind():
    trunk, heads = _model()
    losses, z = _losses(trunk, heads)

    def fail(block):
        raise ArithmeticError("solve failed")

    with pytest.raises(ArithmeticError, match="solve failed"):
        backward_through_heads(sum(losses), losses, z, fail, retain_graph=True)
    assert all(p.grad is None for p in trunk.parameters())
    heads.zero_grad()
    sum(losses).backward()  # no capture or substitute hook fires any more
    reference_trunk, reference_heads = _model()
    sum(_losses(reference_trunk, reference_heads)[0]).backward()
    for ours, plain in zip(trunk.parameters(), reference_trunk.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, plain.grad)


def test_several_feature_tensors_take_the_per_task_passes_with_the_same_result(monkeypatch):
    import taskbalance.apply as apply_module

    taken = []

    def spy(*args, **kwargs):
        taken.append(backward_through_heads(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(apply_module, "backward_through_heads", spy)
    grads = []
    for mode in ("auto", "loop"):
        trunk, _ = _model()
        x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        z = trunk(x)
        parts = (z[:, :3] * 1.0, z[:, 3:] * 1.0)
        losses = [parts[0].pow(2).sum() + parts[1].sum(), (parts[0] * parts[1]).sum()]
        taskbalance.IMTLG().backward(losses, features=parts, jacobian_mode=mode)
        grads.append([p.grad for p in trunk.parameters()])
    assert taken == []  # never tried: the one backward serves one feature tensor
    for auto, loop in zip(*grads, strict=True):
        torch.testing.assert_close(auto, loop, rtol=1e-12, atol=1e-14)
    trunk, heads = _model()
    losses, z = _losses(trunk, heads)
    taskbalance.IMTLG().backward(losses, features=z)
    assert taken == [True]  # the spy sees the one backward where it applies


@pytest.mark.parametrize("name", ["imtl_g", "imtl", "mgda", "pcgrad", "emtl"])
def test_step_matches_the_per_task_passes(name):
    """Every gradient of a feature-level step, the method's own parameters included, is the
    same as with ``jacobian_mode="loop"`` (the per-task passes and one substituted backward)."""
    grads = []
    for mode in ("auto", "loop"):
        trunk, heads = _model()
        method = taskbalance.get_method(name, tasks=3, level="feature").double()
        for _ in range(2):
            losses, z = _losses(trunk, heads)
            method.backward(losses, features=z, jacobian_mode=mode)
        params = [*trunk.parameters(), *heads.parameters(), *method.parameters()]
        grads.append([p.grad for p in params])
    for auto, loop in zip(*grads, strict=True):
        torch.testing.assert_close(auto, loop, rtol=1e-10, atol=1e-12)


def test_head_hooks_and_retained_gradients_behave_as_in_a_plain_backward():
    """A hook on a head's parameter shapes its gradient and a post-accumulate hook runs, as
    with the per-task passes; a head tensor's ``retain_grad`` gets its gradient once (the
    per-task passes add it a second time: each pass through the head fills it)."""
    results = []
    for mode in ("auto", "loop"):
        trunk, heads = _model()
        heads[0].weight.register_hook(lambda g: 3 * g)
        seen = []
        heads[2].bias.register_post_accumulate_grad_hook(
            lambda p, seen=seen: seen.append(p.grad.clone())
        )
        losses, z = _losses(trunk, heads)
        kept = heads[1](z)
        kept.retain_grad()
        losses[1] = losses[1] + kept.pow(2).mean()
        (expected,) = torch.autograd.grad(losses[1], kept, retain_graph=True)
        kept.grad = None  # that pass filled it too
        taskbalance.IMTLG().backward(losses, features=z, jacobian_mode=mode)
        results.append((heads[0].weight.grad, seen[0], trunk[0].weight.grad))
        if mode == "auto":
            torch.testing.assert_close(kept.grad, expected, rtol=1e-12, atol=1e-14)
    for auto, loop in zip(*results, strict=True):
        torch.testing.assert_close(auto, loop, rtol=1e-10, atol=1e-12)
