"""The paper-style table and the files a benchmark writes (CSV, JSON, Markdown, PNG plots).

:func:`summarize` turns the selected runs (one per method and seed, plus the single-task
baselines) into :class:`Row` objects:

* per task: the test metric's mean and standard deviation over seeds (sample std, ``n - 1``;
  0 for one seed);
* Delta m % per seed against the single-task baselines of the SAME seed, then mean and std;
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
from taskbalance.bench.problem import Problem
from taskbalance.bench.runner import RunResult

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
    tasks = data.task_names
    hib = {t: data.task(t).higher_is_better for t in tasks}
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
    """The table as Markdown: one column per task metric, Delta m %, ms/step, time vs EW.

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
    for t in data.task_names:
        spec = data.task(t)
        arrow = "↑" if spec.higher_is_better else "↓"
        unit = f" [{spec.unit}]" if spec.unit else ""
        header.append(f"{t} {spec.metric_name}{unit} {arrow}")
    header += ["Δm % ↓", "ms/step", "time / EW", "lr", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.label, *(row.metrics[t].text(digits) for t in data.task_names)]
        cells.append(row.delta_m.text(3))
        cells.append(f"{row.step_ms:.2f}" if math.isfinite(row.step_ms) else "-")
        cells.append(f"{row.time_ratio:.2f}" if math.isfinite(row.time_ratio) else "-")
        cells.append(f"{row.lr:g}" if row.lr is not None else "mixed")
        cells.append(row.status)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = (
    "Test metrics at the epoch selected on validation (mean ± std over seeds). Δm %: mean "
    "over tasks of the signed relative difference to the single-task baselines of the same "
    "seed (lower is better). ms/step: median wall time of a training step (forward, method "
    "backward, optimizer step), measured interleaved across methods after training (unless "
    "noted); the single-task row gives one single-task model's step. "
    "+ / -: better / worse than EW by more than the spread over seeds (|Δmean| > std + "
    "std_EW); with one seed nothing is marked."
)


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


