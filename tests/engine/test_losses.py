"""Input checks: every bad input gives an error that names the task and the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taskbalance.engine import collect_losses, leaf_tensors, reaches, unique_tensors
from taskbalance.errors import InvalidLossError, NonFiniteLossError


def _loss(value: float) -> torch.Tensor:
    return torch.tensor(value, requires_grad=True) * 1.0


def test_dict_order_follows_the_expected_names():
    checked = collect_losses({"b": _loss(2.0), "a": _loss(1.0)}, expected=("a", "b"))
    assert checked.names == ("a", "b")
    assert checked.values.tolist() == [1.0, 2.0]


def test_sequence_and_vector_inputs_are_named_by_position():
    assert collect_losses([_loss(1.0), _loss(2.0)]).names == ("0", "1")
    assert collect_losses(torch.stack([_loss(1.0), _loss(2.0)])).values.tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    ("losses", "error", "message"),
    [
        ({}, InvalidLossError, "no task losses"),
        ([], InvalidLossError, "no task losses"),
        ({"seg": 1.0}, InvalidLossError, "task 'seg' is a float"),
        (
            {"seg": torch.ones(3, requires_grad=True)},
            InvalidLossError,
            r"task 'seg' has shape \(3,\)",
        ),
        ({"seg": torch.tensor(1.0)}, InvalidLossError, "task 'seg' does not require grad"),
        ({"seg": torch.tensor(1, dtype=torch.int64)}, InvalidLossError, "must be floating point"),
        ({"a": _loss(1.0), "seg": _loss(float("nan"))}, NonFiniteLossError, "'seg' = nan"),
        ({"depth": _loss(float("inf"))}, NonFiniteLossError, "'depth' = inf"),
        (torch.ones(2, 2, requires_grad=True), InvalidLossError, "must be 1-D"),
        ("loss", InvalidLossError, "got str"),
    ],
)
def test_bad_losses_raise_a_clear_error(losses, error, message):
    with pytest.raises(error, match=message):
        collect_losses(losses)


def test_non_finite_error_names_the_task():
    with pytest.raises(NonFiniteLossError) as caught:
        collect_losses({"a": _loss(1.0), "b": _loss(float("nan"))})
    assert caught.value.task == "b"


def test_changed_task_names_are_an_error():
    with pytest.raises(InvalidLossError, match=r"missing \['b'\], unexpected \['c'\]"):
        collect_losses({"a": _loss(1.0), "c": _loss(1.0)}, expected=("a", "b"))


def test_wrong_number_of_positional_losses_is_an_error():
    with pytest.raises(InvalidLossError, match="expected 3 task losses, got 2"):
        collect_losses([_loss(1.0), _loss(1.0)], expected=("a", "b", "c"))


def test_parameters_given_twice_are_an_error():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="given twice"):
        unique_tensors([layer.weight, layer.bias, layer.weight], "shared parameters")


def test_frozen_parameters_are_left_out_and_all_frozen_is_an_error():
    layer = nn.Linear(2, 2)
    layer.weight.requires_grad_(False)
    assert unique_tensors(layer, "shared parameters") == (layer.bias,)
    layer.requires_grad_(False)
    with pytest.raises(ValueError, match="all 2 given are frozen"):
        unique_tensors(layer, "shared parameters")


def test_views_and_computed_tensors_are_refused_naming_what_made_them():
    base = nn.Parameter(torch.randn(4, 3))
    first, second = base.chunk(2)
    with pytest.raises(ValueError, match=r"item 1 .* is not a leaf tensor but the output of Split"):
        unique_tensors([base, second], "shared parameters")
    del first


def test_leaf_tensors_and_reachability():
    a, b, c = (torch.ones(2, requires_grad=True) for _ in range(3))
    out = (a * b).sum()
    leaves = leaf_tensors([out], exclude=[a])
    assert len(leaves) == 1 and leaves[0] is b
    assert reaches(out, [b]) and not reaches(out, [c])
