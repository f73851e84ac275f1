"""Copy a long benchmark's finished runs into a folder small enough to commit, so that the
benchmark can continue with ``--resume`` on another machine.

A paper-scale benchmark takes longer than a machine lives here, and ``--resume`` reads each
finished run back from ``<out>/checkpoints/<run>.pt``. Such a checkpoint holds the run's result
and its sampled diagnostics records (about 50,000 on a QM9 run: 1-3 MB), which only
``diagnostics.csv`` uses in full. The copies keep the result and the records the plots draw:
EMTL's ``r_t`` spread (every sample) and AdaTask's AU shares (every layer at the last sample,
all layers together every 100 steps): 10-60 KB per run. A benchmark resumed from the copies
writes the same table, ``results.csv``, ``results.json``, report and plots (the AU curves
sampled more coarsely); its ``diagnostics.csv`` holds only the kept records.

Runs still training are not copied (their checkpoint holds the model). A copy that exists is
left alone, so the command can be repeated as runs finish.

Usage (OUT: the benchmark's ``--out``; DEST: where the copies go)::

    python benchmarks/keep_finished_runs.py OUT DEST
    python benchmarks/keep_finished_runs.py ~/tb-runs/paper/qm9 \
        benchmarks/results/paper/qm9/checkpoints

To continue elsewhere: copy the folder's files into ``<out>/checkpoints/`` and run the
benchmark's command with ``--resume``.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import torch

#: The record metrics the benchmark's plots draw (taskbalance.bench.report.write_plots).
PLOTTED = ("r_spread", "au_share")
#: AU shares of all layers together are kept at steps divisible by this.
AU_EVERY = 100


def plotted_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records the plots draw, thinned: every ``r_spread``; ``au_share`` of every layer at
    the last sampled step and of all layers (``"*"``) every :data:`AU_EVERY` steps.

    >>> rs = [{"step": s, "metric": m, "layer": l, "value": 0.0}
    ...       for s in (0, 20, 100, 120) for m in ("loss", "r_spread", "au_share")
    ...       for l in ("*", "trunk.0")]
    >>> for kept in sorted({(r["metric"], r["step"], r["layer"]) for r in plotted_records(rs)}):
    ...     print(kept)
    ('au_share', 0, '*')
    ('au_share', 100, '*')
    ('au_share', 120, '*')
    ('au_share', 120, 'trunk.0')
    ('r_spread', 0, '*')
    ('r_spread', 0, 'trunk.0')
    ('r_spread', 20, '*')
    ('r_spread', 20, 'trunk.0')
    ('r_spread', 100, '*')
    ('r_spread', 100, 'trunk.0')
    ('r_spread', 120, '*')
    ('r_spread', 120, 'trunk.0')
    """
    shares = [r for r in records if r["metric"] == "au_share"]
    last = max((r["step"] for r in shares), default=None)
    kept = []
    for record in records:
        if record["metric"] == "r_spread" or (
            record["metric"] == "au_share"
            and (
                record["step"] == last
                or (record["layer"] == "*" and record["step"] % AU_EVERY == 0)
            )
        ):
            kept.append(record)
    return kept


def keep(source: Path, destination: Path) -> tuple[int, int]:
    """Copy the finished runs of ``source`` (a checkpoints folder) into ``destination``, their
    records thinned by :func:`plotted_records`; returns (copied now, finished runs kept)."""
    destination.mkdir(parents=True, exist_ok=True)
    copied = 0
    for path in sorted(source.glob("*.pt")):
        target = destination / path.name
        if target.exists():
            continue
        state = torch.load(path, weights_only=True)
        if "model" in state or state.get("result") is None:  # still training
            continue
        state["result"] = {
            **state["result"], "records": plotted_records(state["result"]["records"])
        }  # fmt: skip
        buffer = io.BytesIO()
        torch.save(state, buffer)
        target.write_bytes(buffer.getvalue())
        copied += 1
    return copied, len(list(destination.glob("*.pt")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the benchmark's --out folder")
    parser.add_argument("destination", type=Path, help="where the copies go")
    args = parser.parse_args()
    source = args.out / "checkpoints"
    if not source.is_dir():
        raise SystemExit(f"keep_finished_runs: {source} does not exist (is {args.out} a --out?)")
    copied, total = keep(source, args.destination)
    print(f"{copied} copied; {total} finished runs in {args.destination}")


if __name__ == "__main__":
    main()
