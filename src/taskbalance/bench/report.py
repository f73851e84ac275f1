"""The paper-style table and the files a benchmark writes (CSV, JSON, Markdown, PNG plots).

:func:`summarize` turns the selected runs (one per method and seed, plus the single-task
baselines) into :class:`Row` objects:

* per metric key (:attr:`~taskbalance.bench.problem.Task.metric_keys`: one per task, or one
  per metric of a task scored by several): the test value's mean and standard
  deviation over seeds (sample std, ``n - 1``; 0 for one seed);
* Delta m % (over every metric of every task) per seed against the single-task baselines of
  the SAME seed, then mean and std;
* time per step: the median over seeds of each run's median step time, and its ratio to EW's;
* a mark per cell versus EW: ``+`` (better) or ``-`` (worse) when ``|mean - mean_EW|`` exceeds
  ``std + std_EW`` (the two mean +- std intervals do not overlap). With one seed there is no
  spread and nothing is marked.

:func:`write_outputs` writes ``results.csv`` (one row per method, seed, task, metric),
``results.json`` (the table, every run with its per-epoch history, the command), ``report.md``,
``diagnostics.csv`` (the runs' sampled diagnostics records, when any) and the plots, each to a
temporary name then renamed, so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskbalance.bench.checkpoints import atomic_write
from taskbalance.bench.metrics import delta_m
from taskbalance.bench.problem import Problem, Task
from taskbalance.bench.run_config import RunResult

STL = "single-task"


@dataclass
class Cell:
    """Mean and std over seeds of one number, and its mark versus EW (``""``, ``"+"``, ``"-"``)."""

    mean: float
    std: float
    n: int
    mark: str = ""

    def text(self, digits: int = 4) -> str:
        """``mean ± std`` with the mark, or ``-`` when there is no value."""
        if self.n == 0 or not math.isfinite(self.mean):
            return "-"
        spread = f" ± {self.std:.{digits}g}" if self.n > 1 else ""
        return f"{self.mean:.{digits}g}{spread}{self.mark}"

    def beyond_spread(self, other: Cell) -> bool | None:
        """Whether the two means differ by more than ``std + other.std`` (their mean ± std
        intervals do not overlap); ``None`` when either has fewer than two seeds or no finite
        mean, so no spread to compare with.

        >>> Cell(50.0, 3.0, 3).beyond_spread(Cell(57.5, 4.0, 3)), Cell(1.0, 0.0, 1).beyond_spread(
        ...     Cell(9.0, 0.0, 3))
        (True, None)
        """
        if self.n < 2 or other.n < 2 or not math.isfinite(self.mean + other.mean):
            return None
        return abs(other.mean - self.mean) > self.std + other.std


def _cell(values: Sequence[float]) -> Cell:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return Cell(math.nan, math.nan, 0)
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return Cell(statistics.fmean(finite), std, len(finite))


@dataclass
class Row:
    """One line of the table: a method (or the single-task baselines) over its seeds."""

    label: str
    metrics: dict[str, Cell]
    delta_m: Cell
    step_ms: float
    time_ratio: float
    lr: float | None
    seeds: list[int]
    status: str
    best_epochs: list[int] = field(default_factory=list)


def _mark(cell: Cell, ew: Cell, higher_is_better: bool) -> str:
    if not cell.beyond_spread(ew):
        return ""
    return "+" if (cell.mean > ew.mean) == higher_is_better else "-"


def stl_metrics(runs: Sequence[RunResult]) -> dict[int, dict[str, float]]:
    """Each seed's single-task test metrics ``{seed: {task: value}}``, from ``stl:<task>`` runs."""
    out: dict[int, dict[str, float]] = {}
    for run in runs:
        if run.label.startswith("stl:"):
            out.setdefault(run.config["seed"], {}).update(run.test_metrics)
    return out


