"""`taskbalance bench`: option parsing, errors that list valid values, an offline end-to-end run."""

from __future__ import annotations

import pytest

from support.datasets import tiny
from taskbalance.bench import benchmark, plan
from taskbalance.bench.protocols import GRID, PAPER_METHODS
from taskbalance.cli import TUNE_GRID, bench_config, build_parser, main


def parse(*argv):
    return bench_config(build_parser().parse_args(["bench", *argv]))


def error_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as caught:
        main(["bench", *argv])
    assert caught.value.code == 2
    return capsys.readouterr().err


def test_unknown_dataset_lists_the_valid_ones(capsys):
    err = error_of(capsys, "--dataset", "cifar")
    assert "invalid choice: 'cifar'" in err and "qm9" in err and "multi_mnist" in err


def test_unknown_method_lists_the_valid_ones(capsys):
    err = error_of(capsys, "--methods", "ew", "imtl_x")
    assert "unknown method 'imtl_x'" in err and "imtl_g" in err and "adatask" in err


def test_unknown_hyperparameter_lists_the_methods_valid_ones(capsys):
    assert "valid: level, c, rescale" in error_of(capsys, "--methods", "cagrad:cc=1")


def test_bad_architecture_and_bad_numbers_are_refused(capsys):
    assert "invalid choice: 'resnet'" in error_of(capsys, "--arch", "resnet")
    assert "positive integer" in error_of(capsys, "--epochs", "0")
    assert "positive integer" in error_of(capsys, "--jobs", "0")
    assert "TASK=FACTOR" in error_of(capsys, "--loss-scale", "10")
    assert "positive number" in error_of(capsys, "--lr-grid", "1e-3,abc")


def test_defaults_are_the_quick_protocol():
    config = parse()
    assert config.dataset == "qm9" and config.epochs == 12 and config.protocol == "quick"
    assert config.seeds == [0] and config.lrs == [1e-3]
    assert config.train_size == 20_000 and config.arch == "hps" and config.jobs == 1
    assert {"ew", "imtl", "imtl_g", "imtl_l", "emtl", "adatask"} <= {m.name for m in config.methods}


def test_full_means_every_method_three_seeds_more_epochs_and_the_grid_on_seed_0():
    config = parse("--full")
    assert config == parse("--protocol", "full") and config.protocol == "full"
    assert config.seeds == [0, 1, 2] and config.epochs == 15
    assert config.lrs == list(GRID) and config.grid_seeds == 1
    assert config.train_size == 20_000 and config.selection == "delta_m"
    assert [m.name for m in config.methods] == [m.name for m in plan.all_methods()]
    assert {"moco", "upgrad", "stch", "excess_mtl"} <= {m.name for m in config.methods}
    overridden = parse("--full", "--epochs", "3", "--seeds", "2", "--grid-seeds", "2")
    assert (overridden.epochs, overridden.seeds, overridden.grid_seeds) == (3, [0, 1], 2)
    assert [m.name for m in parse("--full", "--methods", "ew").methods] == ["ew"]


def test_selection_is_delta_m_by_default_and_loss_on_request(capsys):
    assert parse().selection == "delta_m" and parse().grid_seeds is None
    assert parse("--select", "loss").selection == "loss"
    assert "invalid choice: 'auc'" in error_of(capsys, "--select", "auc")


def test_grid_options_and_method_hyperparameters_reach_the_config():
    assert parse("--tune").lrs == list(TUNE_GRID)
    assert parse("--lr-grid", "1e-2,1e-3").lrs == [1e-2, 1e-3]
    config = parse("--methods", "imtl_g:level=parameter", "ew", "--loss-scale", "mu=10")
    assert [m.label for m in config.methods] == ["imtl_g:level=parameter", "ew"]
    assert config.loss_scale == {"mu": 10.0}


