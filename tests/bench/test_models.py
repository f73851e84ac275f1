"""Benchmark models: the trunk is exactly the shared part; features cover every shared path."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec
from taskbalance.bench.models import ARCHITECTURES, LeNetHPS, build_model
from taskbalance.engine.requirement import Requirement
from taskbalance.methods.base import Method


def tabular(n: int = 12, with_cat: bool = True) -> MultiTaskData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    x_cat = torch.randint(0, 5, (n, 2), generator=g) if with_cat else None
    y = {"reg": torch.randn(n, generator=g), "bin": (torch.rand(n, generator=g) > 0.5).float()}
    split = Split(x, y, x_cat)
    tasks = (
        TaskSpec("reg", "regression", 1, "mae", False),
        TaskSpec("bin", "binary", 1, "auc", True),
    )
    cards = {"a": 5, "b": 5} if with_cat else {}
    return MultiTaskData("tab", tasks, split, split, split, "", "", cat_cardinalities=cards)


class _Ones(Method):
    """All gradient weights 1 at feature level: must reproduce the plain backward."""

    name = ""
    requires = Requirement.GRAMIAN
    levels = ("feature",)
    default_level = "feature"

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        return torch.ones_like(losses)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_trunk_holds_exactly_the_shared_parameters(arch):
    model = build_model(arch, tabular(), options={"hidden": 8})
    shared = {id(p) for p in model.shared_parameters()}
    heads = {id(p) for p in model.heads.parameters()}
    assert shared and heads and not shared & heads
    assert shared | heads == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("with_cat", [True, False])
def test_feature_level_with_unit_weights_equals_the_plain_backward(arch, with_cat):
    data = tabular(with_cat=with_cat)
    model = build_model(arch, data, options={"hidden": 8})
    split = data.train

    def losses():
        z = model.trunk_forward(split.x, split.x_cat)
        out = {t: model.heads[t](z) for t in data.task_names}
        return z, {t: (out[t] - split.y[t]).pow(2).mean() for t in data.task_names}

    _, plain = losses()
    model.zero_grad()
    sum(plain.values()).backward()
    expected = [p.grad.clone() for p in model.shared_parameters()]
    model.zero_grad()
    z, task_losses = losses()
    _Ones().backward(task_losses, features=model.features(z))
    for got, want in zip((p.grad for p in model.shared_parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_features_drop_the_input_when_it_has_no_shared_parameters():
    model = build_model("mmoe", tabular(with_cat=False), options={"hidden": 8})
    z = model.trunk_forward(torch.randn(3, 4))
    assert isinstance(z, tuple) and len(model.features(z)) == 1


def test_outputs_have_one_logit_per_class_or_one_value():
    tasks = [TaskSpec("left", "multiclass", 10, "accuracy", True)]
    assert LeNetHPS(tasks)(torch.zeros(3, 1, 28, 28))[1]["left"].shape == (3, 10)
    _, out = build_model("ple", tabular(), options={"hidden": 8})(
        (torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.long))
    )
    assert out["reg"].shape == (3,) and out["bin"].shape == (3,)


def test_single_task_baseline_has_one_head_and_the_same_trunk():
    data = tabular()
    multi = build_model("hps", data, options={"hidden": 8})
    single = build_model("hps", data, tasks=["bin"], options={"hidden": 8})
    assert list(single.heads) == ["bin"]
    assert [p.shape for p in single.shared_parameters()] == [
        p.shape for p in multi.shared_parameters()
    ]


def test_bad_architecture_lists_the_valid_ones():
    with pytest.raises(ValueError, match="hps, mmoe, ple"):
        build_model("transformer", tabular())


def test_mixtures_of_experts_refuse_images():
    s = Split(torch.zeros(2, 1, 28, 28), {"left": torch.zeros(2, dtype=torch.long)})
    data = MultiTaskData(
        "img", (TaskSpec("left", "multiclass", 10, "accuracy", True),), s, s, s, "", ""
    )
    with pytest.raises(ValueError, match="use 'hps'"):
        build_model("mmoe", data)
