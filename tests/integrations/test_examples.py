"""The integration examples run, in this process (the frameworks are imported once), on a
shortened schedule, and print the method's logged weights."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    ("script", "arguments", "framework"),
    [
        ("lightning_multitask.py", ["--epochs", "1"], "lightning"),
        ("lightning_multitask.py", ["--epochs", "1", "--adatask"], "lightning"),
        ("hf_multitask.py", ["--steps", "10"], "transformers"),
    ],
)
def test_example_runs_and_prints_the_weights(monkeypatch, capsys, script, arguments, framework):
    pytest.importorskip(framework)
    monkeypatch.setattr(sys, "argv", [script, *arguments])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "weight" in printed and "nan" not in printed.lower()
