"""benchmarks/keep_finished_runs.py: a benchmark resumed from the thinned copies of its finished
runs writes the same table, results and plots (but the AU curves, sampled more coarsely)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from support.datasets import tiny
from taskbalance.bench.benchmark import BenchConfig, run_benchmark
from taskbalance.bench.method_specs import MethodSpec

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "keep_finished_runs.py"


@pytest.fixture(scope="module")
def keeper():
    spec = importlib.util.spec_from_file_location("keep_finished_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(out: Path, resume: bool = False):
    config = BenchConfig(
        dataset="tiny", methods=[MethodSpec("emtl"), MethodSpec("adatask")], epochs=3,
        batch_size=8, seeds=[0, 1], model_options={"hidden": 8}, out_dir=str(out),
        timing_rounds=0, record_every=2, resume=resume,
    )  # fmt: skip
    return run_benchmark(config, data=tiny(), progress=False, echo=lambda _line: None)


def test_a_benchmark_resumed_from_the_copies_writes_the_same_results(tmp_path, keeper):
    first = bench(tmp_path / "a")
    copies = tmp_path / "kept"
    assert keeper.keep(tmp_path / "a" / "checkpoints", copies) == (8, 8)
    assert keeper.keep(tmp_path / "a" / "checkpoints", copies) == (0, 8)  # idempotent
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    for path in copies.iterdir():
        (tmp_path / "b" / "checkpoints" / path.name).write_bytes(path.read_bytes())
    second = bench(tmp_path / "b", resume=True)

    assert second.table == first.table
    for name in ("results.csv", "delta_m.png", "rt_spread.png", "validation_curves.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    runs = [json.loads((tmp_path / folder / "results.json").read_text())["runs"] for folder in "ab"]
    assert runs[0] == runs[1]
    kept = {r.label: r.records for r in second.runs if r.config["seed"] == 0}
    assert {x["metric"] for x in kept["emtl"]} == {"r_spread"}
    assert {x["metric"] for x in kept["adatask"]} == {"r_spread", "au_share"}
    full = {r.label: r.records for r in first.runs if r.config["seed"] == 0}
    assert [x for x in full["emtl"] if x["metric"] == "r_spread"] == kept["emtl"]


def test_a_run_still_training_is_not_copied(tmp_path, keeper):
    bench(tmp_path / "a")
    checkpoints = tmp_path / "a" / "checkpoints"
    unfinished = checkpoints / "emtl-lr0.001-seed0.pt"
    state = torch.load(unfinished, weights_only=True)
    torch.save({**state, "model": {}, "result": None}, unfinished)
    assert keeper.keep(checkpoints, tmp_path / "kept") == (7, 7)
    assert not (tmp_path / "kept" / unfinished.name).exists()


def test_a_run_kept_with_its_model_is_copied_without_it(tmp_path, keeper):
    config = BenchConfig(
        dataset="tiny", methods=[MethodSpec("ew")], epochs=2, batch_size=8, seeds=[0],
        model_options={"hidden": 8}, out_dir=str(tmp_path / "a"), timing_rounds=0,
        keep_checkpoints=True, single_task=False,
    )  # fmt: skip
    run_benchmark(config, data=tiny(), progress=False, echo=lambda _line: None)
    assert keeper.keep(tmp_path / "a" / "checkpoints", tmp_path / "kept") == (1, 1)
    (copy,) = (tmp_path / "kept").iterdir()
    assert copy.name == "ew-lr0.001-seed0.pt"
    assert "model" not in torch.load(copy, weights_only=True)
    assert not list((tmp_path / "kept").glob("*.part"))
