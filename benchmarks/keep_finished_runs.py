"""Copy a long benchmark's finished runs into a folder small enough to commit, so that the
benchmark can continue with ``--resume`` on another machine.

A paper-scale benchmark takes longer than a machine lives here, and ``--resume`` reads each
finished run back from ``<out>/checkpoints/<run>.pt``. Such a checkpoint holds the run's result
and its sampled diagnostics records (about 50,000 on a QM9 run: 1-3 MB), which only
``diagnostics.csv`` uses in full. The copies keep the result and the records the plots draw:
EMTL's ``r_t`` spread (every sample) and AdaTask's AU shares (every layer at the last sample,
all layers together at every 5th sample): 10-75 KB per run. A benchmark resumed from the copies
writes the same table, ``results.csv``, ``results.json``, report and plots (the AU curves
sampled more coarsely); its ``diagnostics.csv`` holds only the kept records.

Runs still training are not copied; a finished run's copy drops the model that
``--keep-checkpoints`` keeps. A copy that exists is left alone (copies are written as the
runner writes checkpoints: under a temporary name, then renamed), so the command can be
repeated as runs finish.

Usage (OUT: the benchmark's ``--out``; DEST: where the copies go)::

    python benchmarks/keep_finished_runs.py OUT DEST
    python benchmarks/keep_finished_runs.py ~/tb-runs/paper/qm9 \\
        benchmarks/results/paper/qm9/checkpoints

To continue elsewhere: copy the folder's files into ``<out>/checkpoints/`` and run the
benchmark's command with ``--resume``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from taskbalance.bench.checkpoints import FINISHED_STATE, save_checkpoint

#: AU shares of all layers together are kept at every this many-th sampled step.
AU_EVERY = 5


def plotted_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records the plots draw (:func:`taskbalance.bench.plots.write_plots`), thinned: every
    ``r_spread``; ``au_share`` of every layer at the last sampled step and of all layers
    (``"*"``) at every :data:`AU_EVERY`-th sampled step.

    >>> rs = [{"step": s, "metric": m, "layer": l, "value": 0.0}
    ...       for s in (0, 20, 40, 60, 80, 100, 120) for m in ("loss", "r_spread", "au_share")
    ...       for l in ("*", "trunk.0") if m != "r_spread" or l == "*"]
    >>> for kept in sorted({(r["metric"], r["step"], r["layer"]) for r in plotted_records(rs)}):
    ...     print(kept)
    ('au_share', 0, '*')
    ('au_share', 100, '*')
    ('au_share', 120, '*')
    ('au_share', 120, 'trunk.0')
    ('r_spread', 0, '*')
    ('r_spread', 20, '*')
    ('r_spread', 40, '*')
    ('r_spread', 60, '*')
    ('r_spread', 80, '*')
    ('r_spread', 100, '*')
    ('r_spread', 120, '*')
    """
    steps = sorted({r["step"] for r in records if r["metric"] == "au_share"})
    every = set(steps[::AU_EVERY])

    def drawn(record: dict[str, Any]) -> bool:
        if record["metric"] == "au_share":
            return record["step"] == steps[-1] or (
                record["layer"] == "*" and record["step"] in every
            )
        return record["metric"] == "r_spread"

    return [record for record in records if drawn(record)]


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
        if state.get("result") is None:  # still training
            continue
        # Without the model (kept by --keep-checkpoints), as a finished run's checkpoint.
        kept = {key: state[key] for key in FINISHED_STATE}
        kept["result"] = {**kept["result"], "records": plotted_records(kept["result"]["records"])}
        save_checkpoint(kept, target)
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