def results_rows(runs: Sequence[RunResult], selected: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Long-format rows: one per run (method, seed, lr), task and metric; ``selected`` marks
    the runs at the learning rate chosen on validation. Delta m rows have task ``"*"``."""
    chosen = {id(r) for r in selected}
    out = []
    for run in runs:
        base = {
            "method": run.label,
            "seed": run.config["seed"],
            "lr": run.config["lr"],
            "selected": id(run) in chosen,
            "best_epoch": run.best_epoch,
            "status": run.status,
            "step_ms": run.step_ms,
        }
        for task in run.tasks:
            for split, values in (("val", run.val_metrics), ("test", run.test_metrics)):
                if task in values:
                    out.append({**base, "task": task, "split": split, "value": values[task]})
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
    any) and the PNG plots to ``out_dir``. ``setup`` (``{field: text}``, e.g.
    :func:`taskbalance.bench.benchmark.setup_fields`) is what produced the numbers: it leads
    report.md and is kept in results.json.

    Returns ``{kind: path}`` of what was written.
    """
    out = Path(out_dir)
    written: dict[str, Path] = {}
    notes = [*notes, *identical_rows_notes(rows)]
    hib = {t: data.task(t).higher_is_better for t in data.task_names}
    metric_of = {t: data.task(t).metric_name for t in data.task_names}
    records = results_rows(runs, selected)
    for r in records:
        r["metric"] = metric_of[r["task"]]
    baselines = stl_metrics(selected)
    for run in selected:
        seed = run.config["seed"]
        if run.label.startswith("stl:") or seed not in baselines:
            continue
        if set(run.test_metrics) == set(data.task_names) == set(baselines[seed]):
            value = delta_m(run.test_metrics, baselines[seed], hib)
            records.append({"method": run.label, "seed": seed, "lr": run.config["lr"],
                            "selected": True, "best_epoch": run.best_epoch,
                            "status": run.status, "step_ms": run.step_ms, "task": "*",
                            "split": "test", "value": value, "metric": "delta_m_pct"})  # fmt: skip
    fields = ("method", "seed", "lr", "selected", "task", "metric", "split", "value",
              "best_epoch", "status", "step_ms")  # fmt: skip
    written["csv"] = out / "results.csv"
    _write_csv(written["csv"], fields, records)

    table = format_table(data, rows)
    payload = {
        "command": command,
        "setup": dict(setup or {}),
        "dataset": {
            "name": data.name,
            "description": data.description,
            "licence": data.licence,
            "tasks": [
                {
                    "name": t.name,
                    "metric": t.metric_name,
                    "higher_is_better": t.higher_is_better,
                    "unit": t.unit,
                }
                for t in data.tasks
            ],
        },
        "notes": list(notes),
        "table": [_row_dict(r) for r in rows],
        # The diagnostics records go to diagnostics.csv: thousands of rows per run.
        "runs": [{k: v for k, v in r.to_dict().items() if k != "records"} for r in runs],
        "selected": [
            {"method": r.label, "seed": r.config["seed"], "lr": r.config["lr"]} for r in selected
        ],
    }
    written["json"] = out / "results.json"
    _atomic_write(written["json"], json.dumps(payload, indent=1, default=_json_default).encode())

    diagnostics = diagnostics_rows(runs, selected)
    if diagnostics:
        written["diagnostics"] = out / "diagnostics.csv"
        _write_csv(written["diagnostics"], DIAGNOSTICS_COLUMNS, diagnostics)

    plot_paths: dict[str, Path] = {}
    notes = list(notes)
    if plots:
        try:
            plot_paths = write_plots(out, data, selected, rows)
        except ImportError as error:  # matplotlib is an optional extra: results still count
            notes.append(f"plots skipped: {error} (pip install 'taskbalance[bench]')")
        written.update(plot_paths)
    report = [
        f"# taskbalance bench: {data.name}",
        "",
        f"Command: `{command}`",
        "",
        *(f"- {key}: {value}" for key, value in (setup or {}).items()),
        "",
        data.description,
        "",
        table,
        "",
        LEGEND,
        "",
        *(f"- {n}" for n in notes),
        "",
        *(f"![{k}]({p.name})" for k, p in plot_paths.items()),
        "",
    ]
    written["report"] = out / "report.md"
    _atomic_write(written["report"], "\n".join(report).encode())
    return written


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


#: The methods of the three seed papers (IMTL, AdaTask, EMTL), highlighted in the plots.
SEED_METHODS = frozenset({"imtl_l", "imtl_g", "imtl", "emtl", "adatask"})


def _is_seed_method(label: str) -> bool:
    return label.split(":")[0] in SEED_METHODS


def robust_limits(values: Sequence[float], quantile: float = 0.05) -> tuple[float, float] | None:
    """Y-limits that show the bulk of ``values``: from the ``quantile`` to the ``1 - quantile``
    quantile, widened by half that range on each side, so that one diverging early epoch does
    not flatten every other curve. ``None`` when there are no finite values.

    >>> [round(v, 6) for v in robust_limits([1.0, 1.1, 1.2, 1.3, 1.4] * 4 + [1000.0])]
    [0.8, 1.6]
    """
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return None
    k = int(quantile * (len(finite) - 1))
    low, high = finite[k], finite[len(finite) - 1 - k]
    pad = 0.5 * (high - low) or abs(high) * 0.05 or 1.0
    return low - pad, high + pad


def write_plots(
    out_dir: str | os.PathLike[str],
    data: Problem,
    selected: Sequence[RunResult],
    rows: Sequence[Row] = (),
) -> dict[str, Path]:
    """The benchmark's figures as PNGs (matplotlib, Agg backend); returns ``{name: path}``.

    From ``rows`` (the table): ``delta_m`` (each method's Delta m % with its spread over seeds,
    the seed papers' methods highlighted) and, with three tasks or more, ``relative_error`` (a
    heat map of each method's per-task relative error to the single-task baselines). From the
    first seed's runs: validation metric per task vs epoch (one legend beside the panels, robust
    y-limits), the mean task weights per epoch, EMTL's ``r_t`` spread over training (every
    method that recorded it) and AdaTask's AU shares (every ``adatask`` run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 20 distinct colours: QM9 has 11 tasks and the paper protocol 16 methods.
    colors = plt.get_cmap("tab20").colors
    out = Path(out_dir)
    first_seed = min((r.config["seed"] for r in selected), default=0)
    runs = [r for r in selected if r.config["seed"] == first_seed and r.history]
    methods = [r for r in runs if not r.label.startswith("stl:")]
    tasks = data.task_names
    paths: dict[str, Path] = {}
    ranked = [r for r in rows if r.label != STL and r.delta_m.n > 0]
    if ranked:
        paths["delta_m"] = _delta_m_bars(plt, ranked, out / "delta_m.png", data.name)
        if len(tasks) >= 3:
            paths["relative_error"] = _relative_error_map(plt, data, rows, out)

    cols = min(4, len(tasks))
    rows_n = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols + 2.5, 3 * rows_n), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        ax.set_prop_cycle(color=colors)
        shown: list[float] = []
        for run in methods:
            epochs = [h["epoch"] for h in run.history]
            values = [h["val_metric"][task] for h in run.history]
            shown += values
            style = "-" if _is_seed_method(run.label) else ":"
            ax.plot(epochs, values, style, label=run.label, linewidth=1.2)
        for run in runs:
            if run.label == f"stl:{task}":
                epochs = [h["epoch"] for h in run.history]
                values = [h["val_metric"][task] for h in run.history]
                shown += values
                ax.plot(epochs, values, "k--", label="single-task", linewidth=1.5)
        limits = robust_limits(shown)
        if limits is not None:
            ax.set_ylim(*limits)
        ax.set_title(f"{task} ({data.task(task).metric_name}, validation)")
        ax.set_xlabel("epoch")
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / (4 * cols + 2.5), 1))
    paths["validation_curves"] = _save_fig(fig, out / "validation_curves.png")
    plt.close(fig)

    if methods:
        cols = min(4, len(methods))
        rows_n = math.ceil(len(methods) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
        for ax, run in zip(axes.flat, methods, strict=False):
            ax.set_prop_cycle(color=colors)
            epochs = [h["epoch"] for h in run.history]
            for task in tasks:
                ax.plot(epochs, [h["weights"][task] for h in run.history], label=task)
            ax.set_title(f"{run.label}: mean task weight")
            ax.set_xlabel("epoch")
        for ax in list(axes.flat)[len(methods) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.tight_layout()
        paths["task_weights"] = _save_fig(fig, out / "task_weights.png")
        plt.close(fig)

    spread = [(run, _series(run, "r_spread")) for run in methods]
    spread = [(run, series) for run, series in spread if series[0]]
    if spread:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.set_prop_cycle(color=colors)
        for run, (steps, values) in spread:
            ax.plot(steps, values, label=run.label)
        ax.set_title("spread of EMTL's r_t = L_t / ||g_t|| (std / mean over tasks)")
        ax.set_xlabel("training step")
        ax.set_ylabel("r_t spread")
        ax.legend(fontsize=6)
        fig.tight_layout()
        paths["rt_spread"] = _save_fig(fig, out / "rt_spread.png")
        plt.close(fig)

    adatask = [r for r in methods if r.label.split(":")[0] == "adatask"]
    adatask = [r for r in adatask if any(x["metric"] == "au_share" for x in r.records)]
    if adatask:
        fig, axes = plt.subplots(len(adatask), 2, figsize=(12, 4 * len(adatask)), squeeze=False)
        for (bars, lines), run in zip(axes, adatask, strict=True):
            _au_panels(bars, lines, run, tasks, colors)
        fig.tight_layout()
        paths["au_shares"] = _save_fig(fig, out / "au_shares.png")
        plt.close(fig)
    return paths


def _delta_m_bars(plt: Any, rows: Sequence[Row], path: Path, name: str) -> Path:
    """Horizontal bars of Delta m % (mean, error bar = std over seeds), best at the top; the
    seed papers' methods in orange, the others in grey, EW's mean as a dashed line."""
    order = sorted(rows, key=lambda r: r.delta_m.mean)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(order) + 1.4))
    colours = ["tab:orange" if _is_seed_method(r.label) else "tab:gray" for r in order]
    ax.barh(
        [r.label for r in order],
        [r.delta_m.mean for r in order],
        xerr=[r.delta_m.std if r.delta_m.n > 1 else 0.0 for r in order],
        color=colours,
        capsize=3,
    )
    ew = next((r for r in rows if r.label == "ew"), None)
    if ew is not None:
        ax.axvline(ew.delta_m.mean, color="k", linestyle="--", linewidth=1, label="EW")
    ax.axvline(0, color="k", linewidth=0.8)
    ax.invert_yaxis()
    seeds = max(r.delta_m.n for r in rows)
    ax.set_xlabel(f"Δm % vs single-task (lower is better; error bars: std over {seeds} seed(s))")
    ax.set_title(f"{name}: Δm % (orange: IMTL, AdaTask, EMTL)")
    fig.tight_layout()
    saved = _save_fig(fig, path)
    plt.close(fig)
    return saved


def _relative_error_map(plt: Any, data: Problem, rows: Sequence[Row], out: Path) -> Path:
    """Methods x tasks heat map of the signed relative difference (%) of each test metric to
    the single-task baseline's (mean over seeds; positive = worse, as in Delta m)."""
    tasks = data.task_names
    stl = next(r for r in rows if r.label == STL)
    methods = [r for r in rows if r.label != STL]
    sign = {t: -1.0 if data.task(t).higher_is_better else 1.0 for t in tasks}
    values = [
        [
            sign[t] * (r.metrics[t].mean - stl.metrics[t].mean) / stl.metrics[t].mean * 100
            for t in tasks
        ]
        for r in methods
    ]
    finite = [abs(v) for row in values for v in row if math.isfinite(v)]
    limit = (robust_limits(finite) or (0.0, 1.0))[1]
    fig, ax = plt.subplots(figsize=(0.7 * len(tasks) + 2.5, 0.35 * len(methods) + 1.5))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(methods)), [r.label for r in methods])
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if math.isfinite(value):
                text = str(round(value)) if abs(value) >= 10 else f"{value:.1f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label="relative error vs single-task, % (positive = worse)")
    ax.set_title(f"{data.name}: per-task relative error (test, mean over seeds)")
    fig.tight_layout()
    saved = _save_fig(fig, out / "relative_error.png")
    plt.close(fig)
    return saved


