"""The dataset registry and the shared data structure."""

import pytest
import torch

from taskbalance.bench.data import DATASETS, MultiTaskData, Split, TaskSpec, load_dataset
from taskbalance.bench.data.types import split_indices, standardise


def test_names() -> None:
    assert DATASETS == (
        "multi_mnist",
        "multi_fashion",
        "multi_fashion_mnist",
        "census_income",
        "qm9",
        "movielens",
        "rf1",
    )


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        load_dataset("cifar10")
    assert "'cifar10'" in str(err.value)
    assert all(name in str(err.value) for name in DATASETS)


def test_options_reach_the_loader(tmp_path) -> None:
    # An empty root folder makes the loader fail at once, proving root= was passed through.
    with pytest.raises(FileNotFoundError, match="rf1"):
        load_dataset("rf1", root=tmp_path)


def test_split_checks_lengths() -> None:
    with pytest.raises(ValueError, match="lengths disagree"):
        Split(torch.zeros(3, 2), {"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="lengths disagree"):
        Split(torch.zeros(3, 2), {"a": torch.zeros(3)}, torch.zeros(4, 1, dtype=torch.long))
    s = Split(torch.arange(6.0).reshape(3, 2), {"a": torch.tensor([1.0, 2.0, 3.0])})
    sub = s.subset(torch.tensor([2, 0]))
    assert sub.x[:, 0].tolist() == [4.0, 0.0] and sub.y["a"].tolist() == [3.0, 1.0]


def test_task_lookup() -> None:
    tasks = (TaskSpec("a", "binary", 1, "auc", True), TaskSpec("b", "regression", 1, "mae", False))
    s = Split(torch.zeros(1, 1), {"a": torch.zeros(1), "b": torch.zeros(1)})
    data = MultiTaskData("toy", tasks, s, s, s, "toy", "none")
    assert data.task_names == ("a", "b") and data.task("b").metric == "mae"
    with pytest.raises(KeyError, match="no task 'c'"):
        data.task("c")


def test_split_indices_and_standardise() -> None:
    a, b, c = split_indices(10, (5, 3, 2), seed=0)
    assert sorted(torch.cat([a, b, c]).tolist()) == list(range(10))
    assert torch.equal(a, split_indices(10, (5, 3, 2), seed=0)[0])
    with pytest.raises(ValueError, match="cannot cut"):
        split_indices(3, (2, 2), seed=0)
    (tr, te), mean, std = standardise(
        torch.tensor([[1.0, 5.0], [3.0, 5.0]]), torch.tensor([[5.0, 6.0]])
    )
    assert tr.tolist() == [[-1.0, 0.0], [1.0, 0.0]] and te.tolist() == [[3.0, 1.0]]
    assert mean.tolist() == [2.0, 5.0] and std.tolist() == [1.0, 1.0]  # constant column: std 1