def summarize(
    data: Problem,
    runs: Sequence[RunResult],
    ew_label: str = "ew",
    timing: Mapping[str, float] | None = None,
) -> list[Row]:
    """The table's rows: single-task baselines first (if any), then methods in run order.

    ``runs`` are the selected runs (one per label and seed). ``timing`` (``{label: ms}``, from
    :func:`taskbalance.bench.runner.time_steps`) replaces the runs' own step times when given.
    See the module docstring for the statistics and marks.

    >>> from taskbalance.bench.builtin import builtin_problem
    >>> from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec
    >>> import torch
    >>> s = Split(torch.zeros(1, 1), {"a": torch.zeros(1)})
    >>> d = builtin_problem(
    ...     MultiTaskData("toy", (TaskSpec("a", "regression", 1, "mae", False),), s, s, s, "", ""))
    >>> def run(label, mae):
    ...     return RunResult({"seed": 0, "lr": 1e-3}, label, ["a"], [], 1, {}, {"a": mae}, {},
    ...                      1.0, "ok", None, 0.0)
    >>> rows = summarize(d, [run("stl:a", 2.0), run("ew", 1.0)])
    >>> [(r.label, r.delta_m.mean) for r in rows]
    [('single-task', 0.0), ('ew', -50.0)]
    """
    tasks = data.metric_keys
    hib = data.directions
    baselines = stl_metrics(runs)
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        key = STL if run.label.startswith("stl:") else run.label
        groups.setdefault(key, []).append(run)
    rows: list[Row] = []
    for label, group in sorted(groups.items(), key=lambda kv: kv[0] != STL):
        rows.append(_row(label, group, tasks, hib, baselines, timing or {}))
    ew = next((r for r in rows if r.label == ew_label), None)
    for row in rows:
        row.time_ratio = row.step_ms / ew.step_ms if ew is not None and ew.step_ms > 0 else math.nan
        if ew is None or row is ew or row.label == STL:
            continue
        for t in tasks:
            row.metrics[t].mark = _mark(row.metrics[t], ew.metrics[t], hib[t])
        row.delta_m.mark = _mark(row.delta_m, ew.delta_m, False)
    return rows


def _row(
    label: str,
    group: Sequence[RunResult],
    tasks: Sequence[str],
    hib: Mapping[str, bool],
    baselines: Mapping[int, Mapping[str, float]],
    timing: Mapping[str, float],
) -> Row:
    seeds = sorted({r.config["seed"] for r in group})
    per_seed: dict[int, dict[str, float]] = {s: {} for s in seeds}
    for run in group:
        per_seed[run.config["seed"]].update(run.test_metrics)
    metrics = {t: _cell([per_seed[s].get(t, math.nan) for s in seeds]) for t in tasks}
    deltas = []
    for s in seeds:
        if s in baselines and all(t in per_seed[s] for t in tasks):
            base = baselines[s]
            if all(t in base for t in tasks):
                deltas.append(delta_m({t: per_seed[s][t] for t in tasks}, base, hib))
    times = [timing.get(r.label, r.step_ms) for r in group]
    # The single-task row: the step of one single-task model, averaged over the tasks.
    step = statistics.fmean(times) if label == STL else statistics.median(times)
    bad = [r for r in group if r.status != "ok"]
    status = (
        "ok"
        if not bad
        else "; ".join(f"seed {r.config['seed']} diverged at epoch {r.diverged_epoch}" for r in bad)
    )
    lrs = {r.config["lr"] for r in group}
    return Row(
        label=label,
        metrics=metrics,
        delta_m=_cell(deltas),
        step_ms=step,
        time_ratio=math.nan,
        lr=lrs.pop() if len(lrs) == 1 else None,
        seeds=seeds,
        status=status,
        best_epochs=[r.best_epoch for r in group],
    )


def format_table(data: Problem, rows: Sequence[Row], digits: int = 4) -> str:
    """The table as Markdown: one column per metric key, Delta m %, ms/step, time vs EW.

    >>> from taskbalance.bench.builtin import builtin_problem
    >>> from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec
    >>> import torch
    >>> s = Split(torch.zeros(1, 1), {"a": torch.zeros(1)})
    >>> d = builtin_problem(
    ...     MultiTaskData("toy", (TaskSpec("a", "regression", 1, "mae", False),), s, s, s, "", ""))
    >>> row = Row("ew", {"a": Cell(1.0, 0.0, 1)}, Cell(-5.0, 0.0, 1), 2.0, 1.0, 1e-3, [0], "ok")
    >>> print(format_table(d, [row]).splitlines()[2])
    | ew | 1 | -5 | 2.00 | 1.00 | 0.001 | ok |
    """
    header = ["method"]
    for key, higher in data.directions.items():
        header.append(f"{data.metric_label(key)} {'↑' if higher else '↓'}")
    header += ["Δm % ↓", "ms/step", "time / EW", "lr", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.label, *(row.metrics[k].text(digits) for k in data.metric_keys)]
        cells.append(row.delta_m.text(3))
        cells.append(f"{row.step_ms:.2f}" if math.isfinite(row.step_ms) else "-")
        cells.append(f"{row.time_ratio:.2f}" if math.isfinite(row.time_ratio) else "-")
        cells.append(f"{row.lr:g}" if row.lr is not None else "mixed")
        cells.append(row.status)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = (
    "Test metrics at the epoch selected on validation (mean ± std over seeds). Δm % (lower is "
    "better): the formula below, per seed against the single-task baselines of the same seed. "
    "ms/step: median wall time of a training step (forward, method "
    "backward, optimizer step), measured interleaved across methods after training (unless "
    "noted); the single-task row gives one single-task model's step. "
    "+ / -: better / worse than EW by more than the spread over seeds (|Δmean| > std + "
    "std_EW); with one seed nothing is marked."
)

