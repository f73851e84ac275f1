"""The benchmark's figures (PNG, matplotlib's Agg backend), drawn by :func:`write_plots`.

* ``delta_m.png``: each method's Delta m % (bars, best at the top, the value at each bar's end,
  error bars for the std over seeds when there are several), the seed papers' methods in orange;
  a legend names the colours, the single-task line (0) and EW's dashed line.
* ``relative_error.png`` (three tasks or more): a methods x tasks heat map of each test metric's
  signed relative difference to the single-task baseline (positive = worse), each cell written
  in black or white after its colour's luminance, so that dark cells stay readable.
* ``validation_curves.png``: one panel per task, the validation metric per epoch; EW and the
  seed papers' methods in colour, the other methods thin and grey, the single-task run dashed
  black; y-limits robust to a diverging epoch (:func:`robust_limits`); one legend beside them.
* ``task_weights.png``: each method's mean task weights per epoch.
* ``rt_spread.png``: the spread of EMTL's ``r_t`` over training, every method that recorded it.
* ``au_shares.png``: AdaTask's AU shares per shared layer and over training.

The curves come from the first seed's runs; the bars and the map from the table's rows.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taskbalance.bench.checkpoints import atomic_write
from taskbalance.bench.problem import Problem
from taskbalance.bench.report import STL, Row
from taskbalance.bench.run_config import RunResult

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


def text_colour(rgba: Sequence[float]) -> str:
    """``"white"`` on a dark colour, ``"black"`` on a light one: whichever contrasts more with
    it, by WCAG's contrast ratio ``(L1 + 0.05) / (L2 + 0.05)`` of relative luminances (sRGB
    weights 0.2126, 0.7152, 0.0722 on the linearised channels).

    >>> text_colour((0.4, 0.0, 0.12, 1.0)), text_colour((0.97, 0.97, 0.97, 1.0))
    ('white', 'black')
    """

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "white" if 1.05 / (luminance + 0.05) > (luminance + 0.05) / 0.05 else "black"


def cell_text(value: float) -> str:
    """A heat map cell's number: whole from 10 on, one decimal below, never ``-0.0``.

    >>> cell_text(123.4), cell_text(-5.55), cell_text(-0.04)
    ('123', '-5.5', '0.0')
    """
    return f"{value:.0f}" if abs(value) >= 10 else f"{round(value, 1) or 0.0:.1f}"


def write_plots(
    out_dir: str | os.PathLike[str],
    data: Problem,
    selected: Sequence[RunResult],
    rows: Sequence[Row] = (),
) -> dict[str, Path]:
    """Draw the figures of the module docstring into ``out_dir`` from ``rows`` (the table) and
    the ``selected`` runs; returns ``{name: path}`` of those drawn (a figure with nothing to
    show is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    first_seed = min((r.config["seed"] for r in selected), default=0)
    runs = [r for r in selected if r.config["seed"] == first_seed and r.history]
    methods = [r for r in runs if not r.label.startswith("stl:")]
    figures = {"validation_curves": _validation_curves(plt, data, runs, first_seed)}
    ranked = [r for r in rows if r.label != STL and r.delta_m.n > 0]
    if ranked:
        figures["delta_m"] = _delta_m_bars(plt, ranked, data.name)
        if len(data.metric_keys) >= 3:
            figures["relative_error"] = _relative_error_map(plt, data, rows)
    if methods:
        figures["task_weights"] = _task_weights(plt, data.task_names, methods)
    spread = [(run, _series(run, "r_spread")) for run in methods]
    spread = [(run, series) for run, series in spread if series[0]]
    if spread:
        figures["rt_spread"] = _rt_spread(plt, spread)
    adatask = [r for r in methods if r.label.split(":")[0] == "adatask"]
    adatask = [r for r in adatask if any(x["metric"] == "au_share" for x in r.records)]
    if adatask:
        figures["au_shares"] = _au_shares(plt, data.task_names, adatask)
    order = ("delta_m", "relative_error", "validation_curves", "task_weights", "rt_spread",
             "au_shares")  # fmt: skip
    paths = {}
    for name in sorted(figures, key=order.index):
        paths[name] = _save_fig(figures[name], out / f"{name}.png")
        plt.close(figures[name])
    return paths


def _delta_m_bars(plt: Any, rows: Sequence[Row], name: str) -> Any:
    """Horizontal bars of Delta m % (mean, with the std over seeds as error bars when there are
    several seeds), best at the top, each bar's value at its end."""
    from matplotlib.patches import Patch

    order = sorted(rows, key=lambda r: r.delta_m.mean)
    seeds = max(r.delta_m.n for r in rows)
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(order) + 2.0), layout="constrained")
    colours = ["tab:orange" if _is_seed_method(r.label) else "tab:gray" for r in order]
    bars = ax.barh(
        [r.label for r in order],
        [r.delta_m.mean for r in order],
        xerr=[r.delta_m.std for r in order] if seeds > 1 else None,
        color=colours,
        capsize=3,
    )
    ax.bar_label(bars, fmt="%.3g", padding=4, fontsize=8)
    ax.margins(x=0.15)
    handles = [Patch(color="tab:orange", label="IMTL, AdaTask, EMTL (the seed papers)"),
               Patch(color="tab:gray", label="other methods"),
               ax.axvline(0, color="k", linewidth=0.8, label="single-task (0)")]  # fmt: skip
    ew = next((r for r in rows if r.label == "ew"), None)
    if ew is not None:
        handles.append(ax.axvline(ew.delta_m.mean, color="k", linestyle="--", linewidth=1,
                                  label=f"EW ({ew.delta_m.mean:.3g})"))  # fmt: skip
    ax.invert_yaxis()
    spread = f"error bars: std over {seeds} seeds" if seeds > 1 else "one seed, so no spread"
    ax.set_xlabel(f"Δm % vs single-task (lower is better; {spread})")
    ax.set_title(f"{name}: Δm % per method")
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def _relative_error_map(plt: Any, data: Problem, rows: Sequence[Row]) -> Any:
    """Methods x tasks heat map of the signed relative difference (%) of each test metric to
    the single-task baseline's (mean over seeds; positive = worse, as in Delta m)."""
    tasks = data.metric_keys
    stl = next(r for r in rows if r.label == STL)
    methods = [r for r in rows if r.label != STL]
    sign = {t: -1.0 if higher else 1.0 for t, higher in data.directions.items()}
    values = [
        [
            sign[t] * (r.metrics[t].mean - stl.metrics[t].mean) / stl.metrics[t].mean * 100
            for t in tasks
        ]
        for r in methods
    ]
    finite = [abs(v) for row in values for v in row if math.isfinite(v)]
    limit = (robust_limits(finite) or (0.0, 1.0))[1]
    size = (max(6.0, 0.75 * len(tasks) + 3.0), 0.38 * len(methods) + 1.8)
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(methods)), [r.label for r in methods])
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if math.isfinite(value):
                colour = text_colour(image.cmap(image.norm(value)))
                ax.text(j, i, cell_text(value), ha="center", va="center", fontsize=8,
                        color=colour)  # fmt: skip
    fig.colorbar(image, ax=ax, label="% vs single-task (positive = worse)")
    ax.set_title(f"{data.name}: relative test error per task\n(mean over seeds)", fontsize=11)
    return fig


