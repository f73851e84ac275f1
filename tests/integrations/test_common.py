"""What the integrations share: the gradient factor the method never sees, the step's metric
names, the checks, and that importing taskbalance imports no framework."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import taskbalance
from taskbalance.integrations import step_metrics
from taskbalance.integrations.common import (
    GradientFactor,
    check_in_optimizers,
    check_method,
    method_backward,
)


def two_task_step(seed: int = 0):
    torch.manual_seed(seed)
    trunk = nn.Linear(3, 4)
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2))
    x = torch.randn(6, 3)
    z = trunk(x)
    losses = {"a": heads[0](z).pow(2).mean(), "b": 10 * heads[1](z).abs().mean()}
    return trunk, heads, z, losses


@pytest.mark.parametrize(
    ("name", "options"), [("imtl_l", {}), ("imtl_g", {}), ("emtl", {}), ("graddrop", {"seed": 0})]
)
def test_the_factor_multiplies_every_gradient_and_the_method_never_sees_it(name, options):
    grads, infos = [], []
    for factor in (1.0, 0.25):
        trunk, heads, z, losses = two_task_step()
        method = taskbalance.get_method(name, tasks=["a", "b"], **options)
        info = method_backward(method, losses, shared=trunk, features=z, factor=factor)
        params = [*trunk.parameters(), *heads.parameters(), *method.parameters()]
        grads.append([p.grad.clone() for p in params])
        infos.append(info)
    for plain, scaled in zip(*grads, strict=True):
        torch.testing.assert_close(scaled, 0.25 * plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(infos[1].weights, infos[0].weights)
    torch.testing.assert_close(infos[1].losses, infos[0].losses)


def test_non_finite_task_gradients_under_a_factor_raise_as_without_one():
    for factor in (1.0, 0.5):
        w = torch.zeros(2, requires_grad=True)
        losses = {"a": w.sqrt().sum(), "b": w.sum()}  # finite losses, infinite gradient of 'a'
        with pytest.raises(FloatingPointError, match="not finite"):
            method_backward(
                taskbalance.IMTLG(level="parameter"),
                losses,
                shared=[w],
                features=None,
                factor=factor,
            )


def test_the_factor_composes_with_a_mixed_precision_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    factor = GradientFactor(0.5, scaler)
    assert factor.get_scale() == 4.0
    assert float(factor.scale(torch.tensor(3.0))) == 12.0
    assert GradientFactor(0.5, torch.amp.GradScaler("cpu", enabled=False)).amp is None


def test_step_metrics_name_every_quantity_of_a_gradient_level_step():
    _, _, z, losses = two_task_step()
    info = taskbalance.IMTLG().backward(losses, features=z)
    metrics = step_metrics(info, prefix="mtl")
    assert set(metrics) == {
        "mtl/skipped",
        *(
            f"mtl/{q}/{t}"
            for q in ("loss", "weight", "loss_weight", "gradient_weight")
            for t in "ab"
        ),
        "mtl/grad_norm/a",
        "mtl/grad_norm/b",
        "mtl/cosine/a-b",
    }
    assert float(metrics["mtl/gradient_weight/a"]) == pytest.approx(float(info.weights[0]))
    assert float(metrics["mtl/cosine/a-b"]) == pytest.approx(float(info.cosines[0, 1]))


def test_a_skipped_step_records_only_that_it_was_skipped():
    w = torch.ones(2, requires_grad=True)
    losses = {"a": w.sum() * float("nan"), "b": w.sum()}
    info = taskbalance.EW().backward(losses, on_nonfinite="skip")
    assert {k: float(v) for k, v in step_metrics(info).items()} == {"taskbalance/skipped": 1.0}


def test_famo_with_manual_updates_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="update='next_step'"):
        check_method(taskbalance.get_method("famo", tasks=2))
    check_method(taskbalance.get_method("famo", tasks=2, update="next_step"))


def test_method_parameters_outside_every_group_are_named():
    method = taskbalance.IMTLL(tasks=2)
    with pytest.raises(ValueError, match=r"\['scales'\]"):
        check_in_optimizers(method, [{"params": [torch.zeros(1)]}])


def test_importing_taskbalance_imports_no_framework():
    code = (
        "import sys, taskbalance, taskbalance.integrations; "
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