#: Delta m as report.md writes it (:func:`taskbalance.bench.metrics.delta_m` computes it).
DELTA_M_FORMULA = (
    "Δm % = (100 / T) · Σ_t s_t · (M_t - B_t) / |B_t| over the T tasks: M_t is the method's "
    "test metric on task t, B_t the single-task baseline's (same seed), s_t = +1 where lower "
    "is better and -1 where higher is better."
)
#: The same for a problem with a task scored by several metrics (every metric is a term).
DELTA_M_FORMULA_METRICS = (
    "Δm % = (100 / K) · Σ_k s_k · (M_k - B_k) / |B_k| over the K metrics of all tasks (every "
    "column of the table): M_k is the method's test value of metric k, B_k the single-task "
    "baseline's (same seed, the model of that metric's task), s_k = +1 where lower is better "
    "and -1 where higher is better."
)


def delta_m_formula(data: Problem) -> str:
    """:data:`DELTA_M_FORMULA_METRICS` when a task of ``data`` has several metrics, else
    :data:`DELTA_M_FORMULA`."""
    return DELTA_M_FORMULA_METRICS if _by_metric(data) else DELTA_M_FORMULA


def _by_metric(data: Problem) -> bool:
    return any(t.multi_metric for t in data.tasks)


def seed_delta_m(
    data: Problem, run: RunResult, baselines: Mapping[int, Mapping[str, float]]
) -> float | None:
    """``run``'s test Delta m % against the single-task ``baselines`` of its seed
    (:func:`stl_metrics`); ``None`` for a single-task run or when a task has no value."""
    base = baselines.get(run.config["seed"])
    if run.label.startswith("stl:") or base is None:
        return None
    if not set(run.test_metrics) == set(base) == set(data.metric_keys):
        return None
    return delta_m(run.test_metrics, base, data.directions)


def delta_m_example(data: Problem, selected: Sequence[RunResult]) -> str:
    """:func:`delta_m_formula` worked through on one selected run (EW's first seed, else the
    first method with a Delta m): each metric's term, then their mean, which is that run's
    Delta m. Empty when no run has one.

    >>> from taskbalance.bench.builtin import builtin_problem
    >>> from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec
    >>> import torch
    >>> s = Split(torch.zeros(1, 1), {"acc": torch.zeros(1), "mae": torch.zeros(1)})
    >>> tasks = (TaskSpec("acc", "binary", 1, "accuracy", True),
    ...          TaskSpec("mae", "regression", 1, "mae", False))
    >>> d = builtin_problem(MultiTaskData("toy", tasks, s, s, s, "", ""))
    >>> def run(label, metrics):
    ...     return RunResult({"seed": 0, "lr": 1e-3}, label, list(metrics), [], 1, {}, metrics,
    ...                      {}, 1.0, "ok", None, 0.0)
    >>> runs = [run("stl:acc", {"acc": 0.8}), run("stl:mae", {"mae": 2.0}),
    ...         run("ew", {"acc": 0.9, "mae": 1.0})]
    >>> print(delta_m_example(d, runs).replace("; ", "\\n"))
    Example (ew, seed 0): acc -100 · (0.9 - 0.8) / 0.8 = -12.5
    mae 100 · (1 - 2) / 2 = -50
    mean over the 2 tasks: Δm = -31.25 % (results.csv: delta_m_pct).
    """
    baselines = stl_metrics(selected)
    ranked = [r for r in selected if seed_delta_m(data, r, baselines) is not None]
    if not ranked:
        return ""
    run = min(ranked, key=lambda r: (r.label != "ew", r.config["seed"]))
    base = baselines[run.config["seed"]]
    terms = []
    for t, higher in data.directions.items():
        value, reference = run.test_metrics[t], base[t]
        term = delta_m({t: value}, {t: reference}, {t: higher})
        terms.append(f"{t} {'-' if higher else ''}100 · ({value:.4g} - {reference:.4g}) / "
                     f"{abs(reference):.4g} = {term:+.4g}")  # fmt: skip
    total = seed_delta_m(data, run, baselines)
    n = f"{len(terms)} {'metrics' if _by_metric(data) else 'tasks'}"
    return (f"Example ({run.label}, seed {run.config['seed']}): {'; '.join(terms)}; mean over "
            f"the {n}: Δm = {total:+.4g} % (results.csv: delta_m_pct).")  # fmt: skip


