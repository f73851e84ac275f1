"""The taskbalance command line: listing, quickstart, and errors on bad values."""

from __future__ import annotations

import pytest

from taskbalance import list_methods
from taskbalance.cli import main


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in list_methods():
        assert f"\n{name} " in out
    assert "\nadatask " in out and "AdaTask Adam optimizer" in out  # the bench accepts it


def test_quickstart_trains_and_prints_losses_and_weights(capsys):
    assert main(["quickstart", "--methods", "imtl", "--steps", "20", "--every", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.strip().startswith(("1 ", "10 ", "20 "))]
    assert [row[0] for row in rows] == ["1", "10", "20"]
    assert all(len(row) == 1 + 3 + 3 for row in rows)  # step, three losses, three weights
    first, last = (float(v) for v in (rows[0][1], rows[-1][1]))
    assert last < first  # the weight regression improves


def test_unknown_method_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["quickstart", "--methods", "nope"])
    assert caught.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_version_prints_the_one_version(capsys):
    import taskbalance

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"taskbalance {taskbalance.__version__}"
