"""The benchmark's plan: the lr grid on the grid seeds, the chosen rate on the others, and
method epochs selected by validation Delta m against the same seed's single-task baselines."""

from __future__ import annotations

import pytest

from support.datasets import tiny
from taskbalance.bench.benchmark import BenchConfig, run_benchmark
from taskbalance.bench.method_specs import MethodSpec
from taskbalance.bench.plan import references
from taskbalance.bench.run_config import RunResult

LRS = [3e-2, 1e-3]


def bench(tmp_path, **kw):
    config = BenchConfig(
        dataset="tiny", methods=[MethodSpec("ew"), MethodSpec("imtl")], epochs=2, batch_size=16,
        seeds=[0, 1, 2], lrs=LRS, model_options={"hidden": 8}, out_dir=str(tmp_path),
        timing_rounds=0, record_every=0, **kw,
    )  # fmt: skip
    return run_benchmark(config, data=tiny(), progress=False, echo=lambda _line: None)


def key(run: RunResult) -> tuple[str, float, int]:
    return run.label, run.config["lr"], run.config["seed"]


def test_the_grid_runs_on_the_grid_seeds_and_the_others_train_at_the_chosen_rate(tmp_path):
    result = bench(tmp_path, grid_seeds=1)
    labels = ["stl:a", "stl:b", "ew", "imtl"]
    grid = {key(r) for r in result.runs if r.config["seed"] == 0}
    assert grid == {(label, lr, 0) for label in labels for lr in LRS}
    for label in labels:
        at_seed_0 = {r.config["lr"]: r for r in result.runs if key(r)[0::2] == (label, 0)}
        criterion = {lr: r.history[r.best_epoch - 1]["criterion"] for lr, r in at_seed_0.items()}
        best = min(LRS, key=criterion.__getitem__)
        later = [r.config["lr"] for r in result.runs if r.label == label and r.config["seed"] > 0]
        assert later == [best, best]
        assert sorted(key(r)[1:] for r in result.selected if r.label == label) == [
            (best, 0), (best, 1), (best, 2)
        ]  # fmt: skip
    assert len(result.runs) == 4 * (len(LRS) + 2)
    assert [row.label for row in result.rows] == ["single-task", "ew", "imtl"]


def test_methods_select_against_the_selected_baselines_of_their_own_seed(tmp_path):
    result = bench(tmp_path, grid_seeds=1)
    baselines = {key(r)[0::2]: r for r in result.selected if r.label.startswith("stl:")}
    for run in result.runs:
        if run.label.startswith("stl:"):
            assert run.config["reference"] is None
            continue
        seed = run.config["seed"]
        expected = {t: baselines[(f"stl:{t}", seed)].val_metrics[t] for t in "ab"}
        assert run.config["reference"] == expected
    seeds = {r.config["seed"] for r in result.runs if r.config["reference"] is not None}
    assert seeds == {0, 1, 2}


def test_loss_selection_and_no_baselines_give_methods_no_reference(tmp_path):
    for options in ({"selection": "loss"}, {"single_task": False}):
        result = bench(tmp_path / str(len(options)) / next(iter(options)), **options)
        assert all(r.config["reference"] is None for r in result.runs)


def test_a_diverged_baseline_leaves_its_seed_without_a_reference():
    def run(task, seed, val):
        return RunResult({"seed": seed, "lr": 1e-3}, f"stl:{task}", [task], [], 1 if val else 0,
                         val, {}, {}, 1.0, "ok" if val else "diverged", None, 0.0)  # fmt: skip

    refs = references([run("a", 0, {"a": 1.0}), run("b", 0, {"b": 2.0}), run("a", 1, {}),
                       run("b", 1, {"b": 3.0})])  # fmt: skip
    assert refs == {0: {"a": 1.0, "b": 2.0}, 1: None}


def test_bad_selection_and_grid_seeds_are_refused():
    with pytest.raises(ValueError, match=r"selection must be one of \('delta_m', 'loss'\)"):
        BenchConfig(selection="auc")
    with pytest.raises(ValueError, match="grid_seeds must be at least 1"):
        BenchConfig(grid_seeds=0)


def test_a_loss_scaled_benchmark_reuses_the_unscaled_single_task_runs(tmp_path):
    # The x10 experiment copies the unscaled benchmark's single-task checkpoints: a single-task
    # run ignores loss_scale, so its configuration (and checkpoint) is the same.
    plain = bench(tmp_path / "plain", grid_seeds=1)
    (tmp_path / "x10" / "checkpoints").mkdir(parents=True)
    for checkpoint in (tmp_path / "plain" / "checkpoints").glob("stl_*.pt"):
        (tmp_path / "x10" / "checkpoints" / checkpoint.name).write_bytes(checkpoint.read_bytes())
    scaled = bench(tmp_path / "x10", grid_seeds=1, loss_scale={"a": 10.0}, resume=True)

    def by_key(result, single_task):
        return {key(r): r for r in result.runs if r.label.startswith("stl:") == single_task}

    assert by_key(scaled, True).keys() == by_key(plain, True).keys()
    for run_key, run in by_key(scaled, True).items():
        # Read back, not retrained: even the wall-clock field is the first benchmark's.
        assert run.to_dict() == by_key(plain, True)[run_key].to_dict()
    assert all(r.config["loss_scale"] == {"a": 10.0} for r in by_key(scaled, False).values())


def test_resume_says_how_many_checkpoints_it_found(tmp_path):
    def said(**kw):
        lines = []
        config = BenchConfig(
            dataset="tiny", methods=[MethodSpec("ew")], epochs=1, batch_size=16,
            model_options={"hidden": 8}, out_dir=str(tmp_path), timing_rounds=0, **kw,
        )  # fmt: skip
        run_benchmark(config, data=tiny(), progress=False, echo=lines.append)
        return [line for line in lines if "resum" in line]

    assert said(resume=True) == [f"--resume: no checkpoints in {tmp_path / 'checkpoints'} yet, "
                                 "every run starts"]  # fmt: skip
    assert said(resume=True) == [f"resuming from 3 run checkpoint(s) in {tmp_path / 'checkpoints'}"]
    assert said() == []