def _series(run: RunResult, metric: str, **keys: Any) -> tuple[list[int], list[float]]:
    chosen = [
        r for r in run.records
        if r["metric"] == metric and all(r.get(k) == v for k, v in keys.items())
    ]  # fmt: skip
    return [r["step"] for r in chosen], [r["value"] for r in chosen]


def _au_panels(bars: Any, lines: Any, run: RunResult, tasks: Sequence[str], colors: Any) -> None:
    """Left: each task's AU share of every shared layer at the last sample (stacked bars;
    ``*``: all layers together). Right: each task's share of all layers over training."""
    shares = [r for r in run.records if r["metric"] == "au_share"]
    last = max(r["step"] for r in shares)
    latest = {(r["layer"], r["task"]): r["value"] for r in shares if r["step"] == last}
    layers = list(dict.fromkeys(layer for layer, _ in latest))
    left = [0.0] * len(layers)
    for i, task in enumerate(tasks):
        heights = [latest.get((layer, task), 0.0) for layer in layers]
        bars.barh(layers, heights, left=left, label=task, color=colors[i % len(colors)])
        left = [a + b for a, b in zip(left, heights, strict=True)]
    bars.set_xlim(0, 1)
    bars.invert_yaxis()
    bars.set_title(f"{run.label}: AU share per shared layer (step {last})")
    for i, task in enumerate(tasks):
        steps, values = _series(run, "au_share", layer="*", task=task)
        lines.plot(steps, values, label=task, color=colors[i % len(colors)])
    lines.set_title(f"{run.label}: AU share of all shared layers")
    lines.set_xlabel("training step")
    lines.legend(fontsize=6, ncol=2)


def _save_fig(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    _atomic_write(path, buffer.getvalue())
    return path
