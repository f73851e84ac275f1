"""The same ``taskbalance bench`` command, run twice in fresh processes, writes the same results:
the first run computes QM9's descriptors into an empty cache, the second reads them back."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.qm9_files import molecules, wheel

FRESH = Path(__file__).parents[1] / "support" / "bench_fresh.py"
#: The fields that hold wall-clock measurements: the only ones allowed to differ.
TIMING = {"step_ms", "time_ratio", "train_seconds", "wall time"}
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
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("repro")
    archive = root / "qm9.whl"
    archive.write_bytes(wheel(molecules(100, seed=0)))
    env = {**os.environ, "PYTHONPATH": str(FRESH.parents[1])}
    outs = []
    for name in ("first", "second"):
        out = root / name
        command = [sys.executable, str(FRESH), str(archive), str(root / "cache"), "--", *ARGS]
        done = subprocess.run(
            [*command, "--out", str(out)], env=env, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append(out)
    return outs[0], outs[1]


def test_the_second_run_read_the_descriptor_cache(two_runs):
    first, _ = two_runs
    assert len(list(first.parent.glob("cache/qm9_descriptors_v1_*.npz"))) == 1


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


def test_the_report_states_what_produced_it(two_runs):
    setup = json.loads((two_runs[0] / "results.json").read_text())["setup"]
    assert setup["rows (train / val / test)"] == "60 / 20 / 20"
    assert setup["protocol"] == "quick" and setup["epochs"] == "2" and setup["seeds"] == "0, 1"
    assert setup["learning rates"].startswith("0.003, 0.001 on seed(s) [0]")
    assert setup["threads"] == "1" and setup["torch"] and setup["taskbalance"]
    assert "loss scale" not in setup and "processes" not in setup  # nothing to say: left out
    report = (two_runs[0] / "report.md").read_text()
    assert "- rows (train / val / test): 60 / 20 / 20" in report
    assert "- threads: 1" in report and ": \n" not in report and "{}" not in report