def _curve(run: RunResult, key: str, task: str) -> tuple[list[int], list[float]]:
    """``run``'s per-epoch ``history[key][task]``: epochs and values."""
    return [h["epoch"] for h in run.history], [h[key][task] for h in run.history]


def _epochs_axis(ax: Any) -> None:
    """Label the x axis "epoch", with whole-number ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _panels(plt: Any, count: int, width: float, height: float) -> tuple[Any, list[Any]]:
    """A figure of ``count`` panels, at most 4 a row, the unused ones hidden."""
    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 2.5, height * rows),
                             squeeze=False, layout="constrained")  # fmt: skip
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, list(axes.flat)[:count]


def _validation_curves(plt: Any, data: Problem, runs: Sequence[RunResult], seed: int) -> Any:
    """Validation metric per task vs epoch (the runs of ``seed``): EW and the seed papers'
    methods in colour, the others thin and grey, the single-task run dashed black."""
    methods = [r for r in runs if not r.label.startswith("stl:")]
    shown = [r for r in methods if _is_seed_method(r.label) or r.label == "ew"]
    colour = {r.label: plt.get_cmap("tab10").colors[i % 10] for i, r in enumerate(shown)}
    fig, axes = _panels(plt, len(data.metric_keys), 4.0, 3.0)
    legend: dict[str, Any] = {}
    for ax, key in zip(axes, data.metric_keys, strict=True):
        task = data.metric_task(key)
        values: list[float] = []
        for run in sorted(methods, key=lambda r: r.label in colour):  # highlighted ones on top
            epochs, curve = _curve(run, "val_metric", key)
            values += curve
            if run.label in colour:
                ax.plot(epochs, curve, color=colour[run.label], linewidth=1.8, label=run.label)
            else:
                ax.plot(epochs, curve, color="0.72", linewidth=0.9, label="other methods")
        for run in runs:
            if run.label == f"stl:{task.name}":
                epochs, curve = _curve(run, "val_metric", key)
                values += curve
                ax.plot(epochs, curve, "k--", linewidth=1.5, label="single-task")
        limits = robust_limits(values)
        if limits is not None:
            ax.set_ylim(*limits)
        ax.set_title(f"{task.name} ({task.metric_of(key)}, validation)")
        _epochs_axis(ax)
        legend.update(zip(ax.get_legend_handles_labels()[1], ax.get_legend_handles_labels()[0],
                          strict=True))  # fmt: skip
    first = [*colour, "other methods", "single-task"]
    labels = sorted(legend, key=lambda label: first.index(label) if label in first else 99)
    fig.legend([legend[k] for k in labels], labels, loc="outside right center", fontsize=10,
               frameon=False)  # fmt: skip
    fig.suptitle(f"{data.name}: validation metric per epoch (seed {seed})")
    return fig


def _task_weights(plt: Any, tasks: Sequence[str], methods: Sequence[RunResult]) -> Any:
    """Each method's mean task weights per epoch, one panel per method."""
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: QM9 has 11 tasks
    fig, axes = _panels(plt, len(methods), 4.0, 3.0)
    for ax, run in zip(axes, methods, strict=True):
        ax.set_prop_cycle(color=colours)
        for task in tasks:
            ax.plot(*_curve(run, "weights", task), label=task)
        ax.set_title(f"{run.label}: mean task weight")
        _epochs_axis(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=9, frameon=False)
    return fig


