"""`taskbalance compare`: Delta m of two benchmark results side by side."""

from __future__ import annotations

import json

import pytest

from taskbalance.bench.compare import compare_delta_m, load_result
from taskbalance.cli import main


def write_result(folder, rows, **setup):
    folder.mkdir(parents=True, exist_ok=True)
    table = [{"method": m, "delta_m": {"mean": mean, "std": std, "n": n}}
             for m, (mean, std, n) in rows.items()]  # fmt: skip
    (folder / "results.json").write_text(json.dumps({"table": table, "runs": [], "setup": setup}))
    return folder


def test_the_change_and_the_spread_rule_follow_the_means_and_stds():
    base = {"single-task": {"delta_m": {"mean": 0.0, "std": 0.0, "n": 3}},
            "ew": {"delta_m": {"mean": 50.0, "std": 3.0, "n": 3}},
            "imtl": {"delta_m": {"mean": 20.0, "std": 5.0, "n": 3}},
            "only_here": {"delta_m": {"mean": 1.0, "std": 1.0, "n": 3}}}  # fmt: skip
    other = {"ew": {"delta_m": {"mean": 57.5, "std": 4.0, "n": 3}},
             "imtl": {"delta_m": {"mean": 29.0, "std": 4.0, "n": 3}}}  # fmt: skip
    lines = compare_delta_m(base, other, ("as is", "x10")).splitlines()
    assert lines[0].startswith("| method | Δm %, as is | Δm %, x10 |")
    # ew moved 7.5 > 3 + 4: beyond; imtl moved 9.0, exactly 5 + 4: not beyond (strict rule)
    assert lines[2:] == ["| ew | 50 ± 3 | 57.5 ± 4 | +7.5 | yes |",
                         "| imtl | 20 ± 5 | 29 ± 4 | +9.0 | no |"]  # fmt: skip


def test_one_seed_has_no_spread_and_a_diverged_row_has_no_change():
    nan = float("nan")  # how the report stores a row with no finite Delta m
    base = {"ew": {"delta_m": {"mean": 50.0, "std": 0.0, "n": 1}},
            "boom": {"delta_m": {"mean": None, "std": None, "n": 0}},
            "nan": {"delta_m": {"mean": nan, "std": nan, "n": 0}}}  # fmt: skip
    lines = compare_delta_m(base, base).splitlines()
    assert lines[2:] == ["| ew | 50 | 50 | +0.0 | - |", "| boom | - | - | - | - |",
                         "| nan | - | - | - | - |"]  # fmt: skip


def test_the_command_reads_folders_and_names_a_missing_result(tmp_path, capsys):
    a = write_result(tmp_path / "a", {"ew": (60.0, 5.0, 3)})
    b = write_result(tmp_path / "b", {"ew": (100.0, 6.0, 3)})
    assert main(["compare", str(a), str(b / "results.json"), "--names", "plain", "mu x10"]) == 0
    assert "| ew | 60 ± 5 | 100 ± 6 | +40.0 | yes |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"no benchmark result at .*nowhere.*results\.json"):
        main(["compare", str(a), str(tmp_path / "nowhere")])


def test_a_json_that_is_not_a_benchmark_result_is_refused(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"not a taskbalance bench results\.json"):
        load_result(tmp_path / "x.json")


def test_the_command_names_missing_methods_and_warns_of_unequal_runs(tmp_path, capsys):
    a = write_result(
        tmp_path / "a",
        {"ew": (60.0, 5.0, 3), "imtl": (1.0, 1.0, 3)},
        data="qm9",
        epochs="2",
        **{"rows (train / val / test)": "2000 / 10 / 10"},
    )
    b = write_result(
        tmp_path / "b",
        {"ew": (100.0, 6.0, 3), "famo": (1.0, 1.0, 3)},
        data="qm9",
        epochs="12",
        **{"rows (train / val / test)": "20000 / 10 / 10"},
    )
    assert main(["compare", str(a), str(b), "--names", "small", "large"]) == 0
    out = capsys.readouterr().out
    assert "methods only in small (not compared): imtl" in out
    assert "methods only in large (not compared): famo" in out
    assert "warning: epochs differ: 2 (small) vs 12 (large)" in out
    assert "warning: rows (train / val / test) differ: 2000 / 10 / 10 (small)" in out
    assert "data differ" not in out
