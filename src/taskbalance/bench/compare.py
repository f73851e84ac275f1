"""Delta m of two benchmark runs side by side: the table of the x10 loss-scale experiment.

The IMTL paper's robustness test trains every method twice, once as is and once with one
task's loss multiplied by a factor, and asks whose result moves. :func:`compare_delta_m` reads
the two runs' ``results.json`` (written by ``taskbalance bench``) and lists, per method present
in both, the Delta m % of each (mean ± std over seeds), the change of the mean, and whether that
change exceeds the sum of the two standard deviations (``beyond spread``: the same rule as the
benchmark table's ``+`` / ``-`` marks). ``taskbalance compare BASE OTHER`` prints it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def load_rows(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The table rows of a benchmark's ``results.json`` (or of the folder holding it), by
    method label.

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
    return {row["method"]: row for row in data["table"]}


def _cell(delta: Mapping[str, Any]) -> str:
    mean, std, n = delta.get("mean"), delta.get("std"), delta.get("n", 0)
    if not n or mean is None or not math.isfinite(mean):
        return "-"
    return f"{mean:.3g} ± {std:.3g}" if n > 1 else f"{mean:.3g}"


def compare_delta_m(
    base: Mapping[str, Mapping[str, Any]],
    other: Mapping[str, Mapping[str, Any]],
    names: Sequence[str] = ("as is", "other"),
) -> str:
    """A Markdown table of Delta m % per method in both ``base`` and ``other`` (rows as
    :func:`load_rows` returns them), in ``base``'s order, without the single-task row.

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
        a, b = row["delta_m"], other[label]["delta_m"]
        change, beyond = "-", "-"
        if all(x.get("n") and x.get("mean") is not None for x in (a, b)):
            diff = b["mean"] - a["mean"]
            change = f"{diff:+.1f}"
            if a["n"] > 1 and b["n"] > 1:
                beyond = "yes" if abs(diff) > a["std"] + b["std"] else "no"
        lines.append(f"| {label} | {_cell(a)} | {_cell(b)} | {change} | {beyond} |")
    return "\n".join(lines)
