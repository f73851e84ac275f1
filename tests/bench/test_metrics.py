"""Benchmark metrics and losses against hand computations; Delta m's sign conventions."""

from __future__ import annotations

import itertools

import pytest
import torch

from taskbalance.bench.data.types import TaskSpec
from taskbalance.bench.metrics import (
    HIGHER_IS_BETTER,
    accuracy,
    auc,
    delta_m,
    mae,
    task_loss,
    task_metric,
)


def test_accuracy_counts_argmax_hits():
    logits = torch.tensor([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 3.0, 2.0]])
    assert accuracy(logits, torch.tensor([1, 0, 0, 2])) == pytest.approx(2 / 4)


def test_auc_is_the_fraction_of_correctly_ordered_pairs_and_skips_missing_labels():
    scores = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.8, -5.0, 7.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, -1.0, -1.0])
    kept = [(s, y) for s, y in zip(scores.tolist(), labels.tolist(), strict=True) if y != -1]
    pos = [s for s, y in kept if y == 1]
    neg = [s for s, y in kept if y == 0]
    pairs = list(itertools.product(pos, neg))
    by_hand = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert auc(scores, labels, missing_label=-1.0) == pytest.approx(by_hand)
    assert by_hand == pytest.approx(5 / 6)


def test_auc_of_a_single_class_is_an_error_naming_the_task():
    spec = TaskSpec("like", "binary", 1, "auc", True, missing_label=-1.0)
    with pytest.raises(ValueError, match="'like'"):
        task_metric(spec, torch.randn(3), torch.tensor([1.0, -1.0, 1.0]))


def test_mae_is_in_original_units():
    spec = TaskSpec("mu", "regression", 1, "mae", False)
    pred, target = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, 0.0, -1.0])
    # standardised errors 0.5, 1, 0 -> mean 0.5; times the std 3 (the mean 10 cancels)
    assert task_metric(spec, pred, target, {"mu": (10.0, 3.0)}) == pytest.approx(1.5)
    assert mae(pred, target) == pytest.approx(0.5)


def test_every_metric_knows_its_direction():
    assert HIGHER_IS_BETTER == {"accuracy": True, "auc": True, "mae": False}


def test_delta_m_matches_the_formula_by_hand():
    value = delta_m(
        {"acc": 0.88, "err": 1.2}, {"acc": 0.80, "err": 1.0}, {"acc": True, "err": False}
    )
    assert value == pytest.approx(((-1) * (0.88 - 0.80) / 0.80 + (1.2 - 1.0) / 1.0) / 2 * 100)


def test_delta_m_is_negative_when_better_on_every_metric_and_positive_when_worse():
    hib = {"acc": True, "err": False}
    base = {"acc": 0.8, "err": 1.0}
    assert delta_m({"acc": 0.9, "err": 0.5}, base, hib) < 0
    assert delta_m({"acc": 0.7, "err": 1.5}, base, hib) > 0
    assert delta_m(base, base, hib) == 0


def test_delta_m_rejects_a_zero_baseline_naming_the_task():
    with pytest.raises(ValueError, match="'err'"):
        delta_m({"err": 1.0}, {"err": 0.0}, {"err": False})


def test_binary_loss_skips_missing_labels():
    spec = TaskSpec("like", "binary", 1, "auc", True, missing_label=-1.0)
    out = torch.tensor([2.0, -1.0, 0.5])
    target = torch.tensor([1.0, -1.0, 0.0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out[[0, 2]], target[[0, 2]])
    assert torch.allclose(task_loss(spec, out, target), expected)


def test_a_batch_with_only_missing_labels_gives_a_zero_loss_that_keeps_the_graph():
    spec = TaskSpec("like", "binary", 1, "auc", True, missing_label=-1.0)
    out = torch.randn(3, requires_grad=True)
    loss = task_loss(spec, out, torch.full((3,), -1.0))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(out.grad, torch.zeros(3))


def test_regression_loss_is_mse_or_l1_on_standardised_targets():
    spec = TaskSpec("y", "regression", 1, "mae", False)
    out, target = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])
    assert float(task_loss(spec, out, target, "mse")) == pytest.approx(5.0)
    assert float(task_loss(spec, out, target, "l1")) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="mse"):
        task_loss(spec, out, target, "huber")  # type: ignore[arg-type]
