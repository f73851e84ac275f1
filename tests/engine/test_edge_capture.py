"""The feature level's one backward through the heads: the same rows, the same gradients
everywhere, as the per-task passes; and the per-task passes wherever the rows cannot be told
apart by task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import taskbalance
from taskbalance.engine import task_jacobian
from taskbalance.engine.edge_capture import heads_pass


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


def test_rows_and_head_gradients_match_the_per_task_passes():
    trunk, heads = _model()
    losses, z = _losses(trunk, heads)
    weights = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    outputs = [w * loss for w, loss in zip(weights, losses, strict=True)]
    done = heads_pass(sum(outputs), outputs, [z])
    assert done is not None
    (expected,) = task_jacobian(outputs, [z], "loop")
    torch.testing.assert_close(done.blocks[0], expected, rtol=1e-12, atol=1e-14)
    head_params = list(heads.parameters())
    reference = torch.autograd.grad(sum(outputs), head_params, retain_graph=True)
    by_id = {id(p): g for p, g in zip(done.leaves, done.leaf_grads, strict=True)}
    assert set(by_id) == {id(p) for p in head_params}  # no trunk parameter among them
    for param, grad in zip(head_params, reference, strict=True):
        torch.testing.assert_close(by_id[id(param)], grad, rtol=1e-12, atol=1e-14)


def test_shared_node_above_z_falls_back():
    trunk, heads = _model()
    z = trunk(torch.randn(3, 5, dtype=torch.float64))
    shared = z.tanh()  # one node that every task reads: its edge into z mixes them
    losses = [heads[0](shared).sum(), heads[2](shared).sum()]
    assert heads_pass(sum(losses), losses, [z]) is None


def test_hook_on_z_or_a_task_off_z_falls_back():
    trunk, heads = _model()
    losses, z = _losses(trunk, heads)
    w = torch.ones(1, dtype=torch.float64, requires_grad=True)
    off = [*losses, (w * 2).sum()]  # reaches no feature
    assert heads_pass(sum(off), off, [z]) is None
    z.register_hook(lambda g: 2 * g)
    assert heads_pass(sum(losses), losses, [z]) is None


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