#: Pairs of methods whose numbers are identical by construction, and why.
IDENTICAL_BY_CONSTRUCTION = {
    frozenset({"uw", "imtl_l"}): "IMTL-L's e^s L - s and UW's (half=False) e^-s L + s are the "
    "same function under s -> -s, and Adam started from s = 0 follows the mirrored path "
    "exactly, so the shared model sees the same weights at every step",
}


def identical_rows_notes(rows: Sequence[Row]) -> list[str]:
    """A note for every group of methods whose table cells are all identical (every task's
    mean and std and Delta m), saying why where it holds by construction.

    >>> cells = {"a": Cell(1.0, 0.1, 3)}
    >>> rows = [Row(m, dict(cells), Cell(5.0, 1.0, 3), 1.0, 1.0, 1e-3, [0], "ok")
    ...         for m in ("ew", "uw", "imtl_l")]
    >>> rows[0].delta_m = Cell(6.0, 1.0, 3)
    >>> identical_rows_notes(rows)[0].startswith("uw and imtl_l give identical numbers by constr")
    True
    """
    groups: dict[tuple, list[str]] = {}
    for row in rows:
        if row.label == STL or row.delta_m.n == 0:
            continue
        key = tuple((c.mean, c.std) for c in (*row.metrics.values(), row.delta_m))
        groups.setdefault(key, []).append(row.label)
    notes = []
    for labels in groups.values():
        if len(labels) < 2:
            continue
        names = " and ".join(labels)
        reason = IDENTICAL_BY_CONSTRUCTION.get(frozenset(labels))
        notes.append(
            f"{names} give identical numbers by construction: {reason}"
            if reason
            else f"{names} give identical numbers (every metric of every seed)"
        )
    return notes


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


#: The columns of ``results.csv``.
RESULTS_COLUMNS = ("method", "seed", "lr", "selected", "task", "metric", "split", "value",
                   "best_epoch", "status", "step_ms")  # fmt: skip


def results_rows(
    data: Problem, runs: Sequence[RunResult], selected: Sequence[RunResult]
) -> list[dict[str, Any]]:
    """``results.csv``'s long-format rows: one per run (method, seed, lr), task, metric (each
    of a task's metrics when it has several) and split (``selected`` marks the runs at the
    learning rate chosen on validation), then one Delta m row (task ``"*"``, metric
    ``delta_m_pct``) per selected method run and seed."""
    chosen = {id(r) for r in selected}

    def base(run: RunResult) -> dict[str, Any]:
        return {"method": run.label, "seed": run.config["seed"], "lr": run.config["lr"],
                "selected": id(run) in chosen, "best_epoch": run.best_epoch,
                "status": run.status, "step_ms": run.step_ms}  # fmt: skip

    out = [
        {**base(run), "task": t, "metric": m, "split": split, "value": v[k]}
        for run in runs
        for t in run.tasks
        for k, m in zip(data.task(t).metric_keys, data.task(t).metric_names, strict=True)
        for split, v in (("val", run.val_metrics), ("test", run.test_metrics))
        if k in v
    ]
    baselines = stl_metrics(selected)
    for run in selected:
        value = seed_delta_m(data, run, baselines)
        if value is not None:
            out.append({**base(run), "task": "*", "metric": "delta_m_pct", "split": "test",
                        "value": value})  # fmt: skip
    return out


#: The columns of ``diagnostics.csv``: the run, then :data:`taskbalance.diagnostics.COLUMNS`.
DIAGNOSTICS_COLUMNS = ("method", "seed", "lr", "selected", "step", "metric", "task", "other",
                       "layer", "value")  # fmt: skip


def diagnostics_rows(
    runs: Sequence[RunResult], selected: Sequence[RunResult]
) -> list[dict[str, Any]]:
    """Every run's diagnostics records (:attr:`RunResult.records`), one row per record, with
    the run's method, seed, lr and whether it is a selected run."""
    chosen = {id(r) for r in selected}
    out = []
    for run in runs:
        base = {"method": run.label, "seed": run.config["seed"], "lr": run.config["lr"],
                "selected": id(run) in chosen}  # fmt: skip
        out.extend({**base, **record} for record in run.records)
    return out


