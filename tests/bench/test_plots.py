"""The figures: readable numbers on every heat map colour, a labelled Delta m chart that says
when there is no spread, validation curves that highlight EW and the seed papers' methods."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from taskbalance.bench import plots
from taskbalance.bench.builtin import builtin_problem
from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec
from taskbalance.bench.report import Cell, Row
from taskbalance.bench.run_config import RunResult

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def luminance(rgba) -> float:
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: float, b: float) -> float:
    return (max(a, b) + 0.05) / (min(a, b) + 0.05)


@pytest.mark.parametrize("cmap", ["RdBu_r", "viridis", "Greys"])
def test_heat_map_numbers_take_the_text_colour_of_higher_contrast(cmap):
    for i in range(256):
        colour = plt.get_cmap(cmap)(i)
        white, black = contrast(luminance(colour), 1.0), contrast(luminance(colour), 0.0)
        chosen, other = (white, black) if plots.text_colour(colour) == "white" else (black, white)
        assert chosen >= other and chosen >= 4.5  # WCAG's level for normal text


def rows(seeds: int) -> list[Row]:
    def row(label, dm):
        return Row(label, {}, Cell(dm, 1.0 if seeds > 1 else 0.0, seeds), 1.0, 1.0, 1e-3,
                   list(range(seeds)), "ok")  # fmt: skip

    return [row("ew", 4.0), row("imtl", -2.5), row("pcgrad", 7.0)]


@pytest.mark.parametrize(("seeds", "says"), [(1, "one seed, so no spread"),
                                              (3, "error bars: std over 3 seeds")])  # fmt: skip
def test_the_delta_m_chart_labels_its_lines_and_says_what_the_spread_is(seeds, says):
    fig = plots._delta_m_bars(plt, rows(seeds), "toy")
    xlabel = fig.axes[0].get_xlabel()
    assert says in xlabel and "seed(s)" not in xlabel
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == ["IMTL, AdaTask, EMTL (the seed papers)", "other methods",
                      "single-task (0)", "EW (4)"]  # fmt: skip
    plt.close(fig)


def test_validation_curves_colour_ew_and_the_seed_papers_methods_and_grey_the_others():
    s = Split(torch.zeros(1, 1), {"a": torch.zeros(1), "b": torch.zeros(1)})
    tasks = tuple(TaskSpec(t, "regression", 1, "mae", False) for t in "ab")
    problem = builtin_problem(MultiTaskData("toy", tasks, s, s, s, "", ""))

    def run(label):
        names = [label[4:]] if label.startswith("stl:") else ["a", "b"]
        history = [{"epoch": e, "val_metric": dict.fromkeys(names, 1.0 / e)} for e in (1, 2)]
        return RunResult({"seed": 0, "lr": 1e-3}, label, names, history, 2, {}, {}, {}, 1.0,
                         "ok", None, 0.0)  # fmt: skip

    labels = ("pcgrad", "ew", "imtl", "famo", "stl:a", "stl:b")
    fig = plots._validation_curves(plt, problem, [run(label) for label in labels], seed=0)
    assert [text.get_text() for text in fig.legends[0].get_texts()] == [
        "ew", "imtl", "other methods", "single-task"]  # fmt: skip
    grey = [line for line in fig.axes[0].lines if line.get_label() == "other methods"]
    assert len(grey) == 2 and {line.get_color() for line in grey} == {"0.72"}
    plt.close(fig)
