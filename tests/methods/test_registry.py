"""The registry: names, hyperparameters, and the errors that list the valid choices."""

from __future__ import annotations

import pytest

from taskbalance import EW, IMTL, IMTLG, IMTLL, get_method, list_methods


def test_lists_the_foundation_methods():
    assert {"ew", "imtl", "imtl_g", "imtl_l"} <= set(list_methods())


@pytest.mark.parametrize(
    ("name", "options", "cls"),
    [
        ("ew", {}, EW),
        ("imtl_l", {"tasks": 2}, IMTLL),
        ("imtl_g", {}, IMTLG),
        ("imtl", {"tasks": 2}, IMTL),
    ],
)
def test_builds_each_method_by_name(name, options, cls):
    method = get_method(name, **options)
    assert type(method) is cls and method.name == name


def test_hyperparameters_reach_the_method():
    assert get_method("imtl_g", level="parameter").level == "parameter"
    assert get_method("ew", reduction="mean").reduction == "mean"


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'imtlg'; valid names: .*imtl_g"):
        get_method("imtlg")


def test_unknown_hyperparameter_lists_the_valid_ones():
    with pytest.raises(TypeError, match="no hyperparameter 'lr'; valid: tasks, level"):
        get_method("imtl_g", lr=0.1)


def test_loss_level_methods_have_no_level():
    with pytest.raises(TypeError, match="no hyperparameter 'level'; valid: tasks, reduction"):
        get_method("ew", level="feature")
    assert EW().level is None
