"""The layerwise Gramian against the Jacobian path, its fallback, and when "auto" picks it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import taskbalance
import taskbalance.engine.gramian_path as gramian_path_module
from taskbalance import apply as apply_module
from taskbalance.engine import (
    LayerwiseGramian,
    UncoveredLayerError,
    combine,
    gramian,
    plan_layers,
    task_jacobian,
)

NUM_TASKS = 3


class MatmulNoBias(nn.Module):
    """``x @ W`` (an ``MmBackward0`` reading W untransposed), then a Linear without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 6))
        self.out = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(x @ self.weight))


class Scaled(nn.Module):
    """A Linear followed by a per-feature scale read by an elementwise product (no rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 6)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        return torch.tanh(self.linear(x)) * self.scale


class Tied(nn.Module):
    """One Linear applied twice: its weight is read by two nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 5)
        self.linear = nn.Linear(5, 5)

    def forward(self, x):
        return self.linear(torch.tanh(self.linear(torch.tanh(self.first(x)))))


class Addmm(nn.Module):
    """``addmm(first, x, W)``: ``first`` a bias of shape (1, out), or a full matrix."""

    def __init__(self, first_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.first = nn.Parameter(torch.randn(first_shape))
        self.weight = nn.Parameter(torch.randn(5, 6))

    def forward(self, x):
        return torch.tanh(torch.addmm(self.first, x, self.weight))


def _trunk_and_input(kind: str):
    gen = torch.Generator().manual_seed(3)
    if kind == "linear":
        trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh())
        x = torch.randn(4, 5, generator=gen)
    elif kind == "linear_3d_input":
        trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Flatten())
        x = torch.randn(2, 3, 5, generator=gen)
    elif kind == "matmul":
        trunk = MatmulNoBias()
        x = torch.randn(4, 5, generator=gen)
    elif kind == "conv2d":
        trunk = nn.Sequential(
            nn.Conv2d(2, 8, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(8, 16, 2, dilation=1),
            nn.Flatten(),
        )
        x = torch.randn(2, 2, 5, 5, generator=gen)
    elif kind == "addmm_row_bias":
        trunk = Addmm((1, 6))
        x = torch.randn(4, 5, generator=gen)
    elif kind == "layernorm":
        trunk = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 6))
        x = torch.randn(4, 5, generator=gen)
    elif kind == "embedding":
        trunk = nn.Sequential(
            nn.Embedding(11, 6, padding_idx=0), nn.Flatten(), nn.Tanh(), nn.Linear(18, 8)
        )
        x = torch.tensor([[0, 1, 2], [3, 1, 0], [2, 2, 10]])
    elif kind == "embedding_scaled_by_frequency":
        trunk = nn.Sequential(nn.Embedding(11, 6, scale_grad_by_freq=True), nn.Flatten())
        x = torch.tensor([[0, 1, 2], [3, 1, 0], [2, 2, 10]])
    else:
        raise ValueError(kind)
    return trunk.double(), x.double() if x.is_floating_point() else x


def _losses(trunk: nn.Module, x: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)
    z = trunk(x)
    heads = [nn.Linear(z.shape[-1], 2).double() for _ in range(NUM_TASKS)]
    # Different nonlinear losses per task and different scales, so that no two rows agree.
    return [(t + 1.0) * head(z).tanh().pow(t + 2).sum() for t, head in enumerate(heads)], heads


@pytest.mark.parametrize(
    ("kind", "rows", "tables"),
    [
        ("linear", 2, 0),
        ("linear_3d_input", 2, 0),
        ("matmul", 2, 0),
        ("addmm_row_bias", 1, 0),
        ("conv2d", 2, 0),
        ("layernorm", 2, 0),
        ("embedding", 1, 1),
        ("embedding_scaled_by_frequency", 0, 1),
    ],
)
@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_layerwise_gramian_equals_the_jacobian_path(kind, rows, tables, mode):
    trunk, x = _trunk_and_input(kind)
    losses, _ = _losses(trunk, x)
    params = list(trunk.parameters())
    plan = plan_layers(losses, params, force=True)
    # The rules were used (not the autograd rows of every parameter), and nothing is uncovered.
    assert (len(plan.rows), len(plan.embeddings), plan.uncovered) == (rows, tables, [])
    layerwise = LayerwiseGramian(losses, params, plan, mode)
    _assert_matches_the_jacobian_path(layerwise, losses, params)


