"""The Ray executor: a tiny benchmark on a local Ray instance (2 CPUs) writes the serial run's
results, resumes what another executor wrote, and names a run that fails on a worker; without
Ray, one line names the extra."""

from __future__ import annotations

import csv
import re
import shutil
import sys
from pathlib import Path

import pytest

from support.datasets import tiny
from taskbalance.bench.benchmark import BenchConfig, run_benchmark
from taskbalance.bench.executor import RunFailedError, Stage, execute
from taskbalance.bench.method_specs import MethodSpec
from taskbalance.cli import main

#: The columns that hold wall-clock measurements: the only ones allowed to differ.
TIMING = {"step_ms"}
#: A per-epoch line of train.log, less its time per step.
EPOCH = re.compile(r"(.* epoch \d+/\d+: .*) [\d.]+ ms/step$")


def config(out: Path, **kw) -> BenchConfig:
    return BenchConfig(
        methods=[MethodSpec("ew"), MethodSpec("imtl_g")], epochs=2, batch_size=16,
        model_options={"hidden": 8, "tower": 4}, seeds=[0, 1], lrs=[3e-3, 1e-3], grid_seeds=1,
        timing_rounds=0, record_every=2, out_dir=str(out), **kw,
    )  # fmt: skip


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def quiet(out: Path, **kw):
    return run_benchmark(config(out, **kw), data=tiny(), progress=False, echo=lambda _: None)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def outs(local_ray, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("executors")
    quiet(root / "serial")
    quiet(root / "ray", executor="ray")
    return {"serial": root / "serial", "ray": root / "ray"}


@pytest.mark.parametrize("name", ["results.csv", "diagnostics.csv"])
def test_ray_tasks_write_the_serial_runs_results(outs, name):
    serial, on_ray = (csv_rows(outs[key] / name) for key in ("serial", "ray"))
    assert len(serial) > 20 and on_ray == serial


def test_ray_runs_log_their_epochs_and_the_report_says_where_they_ran(outs):
    def epochs(key):
        lines = (outs[key] / "train.log").read_text().splitlines()
        return sorted(m[1] for m in map(EPOCH.fullmatch, lines) if m)

    assert len(epochs("serial")) == 2 * 12 and epochs("ray") == epochs("serial")
    assert "- parallel runs: Ray tasks on 1 node(s), 2 CPU(s)" in (
        (outs["ray"] / "report.md").read_text()
    )


def test_ray_resumes_what_the_serial_executor_wrote(outs, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(outs["serial"], out)
    (out / "checkpoints" / "imtl_g-lr0.001-seed0.pt").unlink()
    before = len((out / "train.log").read_text().splitlines())
    quiet(out, executor="ray", resume=True)
    assert csv_rows(out / "results.csv") == csv_rows(outs["serial"] / "results.csv")
    added = (out / "train.log").read_text().splitlines()[before:]
    trained = [m[1].split(" epoch ")[0] for m in map(EPOCH.fullmatch, added) if m]
    assert trained == ["imtl_g seed 0 lr 0.001"] * 2  # the run without a checkpoint, no other


def test_a_run_failing_on_a_worker_names_its_config_and_the_finished_runs_stay(local_ray, tmp_path):
    # The baselines do not scale losses; the methods' runs refuse the unknown task on a worker.
    with pytest.raises(RunFailedError, match=r"run (ew|imtl_g) lr 0\.00[13] seed 0 failed: "
                       r"loss_scale names unknown task\(s\) \['nope'\]"):  # fmt: skip
        quiet(tmp_path, executor="ray", loss_scale={"nope": 10.0})
    kept = [path.name for path in (tmp_path / "checkpoints").glob("*.pt")]
    assert len(kept) == 6 and all(name.startswith("stl_") for name in kept)  # every baseline


def test_without_ray_one_line_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'taskbalance\[ray\]'"):
        quiet(tmp_path / "python", executor="ray")
    with pytest.raises(SystemExit) as caught:
        main(["bench", "--executor", "ray", "--out", str(tmp_path / "cli")])
    assert str(caught.value) == (
        "taskbalance bench: --executor ray: the Ray executor needs Ray, which is not installed: "
        "pip install 'taskbalance[ray]'"
    )
    assert not (tmp_path / "python").exists()  # refused before anything was written


def test_jobs_with_the_ray_executor_is_one_line():
    with pytest.raises(SystemExit, match="jobs=2 with the Ray executor: Ray schedules"):
        main(["bench", "--executor", "ray", "--jobs", "2"])


def test_an_unknown_executor_is_refused_with_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"executor must be one of \('local', 'ray'\), got 'dask'"):
        config(tmp_path, executor="dask")
    with pytest.raises(ValueError, match=r"executor must be one of \('local', 'ray'\), got 'dask'"):
        execute(Stage(tiny(), {}), [], executor="dask")
