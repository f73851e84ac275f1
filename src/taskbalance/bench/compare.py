"""Delta m of two benchmark runs side by side: the table of the x10 loss-scale experiment.

The IMTL paper's robustness test trains every method twice, once as is and once with one
task's loss multiplied by a factor, and asks whose result moves. :func:`compare_delta_m` reads
the two runs' ``results.json`` (written by ``taskbalance bench``) and lists, per method present
in both, the Delta m % of each (mean ± std over seeds), the change of the mean, and whether that
change exceeds the sum of the two standard deviations (``beyond spread``:
:meth:`~taskbalance.bench.report.Cell.beyond_spread`, the rule of the benchmark table's ``+`` /
``-`` marks). ``taskbalance compare BASE OTHER`` prints it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from taskbalance.bench.report import Cell


def load_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A benchmark's ``results.json`` (or that of the folder holding it), parsed.

    Raises ``FileNotFoundError`` naming the path, and ``ValueError`` when the file has no table
    (not a ``taskbalance bench`` result).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"no benchmark result at {path} (expected a results.json)")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "table" not in data:
        raise ValueError(f"{path} is not a taskbalance bench results.json (no 'table')")
    return data


def table_rows(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The table rows of a loaded result (:func:`load_result`), by method label.

    >>> table_rows({"table": [{"method": "ew", "delta_m": {}}]})
    {'ew': {'method': 'ew', 'delta_m': {}}}
    """
    return {row["method"]: row for row in result["table"]}


#: The setup fields that must agree for two runs' Delta m to be comparable.
COMPARABLE = ("data", "protocol", "rows (train / val / test)", "epochs", "batch size")


def differences(
    base: Mapping[str, Any], other: Mapping[str, Any], names: Sequence[str] = ("as is", "other")
) -> list[str]:
    """Lines that say what :func:`compare_delta_m` leaves out or puts side by side unequally:
    the methods in one result only, and every field of :data:`COMPARABLE` whose setup differs
    (``base`` and ``other`` as :func:`load_result` returns them).

    >>> a = {"setup": {"epochs": "2"}, "table": [{"method": "ew"}, {"method": "imtl"}]}
    >>> b = {"setup": {"epochs": "12"}, "table": [{"method": "ew"}, {"method": "famo"}]}
    >>> for line in differences(a, b, ("A", "B")): print(line)
    methods only in A (not compared): imtl
    methods only in B (not compared): famo
    warning: epochs differ: 2 (A) vs 12 (B)
    """
    labels = [
        [r["method"] for r in x["table"] if r["method"] != "single-task"] for x in (base, other)
    ]
    lines = []
    for mine, theirs, name in ((labels[0], labels[1], names[0]), (labels[1], labels[0], names[1])):
        alone = [label for label in mine if label not in theirs]
        if alone:
            lines.append(f"methods only in {name} (not compared): {', '.join(alone)}")
    setups = [x.get("setup", {}) for x in (base, other)]
    for key in COMPARABLE:
        a, b = (setup.get(key, "?") for setup in setups)
        if a != b:
            lines.append(f"warning: {key} differ: {a} ({names[0]}) vs {b} ({names[1]})")
    return lines


def _cell(delta: Mapping[str, Any]) -> Cell:
    # A diverged row's mean and std may be stored as null (or NaN).
    def number(key: str) -> float:
        value = delta.get(key)
        return math.nan if value is None else float(value)

    return Cell(number("mean"), number("std"), int(delta.get("n") or 0))


def compare_delta_m(
    base: Mapping[str, Mapping[str, Any]],
    other: Mapping[str, Mapping[str, Any]],
    names: Sequence[str] = ("as is", "other"),
) -> str:
    """A Markdown table of Delta m % per method in both ``base`` and ``other`` (rows as
    :func:`table_rows` returns them), in ``base``'s order, without the single-task row.

    >>> def row(mean, std):
    ...     return {"delta_m": {"mean": mean, "std": std, "n": 3}}
    >>> print(compare_delta_m({"ew": row(60.0, 5.0), "imtl": row(20.0, 4.0)},
    ...                       {"ew": row(100.0, 6.0), "imtl": row(22.0, 3.0)}, ("as is", "x10")))
    | method | Δm %, as is | Δm %, x10 | change of the mean | beyond spread |
    |---|---|---|---|---|
    | ew | 60 ± 5 | 100 ± 6 | +40.0 | yes |
    | imtl | 20 ± 4 | 22 ± 3 | +2.0 | no |
    """
    lines = [
        f"| method | Δm %, {names[0]} | Δm %, {names[1]} | change of the mean | beyond spread |",
        "|---|---|---|---|---|",
    ]
    for label, row in base.items():
        if label == "single-task" or label not in other:
            continue
        a, b = _cell(row["delta_m"]), _cell(other[label]["delta_m"])
        change = (
            f"{b.mean - a.mean:+.1f}" if a.n and b.n and math.isfinite(a.mean + b.mean) else "-"
        )
        beyond = {True: "yes", False: "no", None: "-"}[a.beyond_spread(b)]
        lines.append(f"| {label} | {a.text(3)} | {b.text(3)} | {change} | {beyond} |")
    return "\n".join(lines)
