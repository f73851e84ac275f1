"""`taskbalance bench --problem` on the dense problems, by their short names: the dense
MultiMNIST at tiny size, NYUv2 on tiny files in the real layout, and one-line refusals."""

import csv

import pytest

from support.dense_files import write_scenes
from taskbalance.bench.dense.metrics import METRICS
from taskbalance.cli import main

#: The nine NYUv2 metrics of the papers' tables.
NINE = {"miou", "pixel_acc", "abs_err", "rel_err", "mean", "median", "within_11.25",
        "within_22.5", "within_30"}  # fmt: skip

TINY = ["--epochs", "1", "--batch-size", "16", "--timing-rounds", "0", "--record-every", "0",
        "--no-progress"]  # fmt: skip


def rows(folder):
    with open(folder / "results.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_the_dense_multi_mnist_benchmark_runs_through_taskbalance_bench(tmp_path, mnist_root):
    argv = ["bench", "--problem", "dense_multi_mnist", "size=40", "test_size=10",
            f"root={mnist_root}", "widths=4,8", "convs=1,1", "--methods", "ew", "imtl",
            "--out", str(tmp_path), *TINY]  # fmt: skip
    assert main(argv) == 0
    found = rows(tmp_path)
    assert {r["method"] for r in found} == {
        "stl:segmentation", "stl:depth", "stl:normal", "ew", "imtl"
    }  # fmt: skip
    assert {r["metric"] for r in found} == {*NINE, "delta_m_pct"}
    delta = [r for r in found if r["metric"] == "delta_m_pct"]
    assert {r["method"] for r in delta} == {"ew", "imtl"} and len(delta) == 2
    assert "SYNTHETIC GEOMETRY" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_nyuv2_runs_through_taskbalance_bench_on_files_in_the_real_layout(tmp_path):
    root = write_scenes(tmp_path / "nyuv2", "nyuv2", (8, 3))
    out = tmp_path / "out"
    argv = ["bench", "--problem", "nyuv2", f"root={root}", "widths=4,8", "convs=1,1",
            "--methods", "ew", "--no-single-task", "--out", str(out), *TINY]  # fmt: skip
    assert main(argv) == 0
    assert {(r["task"], r["metric"]) for r in rows(out)} == {
        (task, m) for task, names in METRICS.items() for m in names}  # fmt: skip


@pytest.mark.parametrize("argv, says", [
    (["--problem", "nyuv2", "root=/nowhere"], "nyuv2: root /nowhere is not a folder"),
    (["--problem", "cityscapes"], "missing 1 required positional argument: 'root'"),
    (["--problem", "nyuv3"], "expected module:factory"),
])  # fmt: skip
def test_a_missing_root_is_one_line_before_anything_trains(tmp_path, argv, says):
    with pytest.raises(SystemExit) as caught:
        main(["bench", *argv, "--out", str(tmp_path), *TINY])
    message = str(caught.value.code)
    assert message.startswith("taskbalance bench: ") and "\n" not in message
    assert says in message and not (tmp_path / "checkpoints").exists()
