"""Two problems on data that are not built in, written as a user would write their own
(docs/problems.md shows this file): ``taskbalance bench --problem
taskbalance.bench.examples:wine_problem`` or ``...:digit_domains_problem``.

* :func:`wine_problem`: scikit-learn's bundled Wine data (178 wines, 13 chemical
  measurements; Forina et al., UCI) as three tasks on one input: the cultivar (3 classes,
  accuracy), and two measurements left out of the inputs, alcohol and colour intensity
  (regression, MAE in the data's units).
* :func:`digit_domains_problem`: a multi-input problem, one data set per task (as Office-31's
  domains): scikit-learn's bundled 8x8 digits, task ``low`` classifies the images of 0-4 and
  task ``high`` those of 5-9, each from its own images, through one shared trunk.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from taskbalance.bench.problem import Problem, SharedBottom, Task, TensorData

#: Wine's columns predicted rather than read: name -> column index.
WINE_TARGETS = {"alcohol": 0, "color": 9}


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """The fraction of rows whose argmax logit is the label.

    >>> accuracy(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    0.5
    """
    return float((logits.argmax(-1) == labels).double().mean())


def mae(predictions: Tensor, targets: Tensor) -> float:
    """Mean absolute error.

    >>> mae(torch.zeros(2), torch.tensor([1.0, 3.0]))
    2.0
    """
    return float((predictions - targets).abs().double().mean())


def _cut(n: int, seed: int, val: float = 0.2, test: float = 0.2) -> tuple[Tensor, ...]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = int(n * val), int(n * test)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


class MLPModel:
    """The model factory of both examples: a two-layer MLP trunk of width ``hidden`` and a
    linear head per task (``outputs[task]`` values). A class rather than a closure, so that
    the problem pickles (``--jobs`` sends it to worker processes).

    >>> z, out = MLPModel(4, 8, {"a": 3, "b": 1})(("a", "b"))(torch.zeros(2, 4))
    >>> z.shape, out["a"].shape, out["b"].shape
    (torch.Size([2, 8]), torch.Size([2, 3]), torch.Size([2]))
    """

    def __init__(self, inputs: int, hidden: int, outputs: dict[str, int]) -> None:
        self.inputs, self.hidden, self.outputs = inputs, hidden, dict(outputs)

    def __call__(self, tasks: tuple[str, ...]) -> nn.Module:
        """A fresh model with a head for each of ``tasks``."""
        h = self.hidden
        trunk = nn.Sequential(nn.Linear(self.inputs, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        return SharedBottom(trunk, {t: nn.Linear(h, self.outputs[t]) for t in tasks})


def _standardise(x: Tensor, train: Tensor) -> Tensor:
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    return (x - mean) / std


def wine_problem(hidden: int = 32, seed: int = 0) -> Problem:
    """Wine as three tasks on one input (see the module docstring): a seeded 60 / 20 / 20 %
    split, inputs standardised with training statistics.

    >>> p = wine_problem()
    >>> p.task_names, len(p.train), len(p.val), len(p.test)
    (('cultivar', 'alcohol', 'color'), 108, 35, 35)
    """
    from sklearn.datasets import load_wine

    wine = load_wine()
    data = torch.tensor(wine.data, dtype=torch.float32)
    kept = [j for j in range(data.shape[1]) if j not in WINE_TARGETS.values()]
    train, val, test = _cut(len(data), seed)
    x = _standardise(data[:, kept], train)
    y = {"cultivar": torch.tensor(wine.target), **{t: data[:, j] for t, j in WINE_TARGETS.items()}}

    def split(index: Tensor) -> TensorData:
        return TensorData(x[index], {t: v[index] for t, v in y.items()})

    tasks = (
        Task("cultivar", F.cross_entropy, accuracy, True, "accuracy"),
        Task("alcohol", F.mse_loss, mae, False, "mae", "% vol"),
        Task("color", F.mse_loss, mae, False, "mae"),
    )
    return Problem(
        name="wine",
        tasks=tasks,
        train=split(train),
        val=split(val),
        test=split(test),
        model=MLPModel(len(kept), hidden, {"cultivar": 3, "alcohol": 1, "color": 1}),
        description="scikit-learn's Wine data (Forina et al., UCI): the cultivar, alcohol and "
        "colour intensity of 178 wines from 11 other chemical measurements.",
        licence="UCI Machine Learning Repository (CC BY 4.0)",
    )


def digit_domains_problem(hidden: int = 32, seed: int = 0) -> Problem:
    """scikit-learn's 8x8 digits as a multi-input problem (see the module docstring): task
    ``low`` (digits 0-4) and task ``high`` (digits 5-9, labelled 0-4) each with its own
    seeded 60 / 20 / 20 % split of its own images.

    >>> p = digit_domains_problem()
    >>> p.multi_input, {t: len(d) for t, d in p.train.items()}
    (True, {'low': 541, 'high': 538})
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    splits: dict[str, dict[str, TensorData]] = {"train": {}, "val": {}, "test": {}}
    for task, low in (("low", 0), ("high", 5)):
        rows = torch.nonzero((labels >= low) & (labels < low + 5)).squeeze(1)
        for name, index in zip(splits, _cut(len(rows), seed), strict=True):
            splits[name][task] = TensorData(images[rows[index]], labels[rows[index]] - low)
    return Problem(
        name="digit_domains",
        tasks=tuple(Task(t, F.cross_entropy, accuracy, True, "accuracy") for t in ("low", "high")),
        model=MLPModel(64, hidden, {"low": 5, "high": 5}),
        description="scikit-learn's 8x8 digits (UCI), one data set per task: 0-4 and 5-9.",
        licence="UCI Machine Learning Repository (CC BY 4.0)",
        **splits,
    )
