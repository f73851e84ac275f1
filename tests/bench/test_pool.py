"""Training a stage's runs in worker processes: the serial results, in order, and errors raised
in the parent with their own type."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support.datasets import tiny
from taskbalance.bench.benchmark import BenchConfig
from taskbalance.bench.method_specs import MethodSpec
from taskbalance.bench.pool import train_in_workers
from taskbalance.bench.run_config import RunConfig
from taskbalance.bench.runner import Runner

SMALL = {"hidden": 16, "tower": 8}

TIMING = {"step_ms", "train_seconds"}


def comparable(result) -> dict:
    payload = {k: v for k, v in result.to_dict().items() if k not in TIMING}
    payload["history"] = [
        {k: v for k, v in epoch.items() if k not in TIMING} for epoch in payload["history"]
    ]
    return payload


def configs() -> list[RunConfig]:
    common = {"epochs": 2, "batch_size": 16, "model_options": SMALL}
    return [
        RunConfig(method=MethodSpec("imtl_g"), seed=0, **common),
        RunConfig(tasks=("b",), seed=1, **common),
        RunConfig(method=MethodSpec("famo"), seed=2, **common),
    ]


def test_workers_return_the_serial_results_in_order(tmp_path):
    data = tiny()
    torch.set_num_threads(1)
    serial = [Runner(data, c, progress=False).run() for c in configs()]
    seen = []
    runs = [(c, tmp_path / f"{i}.pt") for i, c in enumerate(configs())]
    parallel = train_in_workers(
        data, runs, jobs=2, threads=1, log_path=tmp_path / "train.log",
        on_done=lambda config, result: seen.append((config.label, result.label)),
    )  # fmt: skip
    assert [comparable(r) for r in parallel] == [comparable(r) for r in serial]
    assert sorted(seen) == sorted((c.label, c.label) for c in configs())
    assert all(path.exists() for _, path in runs)  # each worker wrote its run's checkpoint
    log = (tmp_path / "train.log").read_text()
    assert {"imtl_g seed 0", "stl:b seed 1", "famo seed 2"} <= {
        line.split(" lr ")[0] for line in log.splitlines()
    }


def test_a_failing_run_raises_its_own_error_in_the_parent(tmp_path):
    bad = RunConfig(epochs=1, batch_size=16, model_options=SMALL, loss_scale={"nope": 10.0})
    runs = [(configs()[1], None), (bad, None)]
    with pytest.raises(ValueError, match=r"loss_scale names unknown task\(s\) \['nope'\]"):
        train_in_workers(tiny(), runs, jobs=2, threads=1)


def test_bad_job_counts_are_refused():
    with pytest.raises(ValueError, match="jobs must be at least 1, got 0"):
        train_in_workers(tiny(), [(configs()[0], None)], jobs=0, threads=1)
    with pytest.raises(ValueError, match="jobs must be at least 1, got -2"):
        BenchConfig(dataset="rf1", jobs=-2)


def test_runs_on_two_devices_are_refused():
    cpu, meta = configs()[0], RunConfig(device="meta")
    with pytest.raises(ValueError, match=r"share a device, got \['cpu', 'meta'\]"):
        train_in_workers(tiny(), [(cpu, None), (meta, None)], jobs=2, threads=1)


def test_each_run_is_reported_when_it_finishes_not_when_the_stage_does():
    # The progress bar and train.log's summary lines follow on_done: a short run must be
    # reported while a long one is still training.
    common = {"batch_size": 16, "model_options": SMALL}
    runs = [
        (RunConfig(epochs=1, **common), None),
        (RunConfig(epochs=150, seed=1, **common), None),
        (RunConfig(epochs=1, seed=2, **common), None),
    ]
    reported = {}
    train_in_workers(
        tiny(), runs, jobs=2, threads=1,
        on_done=lambda config, _: reported.setdefault(config.epochs, time.monotonic()),
    )  # fmt: skip
    assert reported[150] - reported[1] > 0.3


SCRIPT_HEAD = """
import sys
from support.datasets import tiny
from taskbalance.bench.pool import train_in_workers
from taskbalance.bench.run_config import RunConfig
LONG = RunConfig(epochs=100_000, batch_size=16, model_options={"hidden": 4})
"""
ORPHAN_SCRIPT = (
    SCRIPT_HEAD
    + """
if __name__ == "__main__":
    runs = [(LONG, None), (RunConfig(**{**LONG.__dict__, "seed": 1}), None)]
    train_in_workers(tiny(), runs, jobs=2, threads=1)
"""
)
FAILING_SCRIPT = (
    SCRIPT_HEAD
    + """
if __name__ == "__main__":
    bad = RunConfig(epochs=1, batch_size=16, model_options={"hidden": 4}, loss_scale={"x": 2.0})
    try:
        train_in_workers(tiny(), [(LONG, None), (bad, None)], jobs=2, threads=1)
    except ValueError as error:
        print("raised:", error)
"""
)


def _run_script(tmp_path: Path, text: str) -> subprocess.Popen:
    script = tmp_path / "script.py"
    script.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True
    )  # fmt: skip


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _gone(pid: int) -> bool:
    # Exited: no /proc entry, or a zombie where PID 1 does not reap orphans.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _kill(pids: list[int]) -> None:
    for pid in pids:  # never leave a spinning process behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_stop_when_their_parent_is_killed(tmp_path):
    parent = _run_script(tmp_path, ORPHAN_SCRIPT)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
            workers = [c for c in _children(parent.pid) if _is_worker(c)]
        time.sleep(1.0)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while not all(_gone(w) for w in workers):
            assert time.monotonic() < deadline, "orphaned workers kept training"
            time.sleep(0.2)
    finally:
        _kill([parent.pid, *workers])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_failing_run_stops_the_runs_in_progress_at_once(tmp_path):
    # Raising is not enough: a worker left training its 100,000 epochs would keep the process
    # from exiting (the pool's exit hook joins its workers) for minutes.
    process = _run_script(tmp_path, FAILING_SCRIPT)
    try:
        out, _ = process.communicate(timeout=90)
        assert "raised: loss_scale names unknown task(s) ['x']" in out
        assert process.returncode == 0
    finally:
        _kill([process.pid, *[c for c in _children(process.pid) if _is_worker(c)]])


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
