"""Ordinary model code that once gave a silently wrong update or a crash (docs/reliability.md).

Each test reproduces one report: a gradient hook on a shared parameter, a tensor hook on a
layer's output, frozen parameters inside the shared module, sparse embeddings, views of one
parameter passed as shared, and one input batch per task at feature level. The reference is
plain autograd, task by task, as in tests/properties/test_random_trunks.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from taskbalance import IMTLG, get_method
from taskbalance.engine import SparseGradientError, plan_layers

PATHS = [("auto", "loop"), ("auto", "batched"), ("layerwise", "loop"), ("jacobian", "loop")]


def _losses(z: Tensor) -> list[Tensor]:
    return [z[:, 0].pow(2).mean(), z[:, 1].sin().mean(), (z[:, 2] - 1).abs().mean()]


def _reference(losses: list[Tensor], params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The per-task gradients by plain autograd (hooks applied) and IMTL-G's combination."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g.to_dense()).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    jacobian = torch.stack(rows)
    weights = IMTLG().shared_weights(torch.ones(len(rows)), jacobian @ jacobian.T)
    return jacobian, weights @ jacobian


def _grads(params: list[Tensor]) -> Tensor:
    return torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad.to_dense()).reshape(-1) for p in params]
    )


def _check_every_path(build) -> None:
    """``build()`` returns (losses, trainable params, shared module); run each path afresh."""
    losses, params, _ = build()
    _, expected = _reference(losses, params)
    for path, mode in PATHS:
        losses, params, shared = build()
        for p in params:
            p.grad = None
        IMTLG(level="parameter").backward(
            losses, shared=shared, gramian_path=path, jacobian_mode=mode
        )
        torch.testing.assert_close(_grads(params), expected, rtol=1e-10, atol=1e-12)


def _embedding_trunk(embedding: nn.Embedding, linear: nn.Linear, tokens: Tensor):
    """A builder of (losses, trainable params, shared module) for an embedding-bag trunk."""

    def build():
        z = torch.tanh(linear(embedding(tokens).mean(dim=1)))
        params = [p for p in (*embedding.parameters(), *linear.parameters()) if p.requires_grad]
        return _losses(z), params, nn.Sequential(embedding, linear)

    return build


def test_a_gradient_hook_on_a_shared_parameter_applies_on_every_path():
    torch.manual_seed(0)
    embedding, linear = nn.Embedding(10, 4).double(), nn.Linear(4, 3).double()
    trainable_rows = (torch.arange(10) < 5).double()[:, None]
    embedding.weight.register_hook(lambda g: g * trainable_rows)  # fine-tune some rows only
    weight_mask = (torch.rand(3, 4) > 0.5).double()
    linear.weight.register_hook(lambda g: g * weight_mask)
    tokens = torch.randint(0, 10, (3, 2))

    _check_every_path(_embedding_trunk(embedding, linear, tokens))


def test_post_accumulate_grad_hooks_of_shared_parameters_run_once_per_step():
    linear = nn.Linear(4, 3).double()
    calls = []
    linear.weight.register_post_accumulate_grad_hook(lambda p: calls.append(p.grad.clone()))
    z = linear(torch.randn(5, 4, dtype=torch.float64))
    IMTLG(level="parameter").backward(_losses(z), shared=linear)
    assert len(calls) == 1
    torch.testing.assert_close(calls[0], linear.weight.grad)


@pytest.mark.parametrize("hook", [lambda g: -g, lambda g: g.clamp(-0.01, 0.01)])
def test_a_tensor_hook_on_a_covered_layers_output_applies_on_every_path(hook):
    torch.manual_seed(1)
    lower, upper = nn.Linear(5, 6).double(), nn.Linear(6, 3).double()
    x = torch.randn(2, 5, dtype=torch.float64)  # few rows: both layers take the rows route

    def build():
        z = upper(torch.tanh(lower(x)))
        z.register_hook(hook)  # e.g. gradient reversal on the trunk's output
        return _losses(z), [*lower.parameters(), *upper.parameters()], nn.Sequential(lower, upper)

    losses, params, _ = build()
    assert len(plan_layers(losses, params, force=True).rows) == 2
    _check_every_path(build)
    losses, params, shared = build()
    for p in params:
        p.grad = None
    IMTLG(level="parameter").backward(losses, shared=shared, jacobian_mode="batched")
    torch.testing.assert_close(_grads(params), _reference(*build()[:2])[1], rtol=1e-10, atol=0)


def test_frozen_parameters_inside_the_shared_module_are_left_out():
    torch.manual_seed(2)
    embedding, linear = nn.Embedding(10, 4).double(), nn.Linear(4, 3).double()
    embedding.weight.requires_grad_(False)  # a frozen embedding, as in fine-tuning
    tokens = torch.randint(0, 10, (6, 2))
    build = _embedding_trunk(embedding, linear, tokens)
    _check_every_path(build)
    assert embedding.weight.grad is None
    losses, _, trunk = build()
    grads, _ = IMTLG(level="parameter").gradients(losses, shared=trunk)
    assert grads[0] is None and grads[1].shape == (3, 4)  # one entry per listed parameter


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_sparse_embeddings_get_a_sparse_update_on_the_looked_up_rows(padding_idx):
    torch.manual_seed(3)
    embedding = nn.Embedding(10, 4, sparse=True, padding_idx=padding_idx).double()
    linear = nn.Linear(4, 3).double()
    tokens = torch.tensor([[0, 3], [3, 7], [0, 1]])

    build = _embedding_trunk(embedding, linear, tokens)
    losses, params, shared = build()
    _, expected = _reference(losses, params)
    for path in ("auto", "layerwise"):
        losses, params, shared = build()
        for p in params:
            p.grad = None
        IMTLG(level="parameter").backward(losses, shared=shared, gramian_path=path)
        assert embedding.weight.grad.is_sparse
        rows = embedding.weight.grad.coalesce().indices()[0].tolist()
        assert rows == ([1, 3, 7] if padding_idx == 0 else [0, 1, 3, 7])
        torch.testing.assert_close(_grads(params), expected, rtol=1e-10, atol=1e-12)
    optimizer = torch.optim.SparseAdam([embedding.weight])
    optimizer.step()  # SparseAdam accepts the update as its own backward would give it


def test_sparse_embeddings_are_refused_in_one_line_where_the_jacobian_is_needed():
    embedding, linear = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 3)
    trunk = nn.Sequential(embedding, linear)
    tokens = torch.randint(0, 10, (6, 2))
    jacobian_method = get_method("graddrop", level="parameter")
    for method, path in ((IMTLG(level="parameter"), "jacobian"), (jacobian_method, "auto")):
        z = linear(embedding(tokens).mean(dim=1))
        with pytest.raises(
            SparseGradientError, match=r"shared parameter '0\.weight' gets a sparse"
        ):
            method.backward(_losses(z), shared=trunk, gramian_path=path)
    z = torch.tanh(linear(embedding(tokens).mean(dim=1)))
    IMTLG().backward(_losses(z), features=z)  # feature level: the trunk's own sparse backward
    assert embedding.weight.grad.is_sparse


def test_views_of_one_parameter_passed_as_shared_are_refused_in_one_line():
    base = nn.Parameter(torch.randn(6, 5))
    first, second = base.chunk(2)
    z = torch.tanh(torch.randn(4, 5) @ first.T) * (torch.randn(4, 5) @ second.T)
    message = r"item 0 \(shape \(3, 5\)\) is not a leaf tensor .* pass the parameter it comes from"
    with pytest.raises(ValueError, match=message) as error:
        IMTLG(level="parameter").backward(_losses(z), shared=[first, second])
    assert "\n" not in str(error.value)


def test_one_input_batch_per_task_at_feature_level_is_refused_in_one_line():
    torch.manual_seed(4)
    trunk, head_a, head_b = nn.Linear(5, 4), nn.Linear(4, 1), nn.Linear(4, 1)
    xa, xb = torch.randn(8, 5), torch.randn(8, 5)
    za, zb = trunk(xa), trunk(xb)
    losses = {"a": head_a(za).pow(2).mean(), "b": head_b(zb).pow(2).mean()}
    with pytest.raises(ValueError, match="tasks 'a' and 'b' read no feature tensor in common"):
        IMTLG().backward(losses, features=(za, zb))
    assert trunk.weight.grad is None  # refused before anything was back-propagated
    info = IMTLG(level="parameter").backward(losses, shared=trunk)  # the documented way
    assert abs(float(info.cosines[0, 1])) > 0


def test_several_features_read_in_common_are_still_taken_at_feature_level():
    trunk = nn.Linear(5, 8)
    low, high = trunk(torch.randn(6, 5)).chunk(2, dim=1)
    losses = [(low * high).sum(dim=1).pow(2).mean(), high.sum(dim=1).pow(2).mean()]
    info = IMTLG().backward(losses, features=(low, high))
    assert info.level == "feature" and abs(float(info.cosines[0, 1])) > 0
    assert trunk.weight.grad is not None
