"""The same ``taskbalance bench`` command, run twice in fresh processes, writes the same results:
the first run computes QM9's descriptors into an empty cache, the second reads them back. A third
run trains the same plan two runs at a time (``--jobs 2``) and writes the same results too."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.qm9_files import molecules, wheel

FRESH = Path(__file__).parents[1] / "support" / "bench_fresh.py"
#: The fields that hold wall-clock measurements: the only ones allowed to differ.
TIMING = {"step_ms", "time_ratio", "train_seconds", "wall time", "parallel runs"}
ARGS = ["bench", "--dataset", "qm9", "--epochs", "2", "--batch-size", "16", "--seeds", "2",
        "--lr-grid", "3e-3,1e-3", "--grid-seeds", "1", "--methods", "ew", "imtl_g", "emtl",
        "adatask", "famo", "pcgrad:level=feature", "--timing-rounds", "1", "--record-every",
        "2", "--no-progress"]  # fmt: skip


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [without_timing(row) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repro")
    archive = root / "qm9.whl"
    archive.write_bytes(wheel(molecules(100, seed=0)))
    env = {**os.environ, "PYTHONPATH": str(FRESH.parents[1])}
    outs = {}
    for name, extra in (("first", []), ("second", []), ("parallel", ["--jobs", "2"])):
        out = root / name
        command = [sys.executable, str(FRESH), str(archive), str(root / "cache"), "--", *ARGS]
        done = subprocess.run(
            [*command, *extra, "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        outs[name] = out
    return outs


@pytest.fixture(params=["second", "parallel"])
def two_runs(request, runs) -> tuple[Path, Path]:
    """The first run and one that must match it: the same command again, or with ``--jobs 2``."""
    return runs["first"], runs[request.param]


def test_the_second_run_read_the_descriptor_cache(runs):
    assert len(list(runs["first"].parent.glob("cache/qm9_descriptors_v1_*.npz"))) == 1


@pytest.mark.parametrize("name", ["results.csv", "diagnostics.csv"])
def test_csv_results_are_identical_but_for_timing(two_runs, name):
    first, second = (csv_rows(out / name) for out in two_runs)
    assert len(first) > 20 and first == second


def test_results_json_is_identical_but_for_timing(two_runs):
    first, second = (json.loads((out / "results.json").read_text()) for out in two_runs)
    assert first["command"] != second["command"]  # each names its own --out ...
    for payload in (first, second):
        payload.pop("command")
    assert without_timing(first) == without_timing(second)
    assert {run["label"] for run in first["runs"]} >= {"ew", "emtl", "stl:mu"}


def test_every_plot_is_byte_identical(two_runs):
    first, second = two_runs
    names = sorted(p.name for p in first.glob("*.png"))
    assert "validation_curves.png" in names
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)


def test_parallel_workers_log_every_line_of_the_serial_run(runs):
    # The workers and the parent append to one train.log: none may overwrite another's lines.
    def lines(out: Path) -> list[str]:
        text = (out / "train.log").read_text()
        return sorted(re.sub(r"[\d.]+ ms/step", "ms/step", line) for line in text.splitlines())

    serial, parallel = lines(runs["first"]), lines(runs["parallel"])
    # 11 tasks and 6 methods: the grid of 2 lrs on seed 0, then seed 1 at the chosen lr
    assert sum("best epoch" in line for line in serial) == 11 * 2 + 11 + 6 * 2 + 6
    assert parallel == serial
    setup = json.loads((runs["parallel"] / "results.json").read_text())["setup"]
    assert setup["parallel runs"].startswith("2 at a time")


def test_the_report_states_what_produced_it(runs):
    setup = json.loads((runs["first"] / "results.json").read_text())["setup"]
    assert setup["rows (train / val / test)"] == "60 / 20 / 20"
    assert setup["protocol"] == "quick" and setup["epochs"] == "2" and setup["seeds"] == "0, 1"
    assert setup["learning rates"].startswith("0.003, 0.001 on seed(s) [0]")
    assert setup["threads"] == "1" and setup["torch"] and setup["taskbalance"]
    assert {"loss scale", "processes", "parallel runs"}.isdisjoint(setup)  # nothing to say
    report = (runs["first"] / "report.md").read_text()
    assert "- rows (train / val / test): 60 / 20 / 20" in report
    assert "- threads: 1" in report and ": \n" not in report and "{}" not in report