def test_bench_runs_offline_end_to_end_and_says_where_it_wrote(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(benchmark, "load_dataset", lambda name, **options: tiny())
    argv = [
        "bench",
        "--dataset",
        "rf1",
        "--methods",
        "ew",
        "imtl",
        "--epochs",
        "2",
        "--hidden",
        "8",
        "--batch-size",
        "16",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| single-task |" in out and "| ew |" in out and "| imtl |" in out
    assert "fixed learning rate" in out and str(tmp_path / "results.csv") in out
    assert (tmp_path / "report.md").exists() and (tmp_path / "checkpoints").is_dir()
    assert main([*argv, "--resume"]) == 0  # finished runs are read back
    with pytest.raises(SystemExit) as caught:  # other data under the same --out: one line
        main([*argv, "--resume", "--train-size", "40"])
    message = str(caught.value.code)
    assert message.startswith("taskbalance bench: ") and "written for other data" in message
    assert "another --out" in message and "\n" not in message


def test_loss_scale_on_an_unknown_task_lists_the_tasks(monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark, "load_dataset", lambda name, **options: tiny())
    with pytest.raises(SystemExit, match="tasks of tiny: a, b"):
        main(["bench", "--loss-scale", "zz=10", "--out", str(tmp_path), "--no-progress"])


def test_bench_writes_the_diagnostics_plots(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(benchmark, "load_dataset", lambda name, **options: tiny())
    argv = ["bench", "--dataset", "rf1", "--methods", "imtl_g", "adatask", "--epochs", "1",
            "--hidden", "8", "--batch-size", "8", "--record-every", "2", "--no-single-task",
            "--timing-rounds", "0", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("rt_spread.png", "au_shares.png", "diagnostics.csv"):
        assert (tmp_path / name).exists() and str(tmp_path / name) in out
    assert parse("--record-every", "0").record_every == 0 and parse().record_every == 20


@pytest.mark.parametrize(
    ("dataset", "epochs", "arch", "data_options"),
    [
        ("qm9", 30, "hps", {}),
        ("census_income", 10, "mmoe", {"val_from": "train"}),
        ("multi_mnist", 10, "hps", {"size": 60_000, "val_size": 10_000, "test_size": 10_000}),
    ],
)
def test_paper_protocol_uses_the_whole_data_and_its_methods(dataset, epochs, arch, data_options):
    config = parse("--protocol", "paper", "--dataset", dataset)
    assert (config.epochs, config.arch, config.data_options) == (epochs, arch, data_options)
    assert config.train_size is None and config.seeds == [0, 1, 2] and config.grid_seeds == 1
    assert [m.name for m in config.methods] == list(PAPER_METHODS)
    assert config.protocol == "paper" and config.lrs == list(GRID)
    overridden = parse("--protocol", "paper", "--dataset", dataset, "--arch", "ple", "--epochs=2")
    assert (overridden.arch, overridden.epochs) == ("ple", 2)


def test_every_paper_method_exists():
    assert set(PAPER_METHODS) <= set(plan.available_methods())


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("cagrad:c=abc", "cagrad:c=abc: c must be a number (default 0.5)"),
        (
            "imtl_g:level=banana",
            "imtl_g:level=banana: IMTLG supports level in ['feature', 'parameter'], got 'banana'",
        ),
        ("cagrad:c=-1", "cagrad:c=-1: CAGrad: c must be >= 0, got -1"),
        ("uw:half=3", "uw:half=3: half must be true or false (default False)"),
        ("adatask:base=mgda", "adatask:base=mgda: base must be a loss-level method; valid: dwa"),
    ],
)
def test_a_bad_hyperparameter_value_is_one_line_naming_it_before_any_data_loads(
    capsys, monkeypatch, spec, says
):
    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the options were checked")

    monkeypatch.setattr(benchmark, "load_bench_data", no_data)
    err = error_of(capsys, "--methods", "ew", spec)
    assert len(err.strip().splitlines()) == 1 and says in err