def write_outputs(
    out_dir: str | os.PathLike[str],
    data: Problem,
    rows: Sequence[Row],
    runs: Sequence[RunResult],
    selected: Sequence[RunResult],
    *,
    command: str,
    notes: Sequence[str] = (),
    setup: Mapping[str, str] | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """Write results.csv, results.json, report.md, diagnostics.csv (when the runs recorded
    any) and the PNG plots (:func:`taskbalance.bench.plots.write_plots`) to ``out_dir``.
    ``setup`` (``{field: text}``, e.g. :func:`taskbalance.bench.benchmark.setup_fields`) is
    what produced the numbers: it leads report.md and is kept in results.json.

    Returns ``{kind: path}`` of what was written.
    """
    out = Path(out_dir)
    notes = [*notes, *identical_rows_notes(rows)]
    written = {"csv": out / "results.csv", "json": out / "results.json"}
    _write_csv(written["csv"], RESULTS_COLUMNS, results_rows(data, runs, selected))
    payload = {
        "command": command,
        "setup": dict(setup or {}),
        "dataset": {"name": data.name, "description": data.description, "licence": data.licence,
                    "tasks": [_task_dict(t) for t in data.tasks]},
        "notes": list(notes),
        "table": [_row_dict(r) for r in rows],
        # The diagnostics records go to diagnostics.csv: thousands of rows per run.
        "runs": [{k: v for k, v in r.to_dict().items() if k != "records"} for r in runs],
        "selected": [
            {"method": r.label, "seed": r.config["seed"], "lr": r.config["lr"]} for r in selected
        ],
    }  # fmt: skip
    _atomic_write(written["json"], json.dumps(payload, indent=1, default=_json_default).encode())
    diagnostics = diagnostics_rows(runs, selected)
    if diagnostics:
        written["diagnostics"] = out / "diagnostics.csv"
        _write_csv(written["diagnostics"], DIAGNOSTICS_COLUMNS, diagnostics)
    figures: dict[str, Path] = {}
    if plots:
        from taskbalance.bench.plots import write_plots

        try:
            figures = write_plots(out, data, selected, rows)
        except ImportError as error:  # matplotlib is an optional extra: results still count
            notes.append(f"plots skipped: {error} (pip install 'taskbalance[bench]')")
    written.update(figures)
    written["report"] = out / "report.md"
    report = report_text(data, rows, selected, command=command, notes=notes, setup=setup,
                         figures=figures)  # fmt: skip
    _atomic_write(written["report"], report.encode())
    return written


def report_text(
    data: Problem,
    rows: Sequence[Row],
    selected: Sequence[RunResult],
    *,
    command: str,
    notes: Sequence[str] = (),
    setup: Mapping[str, str] | None = None,
    figures: Mapping[str, Path] | None = None,
) -> str:
    """report.md: the command, the setup, the data's description, the table, its legend, the
    Delta m formula with an example from ``selected`` (:func:`delta_m_example`), the notes and
    the ``figures`` (``{name: path}``)."""
    example = delta_m_example(data, selected)
    lines = [
        f"# taskbalance bench: {data.name}",
        "",
        f"Command: `{command}`",
        "",
        *(f"- {key}: {value}" for key, value in (setup or {}).items()),
        "",
        data.description,
        "",
        format_table(data, rows),
        "",
        LEGEND,
        "",
        delta_m_formula(data),
        *(["", example] if example else []),
        "",
        *(f"- {n}" for n in notes),
        "",
        *(f"![{k}]({p.name})" for k, p in (figures or {}).items()),
        "",
    ]
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(path, buffer.getvalue().encode())


def _task_dict(task: Task) -> dict[str, Any]:
    if task.multi_metric:
        return {"name": task.name, "metric": list(task.metric_names), "unit": task.unit,
                "higher_is_better": dict(task.higher_is_better)}  # fmt: skip
    return {"name": task.name, "metric": task.metric_name, "unit": task.unit,
            "higher_is_better": task.higher_is_better}  # fmt: skip


def _row_dict(row: Row) -> dict[str, Any]:
    return {
        "method": row.label,
        "metrics": {t: c.__dict__ for t, c in row.metrics.items()},
        "delta_m": row.delta_m.__dict__,
        "step_ms": row.step_ms,
        "time_ratio": row.time_ratio,
        "lr": row.lr,
        "seeds": row.seeds,
        "status": row.status,
        "best_epochs": row.best_epochs,
    }