def _assert_matches_the_jacobian_path(layerwise, losses, params):
    """The layerwise Gramian and combination equal those of the T x n Jacobian's blocks."""
    blocks = task_jacobian(losses, params, "loop")
    torch.testing.assert_close(
        layerwise.gramian, gramian(blocks, NUM_TASKS), rtol=1e-10, atol=1e-10
    )
    weights = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
    for got, expected in zip(layerwise.combine(weights), combine(weights, blocks), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_layerwise_gramian_is_exact_with_more_tasks_than_one_chunk():
    trunk, x = _trunk_and_input("linear")
    z = trunk(x)
    torch.manual_seed(1)
    heads = [nn.Linear(z.shape[-1], 1).double() for _ in range(9)]
    losses = [(t + 1.0) * head(z).tanh().pow(2).sum() for t, head in enumerate(heads)]
    params = list(trunk.parameters())
    layerwise = LayerwiseGramian(losses, params, plan_layers(losses, params, force=True))
    expected = gramian(task_jacobian(losses, params, "loop"), 9)
    torch.testing.assert_close(layerwise.gramian, expected, rtol=1e-10, atol=1e-10)


class ConvUnderLinear(nn.Module):
    """A convolution with many output positions (its rows cost more than its Jacobian block,
    so it keeps the block even when forced) under a Linear on the rows route: the deep passes
    are those of the convolution's rows, the heads and the Linear's output little work."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.linear = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x, hook=None):
        y = self.linear(torch.tanh(self.conv(x)).flatten(1))
        if hook is not None:
            y.register_hook(hook)  # runs as a pre-hook of the Linear's node
        return torch.tanh(y)


@pytest.mark.parametrize("hook", [None, lambda g: -g])
@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_output_gradients_taken_apart_after_the_direct_rows_are_exact(monkeypatch, mode, hook):
    torch.manual_seed(4)
    trunk = ConvUnderLinear().double()
    x = torch.randn(2, 1, 10, 10, dtype=torch.float64)
    z = trunk(x, hook)
    heads = [nn.Linear(4, 2).double() for _ in range(NUM_TASKS)]
    losses = [(t + 1.0) * head(z).tanh().pow(t + 2).sum() for t, head in enumerate(heads)]
    params = list(trunk.parameters())
    plan = plan_layers(losses, params, force=True)
    assert (len(plan.rows), plan.direct, plan.capture_apart) == (1, [0, 1], True)
    allocated: list[int] = []
    buffer = gramian_path_module.Workspace.buffer

    def recording(self, index, shape, like):
        allocated.append(index)
        return buffer(self, index, shape, like)

    monkeypatch.setattr(gramian_path_module.Workspace, "buffer", recording)
    layerwise = LayerwiseGramian(losses, params, plan, mode)
    # The convolution's rows (edges 1, 2) are taken before the Linear's output gradients (0).
    assert allocated == [1, 2, 0]
    _assert_matches_the_jacobian_path(layerwise, losses, params)


def test_output_gradients_share_the_passes_where_apart_they_would_repeat_the_work():
    # A LayerNorm's rows above a Linear: passes stopping at the Linear would run as deep.
    trunk, x = _trunk_and_input("layernorm")
    losses, _ = _losses(trunk, x)
    assert not plan_layers(losses, list(trunk.parameters()), force=True).capture_apart
    # Wide heads: passes stopping at the Linear would repeat most of the work.
    torch.manual_seed(4)
    trunk = ConvUnderLinear().double()
    z = trunk(torch.randn(2, 1, 10, 10, dtype=torch.float64))
    heads = [nn.Linear(4, 500).double() for _ in range(NUM_TASKS)]
    losses = [head(z).tanh().sum() for head in heads]
    plan = plan_layers(losses, list(trunk.parameters()), force=True)
    assert (len(plan.rows), plan.direct, plan.capture_apart) == (1, [0, 1], False)


def test_layerwise_gramian_holds_less_than_half_the_jacobian_when_the_batch_is_small():
    trunk = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128)).double()
    losses, _ = _losses(trunk, torch.randn(8, 64, dtype=torch.float64))
    params = list(trunk.parameters())
    layerwise = LayerwiseGramian(losses, params, plan_layers(losses, params, force=False))
    numel = sum(p.numel() for p in params)
    assert layerwise.held_numel < 0.5 * NUM_TASKS * numel


def _step(trunk, x, path, method_name="imtl_g"):
    losses, heads = _losses(trunk, x)
    for module in (trunk, *heads):
        module.zero_grad(set_to_none=True)
    method = taskbalance.get_method(method_name, level="parameter")
    info = method.backward(losses, shared=trunk, gramian_path=path)
    grads = [p.grad.clone() for m in (trunk, *heads) for p in m.parameters()]
    return info, grads


@pytest.mark.parametrize("method_name", ["imtl_g", "upgrad", "mgda"])
def test_backward_is_the_same_on_both_paths(method_name):
    trunk, x = _trunk_and_input("conv2d")
    info_layerwise, layerwise = _step(trunk, x, "layerwise", method_name)
    info_jacobian, jacobian = _step(trunk, x, "jacobian", method_name)
    torch.testing.assert_close(info_layerwise.gradient_weights, info_jacobian.gradient_weights)
    torch.testing.assert_close(info_layerwise.cosines, info_jacobian.cosines)
    for got, expected in zip(layerwise, jacobian, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_gradients_is_the_same_on_both_paths():
    trunk, x = _trunk_and_input("embedding")
    results = []
    for path in ("layerwise", "jacobian"):
        losses, _ = _losses(trunk, x)
        method = taskbalance.IMTLG(level="parameter")
        results.append(method.gradients(losses, shared=trunk, gramian_path=path)[0])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (Scaled(), "read by MulBackward0, for which the layerwise Gramian has no rule"),
        (Tied(), r"read by 2 autograd nodes \(AddmmBackward0\)"),
        (nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten()), "non-2-D convolution"),
        (Addmm((4, 6)), "an addmm whose first argument is not a bias"),
    ],
)
def test_forced_layerwise_names_the_uncovered_layer(module, reason):
    module = module.double()
    x = torch.randn(4, 1, 5) if isinstance(module, nn.Sequential) else torch.randn(4, 5)
    losses, _ = _losses(module, x.double())
    with pytest.raises(UncoveredLayerError, match=reason):
        taskbalance.IMTLG(level="parameter").backward(
            losses, shared=module, gramian_path="layerwise"
        )


def test_auto_warns_for_an_uncovered_layer_and_stays_exact(monkeypatch):
    monkeypatch.setattr(apply_module, "_warned_uncovered", set())
    trunk = Scaled().double()
    x = torch.randn(3, 5, dtype=torch.float64)  # 3 rows: the Linear is cheaper by rows
    with pytest.warns(
        RuntimeWarning, match=r"shared parameter 'scale' \(shape \(6,\)\).*MulBackward0"
    ):
        info_auto, auto = _step(trunk, x, "auto")
    info_jacobian, jacobian = _step(trunk, x, "jacobian")
    torch.testing.assert_close(info_auto.gradient_weights, info_jacobian.gradient_weights)
    for got, expected in zip(auto, jacobian, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _count_jacobian_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = apply_module.task_jacobian

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(apply_module, "task_jacobian", counting)
    return calls


@pytest.mark.parametrize(
    ("batch", "width", "layerwise"),
    [(4, 64, True), (256, 8, False)],  # few rows, wide layers: rows; the reverse: the blocks
)
def test_auto_takes_the_layerwise_path_only_where_it_saves_work(
    monkeypatch, batch, width, layerwise
):
    calls = _count_jacobian_calls(monkeypatch)
    trunk = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)).double()
    losses, _ = _losses(trunk, torch.randn(batch, width, dtype=torch.float64))
    plan = plan_layers(losses, list(trunk.parameters()), force=False)
    assert plan.saves_work is layerwise
    taskbalance.IMTLG(level="parameter").backward(losses, shared=trunk)
    assert len(calls) == (0 if layerwise else 1)


def test_feature_level_and_jacobian_methods_ignore_the_option(monkeypatch):
    calls = _count_jacobian_calls(monkeypatch)
    trunk = nn.Linear(64, 64).double()
    x = torch.randn(4, 64, dtype=torch.float64)
    losses, _ = _losses(trunk, x)
    taskbalance.get_method("graddrop", level="parameter").backward(
        losses, shared=trunk, gramian_path="layerwise"
    )
    z = trunk(x)
    losses = [(t + 1.0) * z.tanh().pow(t + 2).sum() for t in range(NUM_TASKS)]
    taskbalance.IMTLG(level="feature").backward(losses, features=z, gramian_path="layerwise")
    # The parameter-level Jacobian; the feature level reads its rows off the heads' one
    # backward (engine.edge_capture), and neither takes the layerwise path.
    assert len(calls) == 1


def test_unknown_path_is_an_error():
    trunk, x = _trunk_and_input("linear")
    losses, _ = _losses(trunk, x)
    with pytest.raises(ValueError, match="gramian_path must be"):
        taskbalance.IMTLG(level="parameter").backward(losses, shared=trunk, gramian_path="fast")


def test_auto_takes_the_layerwise_path_when_the_jacobian_would_not_fit(monkeypatch):
    width, batch = 64, 96  # by flops the blocks win here, by memory the rows
    trunk = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)).double()
    x = torch.randn(batch, width, dtype=torch.float64)
    assert not plan_layers(_losses(trunk, x)[0], list(trunk.parameters()), force=False).saves_work
    expected = _grads_after(trunk, x, "jacobian")
    jacobian_bytes = NUM_TASKS * sum(p.numel() for p in trunk.parameters()) * 8
    assert gramian_path_module.jacobian_fits(NUM_TASKS, list(trunk.parameters()))
    monkeypatch.setattr(gramian_path_module, "available_memory", lambda device: jacobian_bytes)
    assert not gramian_path_module.jacobian_fits(NUM_TASKS, list(trunk.parameters()))
    calls = _count_jacobian_calls(monkeypatch)
    got = _grads_after(trunk, x, "auto")
    assert not calls  # no Jacobian of the parameters was formed
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def _grads_after(trunk: nn.Module, x: torch.Tensor, path: str) -> list[torch.Tensor]:
    trunk.zero_grad(set_to_none=True)
    losses, _ = _losses(trunk, x)
    taskbalance.IMTLG(level="parameter").backward(losses, shared=trunk, gramian_path=path)
    return [p.grad.clone() for p in trunk.parameters()]