def _rt_spread(plt: Any, spread: Sequence[tuple[RunResult, tuple[list, list]]]) -> Any:
    """The spread of EMTL's ``r_t`` over training, one line per method that recorded it."""
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for run, (steps, values) in spread:
        ax.plot(steps, values, label=run.label)
    ax.set_title("spread of EMTL's r_t = L_t / ||g_t|| (std / mean over tasks)")
    ax.set_xlabel("training step")
    ax.set_ylabel("r_t spread")
    ax.legend(fontsize=8)
    return fig


def _series(run: RunResult, metric: str, **keys: Any) -> tuple[list[int], list[float]]:
    chosen = [
        r for r in run.records
        if r["metric"] == metric and all(r.get(k) == v for k, v in keys.items())
    ]  # fmt: skip
    return [r["step"] for r in chosen], [r["value"] for r in chosen]


def _au_shares(plt: Any, tasks: Sequence[str], runs: Sequence[RunResult]) -> Any:
    """Per AdaTask run, its AU shares: per shared layer at the last sample, and over training."""
    colours = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 4 * len(runs)), squeeze=False,
                             layout="constrained")  # fmt: skip
    for (bars, lines), run in zip(axes, runs, strict=True):
        _au_panels(bars, lines, run, tasks, colours)
    return fig


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
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path
