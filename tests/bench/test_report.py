"""The report: table statistics, Delta m per seed, marks versus EW, lr selection, files."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from taskbalance.bench.builtin import builtin_problem
from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec
from taskbalance.bench.plan import select
from taskbalance.bench.problem import Problem
from taskbalance.bench.report import (
    DELTA_M_FORMULA,
    STL,
    format_table,
    summarize,
    write_outputs,
)
from taskbalance.bench.run_config import RunResult


def data() -> Problem:
    s = Split(torch.zeros(2, 1), {"acc": torch.zeros(2), "err": torch.zeros(2)})
    tasks = (
        TaskSpec("acc", "multiclass", 3, "accuracy", True),
        TaskSpec("err", "regression", 1, "mae", False, unit="eV"),
    )
    return builtin_problem(MultiTaskData("toy", tasks, s, s, s, "toy data", "none"))


def run(label, seed, metrics, lr=1e-3, crit=1.0, step=2.0, status="ok") -> RunResult:
    tasks = [label[4:]] if label.startswith("stl:") else ["acc", "err"]
    history = [
        {
            "epoch": 1,
            "criterion": crit,
            "val_metric": {t: 0.5 for t in tasks},
            "weights": {t: 1.0 for t in tasks},
        }
    ]
    return RunResult(
        {"seed": seed, "lr": lr},
        label,
        tasks,
        history,
        1,
        {t: 0.5 for t in tasks},
        metrics,
        {},
        step,
        status,
        None if status == "ok" else 3,
        1.0,
    )


def stl(seed, acc, err):
    return [run("stl:acc", seed, {"acc": acc}), run("stl:err", seed, {"err": err})]


def test_delta_m_is_taken_per_seed_against_that_seeds_baselines():
    runs = [
        *stl(0, 0.8, 1.0),
        *stl(1, 0.5, 2.0),
        run("ew", 0, {"acc": 0.8, "err": 0.5}),
        run("ew", 1, {"acc": 0.5, "err": 1.0}),
    ]
    rows = {r.label: r for r in summarize(data(), runs)}
    # both seeds: acc equal to its baseline, err halved -> (0 + (-50)) / 2 = -25 on each seed
    assert rows["ew"].delta_m.mean == pytest.approx(-25.0) and rows["ew"].delta_m.std == 0
    assert rows[STL].delta_m.mean == 0.0


def test_metrics_are_mean_and_sample_std_over_seeds():
    runs = [
        *stl(0, 0.8, 1.0),
        *stl(1, 0.8, 1.0),
        run("ew", 0, {"acc": 0.7, "err": 1.0}),
        run("ew", 1, {"acc": 0.9, "err": 1.0}),
    ]
    cell = {r.label: r for r in summarize(data(), runs)}["ew"].metrics["acc"]
    assert cell.mean == pytest.approx(0.8) and cell.std == pytest.approx(math.sqrt(0.02))


def test_differences_beyond_the_spread_are_marked_with_their_direction():
    runs = [*stl(0, 0.8, 1.0), *stl(1, 0.8, 1.0)]
    runs += [run("ew", s, {"acc": a, "err": 1.0}) for s, a in ((0, 0.70), (1, 0.72))]
    runs += [run("good", s, {"acc": a, "err": e}) for s, a, e in ((0, 0.90, 1.01), (1, 0.92, 0.99))]
    runs += [run("bad", s, {"acc": a, "err": 1.5}) for s, a in ((0, 0.60), (1, 0.62))]
    rows = {r.label: r for r in summarize(data(), runs)}
    assert rows["good"].metrics["acc"].mark == "+"  # higher accuracy: better
    assert rows["good"].metrics["err"].mark == ""  # within the spread
    assert rows["bad"].metrics["err"].mark == "-"  # higher error: worse
    assert rows["bad"].delta_m.mark == "-" and rows["good"].delta_m.mark == "+"
    assert rows["ew"].metrics["acc"].mark == "" and rows[STL].metrics["acc"].mark == ""


def test_one_seed_marks_nothing():
    runs = [
        *stl(0, 0.8, 1.0),
        run("ew", 0, {"acc": 0.5, "err": 1.0}),
        run("good", 0, {"acc": 0.9, "err": 0.1}),
    ]
    rows = summarize(data(), runs)
    assert all(c.mark == "" for r in rows for c in [*r.metrics.values(), r.delta_m])


def test_time_ratio_is_relative_to_ew():
    runs = [
        run("ew", 0, {"acc": 0.5, "err": 1.0}, step=2.0),
        run("slow", 0, {"acc": 0.5, "err": 1.0}, step=5.0),
    ]
    rows = {r.label: r for r in summarize(data(), runs)}
    assert rows["slow"].time_ratio == pytest.approx(2.5) and rows["ew"].time_ratio == 1.0


def test_the_table_lists_every_method_task_metric_and_divergence():
    runs = [
        *stl(0, 0.8, 1.0),
        run("ew", 0, {"acc": 0.5, "err": 1.0}),
        run("boom", 0, {"acc": 0.4, "err": 3.0}, status="diverged"),
    ]
    table = format_table(data(), summarize(data(), runs))
    lines = table.splitlines()
    assert "acc accuracy ↑" in lines[0] and "err mae [eV] ↓" in lines[0] and "Δm %" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:]] == [STL, "ew", "boom"]
    assert "diverged at epoch 3" in lines[-1]


def test_learning_rate_selection_reads_validation_only():
    runs = [
        run("ew", 0, {"acc": 0.99, "err": 0.0}, lr=1e-2, crit=0.9),
        run("ew", 0, {"acc": 0.10, "err": 9.0}, lr=1e-3, crit=0.3),
    ]
    assert [r.config["lr"] for r in select(runs)] == [1e-3]


def test_outputs_are_written_whole_and_parse(tmp_path):
    runs = [*stl(0, 0.8, 1.0), run("ew", 0, {"acc": 0.5, "err": 1.0})]
    rows = summarize(data(), runs)
    files = write_outputs(tmp_path, data(), rows, runs, runs, command="taskbalance bench x")
    assert {"csv", "json", "report", "validation_curves", "task_weights"} <= set(files)
    assert not list(tmp_path.glob("*.part"))
    records = list(csv.DictReader(files["csv"].read_text().splitlines()))
    test_rows = [r for r in records if r["split"] == "test"]
    assert len(test_rows) == 2 + 2 + 1  # two single-task runs, ew's two tasks, ew's Delta m
    dm = next(r for r in records if r["metric"] == "delta_m_pct")
    assert float(dm["value"]) == pytest.approx(((0.8 - 0.5) / 0.8 * 100 + 0) / 2)
    payload = json.loads(files["json"].read_text())
    assert payload["command"] == "taskbalance bench x" and len(payload["runs"]) == 3
    assert "taskbalance bench x" in files["report"].read_text()


def test_report_md_writes_delta_m_as_a_formula_worked_through_on_the_runs_numbers(tmp_path):
    runs = [*stl(0, 0.8, 1.0), run("ew", 0, {"acc": 0.5, "err": 1.0})]
    rows = summarize(data(), runs)
    files = write_outputs(tmp_path, data(), rows, runs, runs, command="x", plots=False)
    text = files["report"].read_text()
    assert DELTA_M_FORMULA in text
    assert rows[1].label == "ew" and rows[1].delta_m.mean == pytest.approx(18.75)
    assert (
        "Example (ew, seed 0): acc -100 · (0.5 - 0.8) / 0.8 = +37.5; err 100 · (1 - 1) / 1 = +0; "
        "mean over the 2 tasks: Δm = +18.75 % (results.csv: delta_m_pct)."
    ) in text.splitlines()


def with_records(result: RunResult, records: list[dict]) -> RunResult:
    result.records = records
    return result


def record(step, metric, value, task=None, layer=None):
    return {"step": step, "metric": metric, "task": task, "other": None, "layer": layer,
            "value": value}  # fmt: skip


def test_diagnostics_go_to_their_own_csv_and_plots_not_to_results_json(tmp_path):
    spread = [record(s, "r_spread", 0.5 / (s + 1)) for s in (0, 10, 20)]
    au = [
        record(s, "au_share", v, task=t, layer=layer)
        for s in (0, 10)
        for layer in ("trunk.0.weight", "*")
        for t, v in (("acc", 0.7), ("err", 0.3))
    ]
    runs = [
        *stl(0, 0.8, 1.0),
        run("ew", 0, {"acc": 0.5, "err": 1.0}),
        with_records(run("imtl_g", 0, {"acc": 0.6, "err": 1.0}), spread),
        with_records(run("adatask", 0, {"acc": 0.6, "err": 0.9}), au),
    ]
    files = write_outputs(tmp_path, data(), summarize(data(), runs), runs, runs, command="x")
    for kind in ("rt_spread", "au_shares"):
        assert files[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{kind}]({kind}.png)" in files["report"].read_text()
    rows = list(csv.DictReader(files["diagnostics"].read_text().splitlines()))
    assert len(rows) == len(spread) + len(au)
    assert {r["method"] for r in rows} == {"imtl_g", "adatask"}
    payload = json.loads(files["json"].read_text())
    assert all("records" not in r for r in payload["runs"])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_users_umask_not_the_temporary_files_private_mode(tmp_path, umask):
    import os
    import stat

    runs = [*stl(0, 0.8, 1.0), run("ew", 0, {"acc": 0.5, "err": 1.0})]
    previous = os.umask(umask)
    try:
        files = write_outputs(tmp_path, data(), summarize(data(), runs), runs, runs, command="x",
                              plots=False)  # fmt: skip
    finally:
        os.umask(previous)
    modes = {kind: stat.S_IMODE(path.stat().st_mode) for kind, path in files.items()}
    assert modes and set(modes.values()) == {0o666 & ~umask}


def test_no_diagnostics_means_no_diagnostics_files(tmp_path):
    runs = [*stl(0, 0.8, 1.0), run("ew", 0, {"acc": 0.5, "err": 1.0})]
    files = write_outputs(tmp_path, data(), summarize(data(), runs), runs, runs, command="x")
    assert not {"diagnostics", "rt_spread", "au_shares"} & set(files)
    assert not (tmp_path / "rt_spread.png").exists()


def test_delta_m_bars_always_and_the_relative_error_map_from_three_tasks(tmp_path):
    runs = [*stl(0, 0.8, 1.0), *stl(1, 0.8, 1.0), run("ew", 0, {"acc": 0.5, "err": 1.0}),
            run("ew", 1, {"acc": 0.6, "err": 1.1})]  # fmt: skip
    rows = summarize(data(), runs)
    files = write_outputs(tmp_path / "two", data(), rows, runs, runs, command="x")
    assert files["delta_m"].read_bytes()[:4] == b"\x89PNG" and "relative_error" not in files
    assert "![delta_m](delta_m.png)" in files["report"].read_text()
    s = Split(torch.zeros(2, 1), {t: torch.zeros(2) for t in "abc"})
    three = builtin_problem(
        MultiTaskData(
            "toy3",
            tuple(TaskSpec(t, "regression", 1, "mae", False) for t in "abc"),
            s,
            s,
            s,
            "",
            "",
        )
    )
    runs = [run(f"stl:{t}", 0, {t: 1.0}) for t in "abc"]
    runs.append(run("ew", 0, {"a": 1.5, "b": 0.5, "c": 1.0}))
    for r in runs:
        r.tasks = [t for t in "abc" if t in r.test_metrics]
        r.history = [{**r.history[0], "val_metric": dict.fromkeys(r.tasks, 1.0),
                      "weights": dict.fromkeys(r.tasks, 1.0)}]  # fmt: skip
    rows = summarize(three, runs)
    files = write_outputs(tmp_path / "three", three, rows, runs, runs, command="x")
    assert files["relative_error"].read_bytes()[:4] == b"\x89PNG"
