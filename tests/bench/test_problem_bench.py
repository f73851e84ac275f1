"""`taskbalance bench --problem`: the docs' own-problem examples through the CLI and the API, and
the one-line refusals before anything trains."""

from __future__ import annotations

import csv

import pytest
import torch

from taskbalance.bench.benchmark import BenchConfig, run_benchmark
from taskbalance.bench.examples import digit_domains_problem
from taskbalance.bench.method_specs import MethodSpec
from taskbalance.cli import main

WINE = "taskbalance.bench.examples:wine_problem"
TINY = ["--epochs", "2", "--timing-rounds", "0", "--record-every", "0", "--no-progress"]


def one_line_exit(argv) -> str:
    with pytest.raises(SystemExit) as caught:
        main(["bench", *argv])
    message = str(caught.value.code)
    assert message.startswith("taskbalance bench: ") and "\n" not in message
    return message


def test_the_wine_example_runs_through_the_entry_point_and_resumes(tmp_path, capsys):
    argv = ["bench", "--problem", WINE, "hidden=8", "--methods", "ew", "imtl", "--out",
            str(tmp_path), *TINY]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| cultivar accuracy ↑ | alcohol mae [% vol] ↓ | color mae ↓ |" in out
    with open(tmp_path / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"stl:cultivar", "stl:alcohol", "stl:color", "ew", "imtl"}
    assert {r["metric"] for r in rows} == {"accuracy", "mae", "delta_m_pct"}
    report = (tmp_path / "report.md").read_text()
    assert "- problem arguments: hidden=8" in report and "wine_problem's model" in report
    assert main([*argv, "--resume"]) == 0
    assert "resuming from 5 run checkpoint(s)" in capsys.readouterr().out


def test_a_multi_input_problem_trains_at_parameter_level(tmp_path):
    config = BenchConfig(
        methods=[MethodSpec("ew"), MethodSpec("imtl_g", {"level": "parameter"})],
        epochs=1, batch_size=128, timing_rounds=0, record_every=0, out_dir=str(tmp_path),
    )  # fmt: skip
    result = run_benchmark(config, data=digit_domains_problem(hidden=8), progress=False,
                           echo=lambda _line: None)  # fmt: skip
    assert [r.label for r in result.rows] == ["single-task", "ew", "imtl_g:level=parameter"]
    assert all(r.status == "ok" for r in result.rows)
    imtl = next(r for r in result.runs if r.label.startswith("imtl_g"))
    # One epoch: as many steps as the larger task's set needs (541 rows, batches of 128).
    assert len(imtl.history) == 1 and imtl.history[0]["weights"]["low"] > 0


def test_a_feature_level_method_on_a_multi_input_problem_is_one_line(tmp_path):
    message = one_line_exit(["--problem", "taskbalance.bench.examples:digit_domains_problem",
                             "--methods", "ew", "imtl", "--out", str(tmp_path), *TINY])  # fmt: skip
    assert "imtl: digit_domains is multi-input" in message and "imtl:level=parameter" in message
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--problem", "taskbalance.bench.examples:nothing"], "has no attribute 'nothing'"),
        (["--problem", "no_such_module_xyz:make"], "cannot import no_such_module_xyz"),
        (["--problem", WINE, "colour=3"], "unexpected keyword argument 'colour'"),
        (["--problem", WINE, "hidden"], "expected key=value"),
        (["--problem", "taskbalance.bench.examples:accuracy"], "accuracy() missing"),
        (["--problem", WINE, "--arch", "mmoe"], "--arch describe(s) a built-in data set"),
        (["--problem", WINE, "--loss-scale", "mu=10"], "unknown task(s) mu; tasks of wine"),
    ],
)
def test_a_bad_problem_is_one_line_before_anything_trains(tmp_path, argv, says):
    assert says in one_line_exit([*argv, "--out", str(tmp_path), *TINY])
    assert not (tmp_path / "checkpoints").exists()


def test_an_out_that_is_a_file_is_refused_before_loading(tmp_path, capsys):
    target = tmp_path / "afile.txt"
    target.write_text("x")
    message = one_line_exit(["--out", str(target)])
    assert "is an existing file" in message
    assert capsys.readouterr().out == ""  # not even the method list: nothing loaded


def test_run_benchmark_from_python_uses_one_thread_and_says_it_was_python(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        config = BenchConfig(problem=WINE, problem_args={"hidden": 4}, methods=[MethodSpec("ew")],
                             epochs=1, timing_rounds=0, record_every=0, out_dir=str(tmp_path),
                             single_task=False)  # fmt: skip
        result = run_benchmark(config, progress=False, echo=lambda _line: None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    report = result.files["report"].read_text()
    assert "Command: `Python: run_benchmark(BenchConfig(problem=" in report
    assert "- threads: 1" in report
