"""The problem plug-in's API: accumulators, checks, data helpers and entry points."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import default_collate

from taskbalance.bench.problem import (
    BatchMean,
    Concatenated,
    Problem,
    SharedBottom,
    Task,
    TensorData,
    check_model,
    check_problem,
    fetch,
    load_problem,
)


def _mae(out, y):
    return float((out - y).abs().mean())


class Confusion:
    """A per-pixel accumulator: a confusion matrix, mean IoU at the end."""

    def __init__(self, classes: int) -> None:
        self.matrix = torch.zeros(classes, classes, dtype=torch.long)

    def update(self, output, target):
        pred = output.argmax(1).flatten()
        self.matrix += torch.bincount(
            target.flatten() * len(self.matrix) + pred, minlength=self.matrix.numel()
        ).view_as(self.matrix)

    def compute(self):
        inter = self.matrix.diag().double()
        union = self.matrix.sum(0) + self.matrix.sum(1) - self.matrix.diag()
        return (inter / union.clamp_min(1)).mean()


def _toy(n=12, multi_input=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    tasks = tuple(Task(t, F.mse_loss, _mae, False, "mae") for t in "ab")
    if multi_input:
        data = {t: TensorData(x, x[:, i]) for i, t in enumerate("ab")}
    else:
        data = TensorData(x, {"a": x[:, 0], "b": x[:, 1]})

    def model(names):
        return SharedBottom(nn.Linear(3, 4), {t: nn.Linear(4, 1) for t in names})

    return Problem("toy", tasks, data, data, data, model)


def test_concatenated_metric_equals_the_metric_of_the_whole_split():
    out, y = torch.randn(10), torch.randn(10)
    acc = Concatenated(_mae)
    for start in range(0, 10, 3):
        acc.update(out[start : start + 3], y[start : start + 3])
    assert acc.compute() == _mae(out, y)


def test_batch_mean_weights_batches_by_their_rows():
    out, y = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    acc = BatchMean(F.mse_loss)
    for start in range(0, 10, 4):  # batches of 4, 4, 2
        acc.update(out[start : start + 4], y[start : start + 4])
    assert acc.compute() == pytest.approx(float(F.mse_loss(out, y)), rel=1e-12)


def test_an_accumulating_metric_starts_fresh_for_every_evaluation():
    task = Task("seg", F.cross_entropy, Confusion(3), True, "miou")
    logits = torch.randn(2, 3, 4, 4)
    target = logits.argmax(1)
    first = task.accumulator()
    first.update(logits, target)
    assert float(first.compute()) == 1.0
    second = task.accumulator()
    second.update(logits, (target + 1) % 3)  # every pixel wrong
    assert float(second.compute()) == 0.0
    assert task.metric.matrix.sum() == 0  # the template itself is never updated


def test_a_per_pixel_accumulated_miou_is_not_the_mean_of_batch_mious():
    # Batch 1 has only class 0 (right), batch 2 only class 1 (wrong): per-batch means differ.
    task = Task("seg", F.cross_entropy, Confusion(2), True, "miou")
    right = torch.zeros(1, 2, 2, 2)
    right[:, 0] = 1
    acc = task.accumulator()
    acc.update(right, torch.zeros(1, 2, 2, dtype=torch.long))
    acc.update(right, torch.ones(1, 2, 2, dtype=torch.long))
    # Over both batches: class 0 IoU 4/8, class 1 IoU 0/4.
    assert float(acc.compute()) == pytest.approx(0.25)


def test_tensor_data_batch_equals_the_default_collation_of_its_items():
    data = TensorData((torch.randn(5, 2), torch.arange(5)), {"y": torch.randn(5)})
    index = torch.tensor([3, 1, 4])
    by_items = default_collate([data[int(i)] for i in index])
    fast = fetch(data, index, None)
    torch.testing.assert_close(list(fast[0]), list(by_items[0]))
    torch.testing.assert_close(fast[1]["y"], by_items[1]["y"])


def test_tensor_data_refuses_rows_that_disagree():
    with pytest.raises(ValueError, match="number of rows"):
        TensorData(torch.zeros(3, 2), {"y": torch.zeros(4)})


def test_check_problem_accepts_single_and_multi_input_problems():
    assert check_problem(_toy()).multi_input is False
    assert check_problem(_toy(multi_input=True)).multi_input is True


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": ()}, "has no task"),
        ({"tasks": (Task("a", F.mse_loss, _mae, False),) * 2}, "task names repeat"),
        ({"tasks": (Task("a", "mse", _mae, False),)}, "loss is not callable"),
        ({"tasks": (Task("a", F.mse_loss, 3, False),)}, "metric is neither"),
        ({"val": TensorData(torch.zeros(0, 3), {"a": torch.zeros(0)})}, "val is empty"),
        ({"test": {"a": TensorData(torch.zeros(2, 3), torch.zeros(2))}}, "all be Datasets"),
        ({"model": "mlp"}, "model must be a callable"),
    ],
)
def test_check_problem_names_what_is_wrong_in_one_line(change, message):
    import dataclasses

    with pytest.raises(ValueError, match=message) as error:
        check_problem(dataclasses.replace(_toy(), **change))
    assert "\n" not in str(error.value) and "'toy'" in str(error.value)


def test_a_multi_input_problem_needs_every_tasks_data_set():
    import dataclasses

    problem = _toy(multi_input=True)
    with pytest.raises(ValueError, match="train has no data set for task 'b'"):
        check_problem(dataclasses.replace(problem, train={"a": problem.train["a"]}))


def test_check_model_wants_a_module_with_a_trunk():
    problem = _toy()
    assert check_model(problem.model(("a",)), problem) is not None
    with pytest.raises(ValueError, match="needs a 'trunk'"):
        check_model(nn.Linear(3, 1), problem)
    with pytest.raises(ValueError, match=r"not an nn\.Module"):
        check_model(lambda x: x, problem)


def test_the_key_changes_with_the_split_sizes():
    import dataclasses

    problem = _toy()
    smaller = dataclasses.replace(
        problem, test=TensorData(torch.zeros(3, 3), {"a": torch.zeros(3), "b": torch.zeros(3)})
    )
    assert problem.key != smaller.key
    assert dataclasses.replace(problem, fingerprint="v2").key == "v2"


@pytest.fixture
def user_module(monkeypatch):
    module = types.ModuleType("tb_user_problems")
    module.make = lambda rows=12: _toy(rows)
    module.wrong = lambda: "not a problem"
    module.constant = 3
    monkeypatch.setitem(sys.modules, "tb_user_problems", module)
    return module


def test_load_problem_passes_the_arguments(user_module):
    assert len(load_problem("tb_user_problems:make", {"rows": 7}).train) == 7


@pytest.mark.parametrize(
    ("entry", "arguments", "message"),
    [
        ("tb_user_problems", {}, "expected module:factory"),
        ("tb_no_such_module:make", {}, "cannot import tb_no_such_module"),
        ("tb_user_problems:missing", {}, "has no attribute 'missing'"),
        ("tb_user_problems:constant", {}, "not a callable"),
        ("tb_user_problems:make", {"colour": 1}, "unexpected keyword argument 'colour'"),
        ("tb_user_problems:wrong", {}, "expected a taskbalance Problem, got str"),
    ],
)
def test_load_problem_errors_are_one_line(user_module, entry, arguments, message):
    with pytest.raises(ValueError, match=message) as error:
        load_problem(entry, arguments)
    assert "\n" not in str(error.value) and str(error.value).startswith(f"--problem {entry}")
