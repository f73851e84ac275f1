"""A torch.compile'd trunk: feature level works as is; parameter level needs buffer donation
off, and says so when it is on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taskbalance import IMTLG
from taskbalance.engine import task_jacobian

compile_works = hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()
pytestmark = pytest.mark.skipif(not compile_works, reason="torch.compile unsupported here")


def _model(compiled: bool):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    # aot_eager runs AOTAutograd (where buffer donation lives) without a C++ toolchain.
    return (torch.compile(trunk, backend="aot_eager") if compiled else trunk), heads


def _step(level: str, mode: str, compiled: bool):
    trunk, heads = _model(compiled)
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(16, 3)
    z = trunk(x)
    losses = [(h(z).squeeze(-1) - y[:, i]).pow(2).mean() for i, h in enumerate(heads)]
    info = IMTLG(level=level).backward(losses, shared=trunk, features=z, jacobian_mode=mode)
    return info.gradient_weights, [p.grad.clone() for p in trunk.parameters()]


@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_feature_level_on_a_compiled_trunk_matches_eager(mode):
    compiled_weights, compiled_grads = _step("feature", mode, compiled=True)
    eager_weights, eager_grads = _step("feature", mode, compiled=False)
    torch.testing.assert_close(compiled_weights, eager_weights)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_a_refusal_to_retain_the_graph_says_what_to_do(monkeypatch):
    # Whether AOTAutograd donates buffers depends on the compiled graph; simulate its refusal.
    def refuse(*args, **kwargs):
        raise RuntimeError("This backward function was compiled with non-empty donated buffers")

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="donated_buffer = False"):
        task_jacobian([x.sum()], [x], "loop")


def test_parameter_level_works_with_buffer_donation_off(monkeypatch):
    import torch._functorch.config as functorch_config

    monkeypatch.setattr(functorch_config, "donated_buffer", False)
    torch._dynamo.reset()
    compiled_weights, compiled_grads = _step("parameter", "loop", compiled=True)
    eager_weights, eager_grads = _step("parameter", "loop", compiled=False)
    torch.testing.assert_close(compiled_weights, eager_weights)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)
