"""The one structure every dataset loader returns: :class:`MultiTaskData`.

Conventions shared by all loaders:

* ``x`` is a float32 tensor whose first dimension indexes samples (images are ``(N, 1, 28, 28)``,
  tabular data ``(N, D)``); ``x_cat`` is an optional int64 tensor ``(N, C)`` of category indices
  for models with embeddings, column ``j`` described by the ``j``-th item of
  ``MultiTaskData.cat_cardinalities``.
* ``y`` maps each task name to a tensor of length ``N``: int64 class indices for ``"multiclass"``,
  float32 0/1 for ``"binary"``, float32 values for ``"regression"``.
* A label equal to ``TaskSpec.missing_label`` means "not defined for this sample" (MovieLens'
  "like" on unrated impressions); losses and metrics must skip those samples.
* Regression targets are standardised with training statistics; ``target_stats[name]`` holds the
  ``(mean, std)`` used, so an error in original units is ``error * std``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

TaskKind = Literal["multiclass", "binary", "regression"]
Metric = Literal["accuracy", "auc", "mae"]


@dataclass(frozen=True)
class TaskSpec:
    """What one task predicts and how it is scored.

    Example:
        >>> TaskSpec("income", "binary", 1, "auc", True).higher_is_better
        True
    """

    name: str
    kind: TaskKind
    num_outputs: int  # logits for multiclass, 1 for binary and regression
    metric: Metric
    higher_is_better: bool
    missing_label: float | None = None
    unit: str = ""  # physical unit of a regression target (before standardisation)


@dataclass(frozen=True)
class Split:
    """One split (train, val or test): inputs and one label tensor per task.

    Example:
        >>> s = Split(torch.zeros(3, 2), {"a": torch.zeros(3)})
        >>> len(s)
        3
    """

    x: Tensor
    y: Mapping[str, Tensor]
    x_cat: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        lengths = {k: v.shape[0] for k, v in self.y.items()}
        if any(m != n for m in lengths.values()) or (
            self.x_cat is not None and self.x_cat.shape[0] != n
        ):
            raise ValueError(f"split lengths disagree: x has {n} rows, labels {lengths}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: Tensor) -> Split:
        """Return the rows ``index`` of this split (a new :class:`Split`)."""
        x_cat = None if self.x_cat is None else self.x_cat[index]
        return Split(self.x[index], {k: v[index] for k, v in self.y.items()}, x_cat)


@dataclass(frozen=True)
class MultiTaskData:
    """A multi-task dataset with fixed train / validation / test splits.

    ``description`` says how the data were built (and from which source), ``licence`` the terms
    of the underlying data.

    Example:
        >>> tasks = (TaskSpec("t", "regression", 1, "mae", False),)
        >>> s = Split(torch.zeros(2, 1), {"t": torch.zeros(2)})
        >>> MultiTaskData("toy", tasks, s, s, s, "toy data", "none").task_names
        ('t',)
    """

    name: str
    tasks: tuple[TaskSpec, ...]
    train: Split
    val: Split
    test: Split
    description: str
    licence: str
    cat_cardinalities: Mapping[str, int] = field(default_factory=dict)
    target_stats: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names, in order."""
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> TaskSpec:
        """Return the :class:`TaskSpec` called ``name`` (KeyError if there is none)."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r}; tasks are {self.task_names}")

    @cached_property
    def fingerprint(self) -> str:
        """A sha256 (hex, 16 characters) of the tasks and every split's inputs and labels:
        equal only for the same rows in the same order. Benchmark checkpoints carry it, so a
        run is never resumed on other data (another training size, split or data set).

        Example:
            >>> tasks = (TaskSpec("t", "regression", 1, "mae", False),)
            >>> s = Split(torch.zeros(2, 1), {"t": torch.zeros(2)})
            >>> a = MultiTaskData("toy", tasks, s, s, s, "", "")
            >>> b = MultiTaskData("toy", tasks, s, s, s.subset(torch.tensor([0])), "", "")
            >>> a.fingerprint == b.fingerprint
            False
        """
        digest = hashlib.sha256(repr((self.name, self.tasks)).encode())
        for split in (self.train, self.val, self.test):
            tensors = [split.x, *(split.y[t] for t in self.task_names)]
            if split.x_cat is not None:
                tensors.append(split.x_cat)
            for tensor in tensors:
                digest.update(repr((tensor.dtype, tuple(tensor.shape))).encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def split_indices(n: int, sizes: tuple[int, ...], seed: int) -> tuple[Tensor, ...]:
    """Cut a seeded permutation of ``range(n)`` into consecutive, disjoint pieces of ``sizes``.

    Returns one int64 index tensor per size. Deterministic for a given ``(n, sizes, seed)``.

    Example:
        >>> a, b = split_indices(10, (8, 2), seed=0)
        >>> sorted(torch.cat([a, b]).tolist()) == list(range(10))
        True
    """
    if sum(sizes) > n or min(sizes, default=0) < 0:
        raise ValueError(f"cannot cut {n} items into pieces of {sizes}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return tuple(torch.split(perm[: sum(sizes)], list(sizes)))


def standardise(train: Tensor, *others: Tensor) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """Standardise columns with the mean and std of ``train`` only (no test statistics leak).

    Returns ``((train_z, *others_z), mean, std)``; constant columns get std 1.

    Example:
        >>> (z,), mean, std = standardise(torch.tensor([[1.0], [3.0]]))
        >>> z.squeeze().tolist(), mean.item()
        ([-1.0, 1.0], 2.0)
    """
    mean = train.mean(0)
    std = train.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple((t - mean) / std for t in (train, *others)), mean, std
