"""Tasks scored by several metrics: keys ``task/metric``, Delta m over every metric of every task
with its own sign (in selection and in the table), and the files, plots and comparison."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from taskbalance.bench.compare import compare_delta_m, load_result, table_rows
from taskbalance.bench.problem import Problem, SharedBottom, Task, TensorData, check_problem
from taskbalance.bench.report import DELTA_M_FORMULA_METRICS, STL, summarize, write_outputs
from taskbalance.bench.run_config import RunResult
from taskbalance.bench.runner import RunConfig, Runner


def _two(out, y):
    err = (out - y).abs()
    return {"mae": float(err.mean()), "within": float((err < 1).double().mean())}


def _mae(out, y):
    return float((out - y).abs().mean())


def problem() -> Problem:
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    data = TensorData(x, {"a": x[:, 0], "b": x[:, 1]})
    tasks = (Task("a", F.mse_loss, _two, {"mae": False, "within": True}),
             Task("b", F.mse_loss, _mae, False, "mae"))  # fmt: skip

    def model(names):
        return SharedBottom(nn.Linear(3, 4), {t: nn.Linear(4, 1) for t in names})

    return Problem("toy", tasks, data, data, data, model)


def by_hand(values, base):
    """Delta m % over a/mae (lower better), a/within (higher better), b (lower better)."""
    signs = {"a/mae": 1.0, "a/within": -1.0, "b": 1.0}
    return 100 * sum(s * (values[k] - base[k]) / base[k] for k, s in signs.items()) / 3


def test_a_multi_metric_task_keys_its_values_by_task_and_metric():
    p = problem()
    assert p.metric_keys == ("a/mae", "a/within", "b")
    assert p.directions == {"a/mae": False, "a/within": True, "b": False}
    assert p.metric_label("a/within") == "a within" and p.metric_task("a/mae").name == "a"
    assert p.tasks[0].metric_of("a/within") == "within" and p.tasks[1].metric_of("b") == "mae"


@pytest.mark.parametrize("computed", [{"mae": 1.0}, 0.5])
def test_a_metric_that_misses_a_declared_name_is_one_line(computed):
    with pytest.raises(ValueError, match=r"task 'a': metric must compute \{metric: value\}") as e:
        problem().tasks[0].values(computed)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("tasks", "says"), [
    ((Task("a", F.mse_loss, _two, {}),), "higher_is_better names no metric"),
    ((Task("a", F.mse_loss, _two, {"mae": False}), Task("a/mae", F.mse_loss, _mae, False)),
     "metric keys repeat"),
])  # fmt: skip
def test_check_problem_refuses_no_metric_and_repeated_keys(tasks, says):
    with pytest.raises(ValueError, match=says):
        check_problem(dataclasses.replace(problem(), tasks=tasks))


def test_epochs_are_selected_by_delta_m_over_every_metric_with_its_sign():
    reference = {"a/mae": 0.8, "a/within": 0.6, "b": 0.9}
    config = RunConfig(epochs=2, batch_size=8, reference=reference)
    result = Runner(problem(), config, progress=False).run()
    assert set(result.test_metrics) == set(reference)
    for record in result.history:
        assert record["criterion"] == pytest.approx(by_hand(record["val_metric"], reference))


def test_a_reference_keyed_by_task_is_refused_naming_the_metrics():
    config = RunConfig(epochs=1, reference={"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match=r"one validation value per metric \['a/mae', 'a/wit"):
        Runner(problem(), config, progress=False)


def run(label, seed, metrics) -> RunResult:
    tasks = [label[4:]] if label.startswith("stl:") else ["a", "b"]
    history = [{"epoch": 1, "criterion": 0.0, "val_metric": metrics,
                "weights": dict.fromkeys(tasks, 1.0)}]  # fmt: skip
    return RunResult({"seed": seed, "lr": 1e-3}, label, tasks, history, 1, metrics, metrics, {},
                     1.0, "ok", None, 1.0)  # fmt: skip


def runs():
    out = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        base = {"a/mae": 1.0 + shift, "a/within": 0.5, "b": 2.0}
        ew = {"a/mae": 0.5, "a/within": 0.75 - shift, "b": 2.0 + shift}
        out += [run("stl:a", seed, {k: base[k] for k in ("a/mae", "a/within")}),
                run("stl:b", seed, {"b": base["b"]}), run("ew", seed, ew)]  # fmt: skip
    return out


def test_the_table_has_a_column_per_metric_and_delta_m_over_all_of_them():
    found = runs()
    rows = {r.label: r for r in summarize(problem(), found)}
    assert list(rows[STL].metrics) == ["a/mae", "a/within", "b"]
    per_seed = [by_hand(ew.test_metrics, {**stl_a.test_metrics, **stl_b.test_metrics})
                for stl_a, stl_b, ew in (found[0:3], found[3:6])]  # fmt: skip
    assert rows["ew"].delta_m.mean == pytest.approx(sum(per_seed) / 2)
    assert rows["ew"].metrics["a/within"].mean == pytest.approx(0.7)


def test_the_files_and_compare_read_task_and_metric(tmp_path):
    written = write_outputs(tmp_path, problem(), summarize(problem(), runs()), runs(), runs(),
                            command="bench")  # fmt: skip
    report = written["report"].read_text(encoding="utf-8")
    assert "| a mae ↓ | a within ↑ | b mae ↓ |" in report and DELTA_M_FORMULA_METRICS in report
    assert "mean over the 3 metrics" in report
    with open(written["csv"], encoding="utf-8") as f:
        found = {(r["method"], r["task"], r["metric"]) for r in csv.DictReader(f)}
    assert {("ew", "a", "within"), ("stl:a", "a", "mae"), ("ew", "b", "mae")} <= found
    assert {"relative_error", "validation_curves"} <= set(written)
    rows = table_rows(load_result(tmp_path))
    assert "| ew |" in compare_delta_m(rows, rows) and set(rows["ew"]["metrics"]) == {
        "a/mae", "a/within", "b"}  # fmt: skip
