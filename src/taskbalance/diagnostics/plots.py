"""Plots of a :class:`~taskbalance.diagnostics.Recorder` (matplotlib, from the ``bench`` extra).

One figure, four panels: the total weights over time, the spread of EMTL's ``r_t``, AdaTask's
AU shares per layer (the latest sample), and the conflict rate. A panel whose metric was not
recorded says so instead of failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskbalance.diagnostics.recorder import Recorder


def plot_recorder(recorder: Recorder, path: str | Path | None = None) -> Any:
    """Draw the recorder's weights, ``r`` spread, AU shares and conflict rate.

    Args:
        recorder: a filled recorder.
        path: where to save the figure (any format matplotlib knows); ``None``: do not save.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'taskbalance[bench]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "plot_recorder needs matplotlib: pip install 'taskbalance[bench]'"
        ) from error
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    weights, spread, shares, conflict = axes.flatten()

    tasks = list(dict.fromkeys(r["task"] for r in recorder.records("weight")))
    for task in tasks:
        weights.plot(*recorder.series("weight", task=task), label=task)
    _finish(weights, "total weight a_t w_t", bool(tasks), legend=True)

    steps, values = recorder.series("r_spread")
    spread.plot(steps, values)
    _finish(spread, "r spread (std / mean)", bool(steps))

    records = recorder.records("au_share")
    if records:
        last = max(r["step"] for r in records)
        latest = [r for r in records if r["step"] == last]
        layers = list(dict.fromkeys(r["layer"] for r in latest))
        au_tasks = list(dict.fromkeys(r["task"] for r in latest))
        bottom = [0.0] * len(layers)
        for task in au_tasks:
            heights = [
                next((r["value"] for r in latest if r["layer"] == layer and r["task"] == task), 0.0)
                for layer in layers
            ]
            shares.barh(layers, heights, left=bottom, label=task)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    _finish(shares, "AU share per layer (latest)", bool(records), legend=True)

    steps, values = recorder.series("conflict_rate")
    conflict.plot(steps, values)
    _finish(conflict, "share of conflicting pairs", bool(steps))

    if path is not None:
        figure.savefig(path)
    return figure


def _finish(axis: Any, title: str, has_data: bool, legend: bool = False) -> None:
    axis.set_title(title)
    if not has_data:
        axis.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axis.transAxes)
    elif legend:
        axis.legend(fontsize="small")
