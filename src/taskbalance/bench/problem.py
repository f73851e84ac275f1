"""A problem: what the benchmark harness trains on, a built-in data set or the user's own.

The API in short (docs/problems.md has a complete example)::

    Problem(
        name="wine",
        tasks=(Task("alcohol", loss=F.mse_loss, metric=mae, higher_is_better=False), ...),
        train=train_set, val=val_set, test=test_set,      # torch Datasets
        model=make_model,                                 # make_model(tasks) -> nn.Module
        collate=None,                                     # default: torch's default_collate
    )

* **Data.** ``train``, ``val`` and ``test`` are ordinary :class:`torch.utils.data.Dataset`
  objects whose items are ``(inputs, {task: target})``. Inputs may be a tensor, a tuple or a
  dict of tensors, anything ``collate`` (default :func:`torch.utils.data.default_collate`)
  turns a list of items into a batch of; targets may have any shape (a per-pixel label map is a
  target like any other). A dataset may also offer ``batch(index)``, which returns the
  collated batch of the rows ``index`` (an int64 tensor) at once; the harness then uses it
  instead of one ``__getitem__`` per row (the built-in data sets do).
* **Multi-input problems** (one data set per task, as Office-31): ``train``, ``val`` and
  ``test`` are ``{task: Dataset}`` whose items are ``(inputs, target)``. Every step draws one
  batch per task and takes task ``t``'s output of the model on ``t``'s batch. Such problems
  train at parameter level: each task's representation comes from its own inputs, so there is
  no single representation for a feature-level method to work on, and one is refused.
* **Model.** ``model(tasks)`` builds a fresh model for the task names ``tasks`` (all of them,
  or one for a single-task baseline); the harness seeds torch before calling it. The module
  must have a ``trunk`` attribute holding every shared parameter (and only those: the
  ``shared=`` of parameter-level methods), and ``forward(inputs)`` must return
  ``(z, {task: output})`` where ``z`` is the shared representation the outputs were computed
  from (a tensor or a tuple of tensors: the ``features=`` of feature-level methods).
  :class:`SharedBottom` builds one from a trunk and one head per task.
* **Per task** (:class:`Task`): ``loss(output, target)`` returns a scalar tensor (the training
  loss of a batch); ``metric`` scores a whole split, and ``higher_is_better`` says which way is
  better (the table's arrows and Delta m's signs). ``metric`` is either

  - a callable ``metric(outputs, targets) -> float``, called once on the split's outputs and
    targets concatenated over the evaluation batches (exact for any metric, an AUC included,
    at the cost of keeping the split's outputs; the validation loss is then computed on the
    same concatenation), or
  - an accumulator: an object with ``update(output, target)`` and ``compute()`` (a number or a
    0-d tensor), such as a ``torchmetrics`` metric or a confusion matrix for a per-pixel mIoU.
    It is copied fresh for every evaluation, updated batch by batch and computed at the end;
    nothing is kept per batch, and the validation loss is the mean of the batch losses
    weighted by their rows.

  **Several metrics per task** (NYUv2's normals: mean and median angle, three threshold
  shares): give ``higher_is_better`` as ``{metric: bool}``; ``metric`` (callable or
  ``compute()``) then returns ``{metric: number}`` with exactly those names. Results, tables
  and Delta m key such a task's values ``"task/metric"`` (:attr:`Task.metric_keys`); a task
  with one metric keeps the key ``"task"``. Delta m averages over every metric of every task.

Errors in a problem (two tasks with one name, a missing data set, a model without ``trunk``)
are one line naming what is wrong, raised by :func:`check_problem` before anything trains.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

Batch = Any
"""A collated batch: ``(inputs, {task: target})``, or ``(inputs, target)`` for one task of a
multi-input problem."""


@runtime_checkable
class Accumulator(Protocol):
    """A metric over a whole split, fed batch by batch (a ``torchmetrics`` metric is one)."""

    def update(self, output: Tensor, target: Tensor) -> None:
        """Take one batch's model output and target."""

    def compute(self) -> float | Tensor:
        """The metric over every batch given so far."""


class Concatenated:
    """An :class:`Accumulator` that keeps every batch (on the CPU) and calls ``fn`` once on the
    concatenations: the form a plain metric callable is evaluated in.

    >>> acc = Concatenated(lambda out, y: float((out - y).abs().max()))
    >>> acc.update(torch.zeros(2), torch.tensor([1.0, 3.0])); acc.update(torch.zeros(1),
    ...     torch.tensor([2.0]))
    >>> acc.compute()
    3.0
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], float | Tensor]) -> None:
        self.fn = fn
        self.outputs: list[Tensor] = []
        self.targets: list[Tensor] = []

    def update(self, output: Tensor, target: Tensor) -> None:
        """Keep a CPU copy of the batch."""
        self.outputs.append(output.detach().cpu())
        self.targets.append(target.detach().cpu())

    def compute(self) -> float | Tensor:
        """``fn`` of the concatenated outputs and targets."""
        if not self.outputs:
            raise ValueError("no batch to compute a metric on")
        return self.fn(torch.cat(self.outputs), torch.cat(self.targets))


class BatchMean:
    """An :class:`Accumulator` for a per-row mean (a loss with mean reduction, a per-pixel
    error): the batches' values of ``fn`` weighted by their rows (``output.shape[0]``).

    >>> acc = BatchMean(lambda out, y: (out - y).abs().mean())
    >>> acc.update(torch.zeros(3), torch.ones(3)); acc.update(torch.zeros(1), torch.full((1,), 5.0))
    >>> acc.compute()
    2.0
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], float | Tensor]) -> None:
        self.fn = fn
        self.total = 0.0
        self.rows = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        """Add the batch's value times its rows."""
        rows = output.shape[0] if output.dim() else 1
        self.total += float(self.fn(output, target)) * rows
        self.rows += rows

    def compute(self) -> float:
        """The row-weighted mean."""
        if self.rows == 0:
            raise ValueError("no batch to compute a mean on")
        return self.total / self.rows


@dataclass(frozen=True)
class Task:
    """One task: its training loss, the metric that scores it and which way is better.

    Args:
        name: the task's name (the key of its target and output).
        loss: ``loss(output, target) -> scalar tensor`` on one batch.
        metric: a callable ``metric(outputs, targets) -> float`` over the whole split, or an
            :class:`Accumulator` (e.g. a ``torchmetrics`` metric) copied fresh for every
            evaluation; see the module docstring.
        higher_is_better: whether a larger metric is better; or, for a task scored by several
            metrics, ``{metric: bool}`` in table order (``metric`` then computes ``{metric:
            number}`` with those names).
        metric_name: the metric's name in tables and files (e.g. ``"mae"``) when there is one.
        unit: the metric's unit, shown in the table header (optional; one metric only).

    >>> from torch.nn import functional as F
    >>> t = Task("y", F.mse_loss, lambda out, y: float((out - y).abs().mean()), False, "mae")
    >>> acc = t.accumulator(); acc.update(torch.zeros(2), torch.ones(2)); acc.compute()
    1.0
    >>> two = Task("y", F.mse_loss, lambda o, y: {}, {"mae": False, "r2": True})
    >>> two.metric_keys, two.values({"mae": 1.0, "r2": 0.5})
    (('y/mae', 'y/r2'), {'y/mae': 1.0, 'y/r2': 0.5})
    """

    name: str
    loss: Callable[[Any, Any], Tensor]
    metric: Callable[[Any, Any], float | Tensor | Mapping[str, float]] | Accumulator
    higher_is_better: bool | Mapping[str, bool]
    metric_name: str = "metric"
    unit: str = ""

    @property
    def multi_metric(self) -> bool:
        """Whether the task reports several named metrics (``higher_is_better`` a mapping)."""
        return isinstance(self.higher_is_better, Mapping)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The names of the task's metrics, in table order."""
        if isinstance(self.higher_is_better, Mapping):
            return tuple(self.higher_is_better)
        return (self.metric_name,)

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """The keys of the task's values in results: ``name``, or ``name/metric`` per metric
        of a multi-metric task."""
        if not self.multi_metric:
            return (self.name,)
        return tuple(f"{self.name}/{m}" for m in self.metric_names)

    @property
    def directions(self) -> dict[str, bool]:
        """``{key: higher_is_better}`` over :attr:`metric_keys`."""
        if isinstance(self.higher_is_better, Mapping):
            return dict(zip(self.metric_keys, self.higher_is_better.values(), strict=True))
        return {self.name: self.higher_is_better}

    def metric_of(self, key: str) -> str:
        """The name of the metric stored under ``key`` (one of :attr:`metric_keys`)."""
        return dict(zip(self.metric_keys, self.metric_names, strict=True))[key]

    def values(self, computed: Any) -> dict[str, float]:
        """The metric's computed value(s) keyed by :attr:`metric_keys`. A multi-metric task
        must compute a mapping with exactly its metric names (else a one-line ``ValueError``)."""
        if not self.multi_metric:
            return {self.name: metric_value(computed)}
        names = self.metric_names
        if not isinstance(computed, Mapping) or set(computed) != set(names):
            got = sorted(computed) if isinstance(computed, Mapping) else type(computed).__name__
            raise ValueError(f"task {self.name!r}: metric must compute {{metric: value}} for "
                             f"{list(names)}, got {got}")  # fmt: skip
        return {k: metric_value(computed[m]) for k, m in zip(self.metric_keys, names, strict=True)}

    @property
    def accumulates(self) -> bool:
        """Whether ``metric`` is an accumulator (updated per batch) rather than a callable on
        the concatenated split."""
        return hasattr(self.metric, "update") and hasattr(self.metric, "compute")

    def accumulator(self, device: torch.device | str | None = None) -> Accumulator:
        """A fresh accumulator of this task's metric (on ``device`` when it is a module)."""
        if not self.accumulates:
            return Concatenated(self.metric)  # type: ignore[arg-type]
        fresh = copy.deepcopy(self.metric)
        if hasattr(fresh, "reset"):
            fresh.reset()
        if device is not None and isinstance(fresh, nn.Module):
            fresh = fresh.to(device)
        return fresh  # type: ignore[return-value]

    def loss_accumulator(self) -> Accumulator:
        """How evaluation accumulates the loss: on the concatenated split when the metric keeps
        the outputs anyway, else as a row-weighted mean of batch losses."""
        return BatchMean(self.loss) if self.accumulates else Concatenated(self.loss)


def metric_value(value: float | Tensor) -> float:
    """A metric's computed value as a Python float (a 0-d or one-element tensor included).

    >>> metric_value(torch.tensor(0.5)), metric_value(2)
    (0.5, 2.0)
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"a metric must compute one number, got shape {tuple(value.shape)}")
        return float(value.detach().cpu())
    return float(value)


Splits = Dataset | Mapping[str, Dataset]


@dataclass(frozen=True)
class Problem:
    """A multi-task problem: tasks, train / val / test data and a model factory (see the module
    docstring for each field's contract).

    Args:
        name: shown in reports and output paths.
        tasks: the :class:`Task` objects, in table order.
        train, val, test: a Dataset each (items ``(inputs, {task: target})``), or for a
            multi-input problem ``{task: Dataset}`` each (items ``(inputs, target)``).
        model: ``model(tasks: tuple[str, ...]) -> nn.Module``.
        collate: turns a list of items into a batch (default ``default_collate``).
        description, licence: what the data are and their terms, for the report.
        eval_batch_size: rows per evaluation batch (default: the run's, 4096).
        fingerprint: a string that changes whenever the data change; checkpoints carry it so
            that ``--resume`` never continues a run on other data. Default: a digest of the
            name, the tasks and the split sizes.

    >>> from torch.nn import functional as F
    >>> x = torch.randn(8, 3)
    >>> data = TensorData(x, {"a": x[:, 0], "b": x[:, 1]})
    >>> tasks = [Task(t, F.mse_loss, lambda o, y: float((o - y).abs().mean()), False) for t in "ab"]
    >>> def model(names):
    ...     return SharedBottom(nn.Linear(3, 4), {t: nn.Linear(4, 1) for t in names})
    >>> problem = Problem("toy", tuple(tasks), data, data, data, model)
    >>> check_problem(problem).task_names, problem.multi_input
    (('a', 'b'), False)
    """

    name: str
    tasks: tuple[Task, ...]
    train: Splits
    val: Splits
    test: Splits
    model: Callable[[tuple[str, ...]], nn.Module]
    collate: Callable[[list[Any]], Batch] | None = None
    description: str = ""
    licence: str = ""
    eval_batch_size: int | None = None
    fingerprint: str | None = None

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names, in order."""
        return tuple(t.name for t in self.tasks)

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """Every task's :attr:`Task.metric_keys`, in order: the columns of the table and the
        terms of Delta m."""
        return tuple(k for t in self.tasks for k in t.metric_keys)

    @property
    def directions(self) -> dict[str, bool]:
        """``{metric key: higher_is_better}`` over :attr:`metric_keys`."""
        return {k: v for t in self.tasks for k, v in t.directions.items()}

    def metric_task(self, key: str) -> Task:
        """The :class:`Task` whose value is stored under the metric key ``key``."""
        for task in self.tasks:
            if key in task.metric_keys:
                return task
        raise KeyError(f"no metric {key!r}; metrics are {self.metric_keys}")

    def metric_label(self, key: str) -> str:
        """``key`` as tables and plots name it: ``"task metric"`` (with the unit in brackets
        for a single-metric task that has one)."""
        task = self.metric_task(key)
        unit = f" [{task.unit}]" if task.unit and not task.multi_metric else ""
        return f"{task.name} {task.metric_of(key)}{unit}"

    @property
    def multi_input(self) -> bool:
        """One data set per task (``train`` is a mapping)."""
        return isinstance(self.train, Mapping)

    def task(self, name: str) -> Task:
        """The :class:`Task` called ``name`` (``KeyError`` naming the tasks if none)."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r}; tasks are {self.task_names}")

    def split(self, name: str, task: str | None = None) -> Dataset:
        """The data set of split ``name`` (``"train"``, ``"val"``, ``"test"``); for a
        multi-input problem the one of ``task``."""
        data = getattr(self, name)
        if isinstance(data, Mapping):
            if task is None:
                raise ValueError(f"{self.name} is multi-input: say which task's {name} split")
            return data[task]
        return data

    def sizes(self, name: str) -> dict[str, int]:
        """Rows of split ``name`` per task (every task the same for a single-input problem)."""
        return {t: len(self.split(name, t)) for t in self.task_names}  # type: ignore[arg-type]

    @property
    def key(self) -> str:
        """:attr:`fingerprint`, or a digest of the name, the tasks and the split sizes."""
        if self.fingerprint is not None:
            return self.fingerprint
        sizes = [self.sizes(s) for s in ("train", "val", "test")]
        text = repr((self.name, self.task_names, sizes))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class TensorData(Dataset):
    """A data set of tensors whose first dimension indexes rows: items ``(inputs[i], {task:
    targets[task][i]})`` (``inputs`` a tensor, or a tuple of tensors giving tuples), with a
    vectorised ``batch(index)``. For a multi-input problem's task, pass one target tensor:
    items are then ``(inputs[i], targets[i])``.

    >>> data = TensorData(torch.arange(6.0).view(3, 2), {"y": torch.tensor([0, 1, 2])})
    >>> len(data), data[1]
    (3, (tensor([2., 3.]), {'y': tensor(1)}))
    >>> data.batch(torch.tensor([2, 0]))[1]["y"]
    tensor([2, 0])
    """

    def __init__(self, inputs: Tensor | tuple[Tensor, ...], targets: Tensor | Mapping[str, Tensor]):
        self.inputs = inputs
        self.targets = targets if isinstance(targets, Tensor) else dict(targets)
        parts = inputs if isinstance(inputs, tuple) else (inputs,)
        labels = [targets] if isinstance(targets, Tensor) else list(self.targets.values())
        lengths = {t.shape[0] for t in [*parts, *labels]}
        if len(lengths) != 1:
            raise ValueError(
                f"inputs and targets disagree on the number of rows: {sorted(lengths)}"
            )
        self.n = lengths.pop()

    def __len__(self) -> int:
        return self.n

    def _take(self, index: Any) -> tuple[Any, Any]:
        inputs = (
            tuple(t[index] for t in self.inputs)
            if isinstance(self.inputs, tuple)
            else self.inputs[index]
        )
        if isinstance(self.targets, Tensor):
            return inputs, self.targets[index]
        return inputs, {k: v[index] for k, v in self.targets.items()}

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return self._take(i)

    def batch(self, index: Tensor) -> tuple[Any, Any]:
        """The rows ``index`` as one batch (what ``default_collate`` of the items gives)."""
        return self._take(index)


def _problem_error(problem: Problem, message: str) -> ValueError:
    return ValueError(f"problem {problem.name!r}: {message}")


def check_problem(problem: Any) -> Problem:
    """Return ``problem`` if it is a well-formed :class:`Problem`, else raise ``ValueError``
    with one line naming what is wrong (no task, two tasks with one name, a split that is not
    a data set or is empty, a multi-input split without a task's data set, a loss or metric
    that is not callable). The model factory is checked by :func:`check_model` when built."""
    if not isinstance(problem, Problem):
        raise ValueError(f"expected a taskbalance Problem, got {type(problem).__name__}")
    if not problem.tasks:
        raise _problem_error(problem, "has no task")
    names = problem.task_names
    if len(set(names)) != len(names):
        raise _problem_error(problem, f"task names repeat: {list(names)}")
    for task in problem.tasks:
        if not isinstance(task, Task):
            raise _problem_error(problem, f"tasks must be Task objects, got {type(task).__name__}")
        if not callable(task.loss):
            raise _problem_error(problem, f"task {task.name!r}: loss is not callable")
        if not (task.accumulates or callable(task.metric)):
            raise _problem_error(
                problem, f"task {task.name!r}: metric is neither callable nor an accumulator"
            )
        if task.multi_metric and not task.metric_names:
            raise _problem_error(problem, f"task {task.name!r}: higher_is_better names no metric")
    keys = problem.metric_keys
    if len(set(keys)) != len(keys):
        raise _problem_error(problem, f"metric keys repeat: {list(keys)}")
    if not callable(problem.model):
        raise _problem_error(problem, "model must be a callable model(tasks) -> nn.Module")
    for split in ("train", "val", "test"):
        data = getattr(problem, split)
        if problem.multi_input != isinstance(data, Mapping):
            raise _problem_error(
                problem, "train, val and test must all be Datasets or all {task: Dataset}"
            )
        for task in names if problem.multi_input else (None,):
            if problem.multi_input and task not in data:
                raise _problem_error(problem, f"{split} has no data set for task {task!r}")
            one = problem.split(split, task)
            if not hasattr(one, "__getitem__") or not hasattr(one, "__len__"):
                raise _problem_error(problem, f"{split} is not a Dataset with a length")
            if len(one) == 0:
                raise _problem_error(
                    problem, f"{split} is empty" + (f" for {task!r}" if task else "")
                )
    return problem


def check_model(model: Any, problem: Problem) -> nn.Module:
    """Return ``model`` if it fits the contract of :attr:`Problem.model` for ``problem``, else
    raise a one-line ``ValueError``."""
    if not isinstance(model, nn.Module):
        raise _problem_error(problem, f"model(tasks) returned {type(model).__name__}, "
                                      "not an nn.Module")  # fmt: skip
    if not isinstance(getattr(model, "trunk", None), nn.Module):
        raise _problem_error(problem, "the model needs a 'trunk' module holding the shared "
                                      "parameters")  # fmt: skip
    return model


class SharedBottom(nn.Module):
    """A model of the :attr:`Problem.model` contract from a shared ``trunk`` and one head per
    task: ``forward(inputs) = (z, {task: heads[task](z)})`` with ``z = trunk(inputs)``.

    Args:
        trunk: the shared part (every shared parameter).
        heads: ``{task: module}``.
        squeeze: drop a last dimension of size 1 from the heads' outputs (a regression or
            binary head ``(B, 1)`` gives ``(B,)``, the shape of its targets).

    >>> model = SharedBottom(nn.Linear(3, 4), {"a": nn.Linear(4, 1)})
    >>> z, out = model(torch.zeros(2, 3))
    >>> z.shape, out["a"].shape
    (torch.Size([2, 4]), torch.Size([2]))
    """

    def __init__(
        self, trunk: nn.Module, heads: Mapping[str, nn.Module], squeeze: bool = True
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))
        self.squeeze = squeeze

    def head(self, task: str, z: Any) -> Tensor:
        """Task ``task``'s output on the representation ``z``."""
        out = self.heads[task](z)
        return out.squeeze(-1) if self.squeeze and out.dim() > 1 and out.shape[-1] == 1 else out

    def forward(self, inputs: Any) -> tuple[Any, dict[str, Tensor]]:
        """``(z, {task: output})``."""
        z = self.trunk(inputs)
        return z, {t: self.head(t, z) for t in self.heads}


def features(z: Any) -> Tensor | tuple[Tensor, ...]:
    """The tensors of a representation ``z`` (a tensor or a tuple) that depend on trainable
    parameters: what feature-level methods take as ``features=``.

    >>> a, b = torch.zeros(1), torch.zeros(1, requires_grad=True)
    >>> len(features((a, b)))
    1
    """
    if isinstance(z, Tensor):
        return z
    return tuple(part for part in z if isinstance(part, Tensor) and part.requires_grad)


def fetch(dataset: Dataset, index: Tensor, collate: Callable[[list[Any]], Batch] | None) -> Batch:
    """The collated batch of rows ``index`` (int64) of ``dataset``: its ``batch(index)`` when it
    has one, else ``collate([dataset[i] for i in index])``.

    >>> from torch.utils.data import TensorDataset
    >>> fetch(TensorDataset(torch.arange(5.0)), torch.tensor([4, 0]), None)
    [tensor([4., 0.])]
    """
    if hasattr(dataset, "batch"):
        return dataset.batch(index)
    return (collate or default_collate)([dataset[int(i)] for i in index])


def to_device(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """``batch`` (tensors in tuples, lists and dicts, at any depth) on ``device``; floating
    tensors also cast to ``dtype`` when given. Other objects pass through.

    >>> to_device({"x": (torch.zeros(1, dtype=torch.float64), 3)}, torch.device("cpu"),
    ...           torch.float32)
    {'x': (tensor([0.]), 3)}
    """
    if isinstance(batch, Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(v, device, dtype) for v in batch)
    return batch


def rows(batch_size: int, n: int) -> Sequence[tuple[int, int]]:
    """``(start, stop)`` of consecutive evaluation batches over ``n`` rows.

    >>> rows(4, 10)
    [(0, 4), (4, 8), (8, 10)]
    """
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def finite(values: Mapping[str, float]) -> bool:
    """Whether every value is finite."""
    return all(math.isfinite(v) for v in values.values())


def parse_value(text: str) -> Any:
    """A command-line value: int, float, true/false, none, or else the string itself.

    >>> [parse_value(v) for v in ("3", "0.5", "True", "none", "abc")]
    [3, 0.5, True, None, 'abc']
    """
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_arguments(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` as ``{key: value}`` (values as :func:`parse_value` reads them).

    >>> parse_arguments(["rows=300", "name=wine"])
    {'rows': 300, 'name': 'wine'}
    """
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


#: Problems shipped with taskbalance, by short name (``--problem nyuv2 root=DIR``).
NAMED_PROBLEMS: dict[str, str] = {
    name: f"taskbalance.bench.dense.problems:{name}"
    for name in ("nyuv2", "cityscapes", "dense_multi_mnist")
}


def load_problem(entry: str, arguments: Mapping[str, Any] | None = None) -> Problem:
    """Import ``module:factory`` (or a name of :data:`NAMED_PROBLEMS`), call
    ``factory(**arguments)`` and return the checked :class:`Problem` it makes. Every failure is
    a one-line ``ValueError`` naming the entry point and what is wrong (a malformed entry point,
    a module that does not import, no such factory, arguments it refuses, a result that is not
    a well-formed Problem).

    >>> load_problem("taskbalance.bench.problem:nothing")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --problem ...:nothing: module taskbalance.bench.problem has no attribute 'nothing'
    """
    import importlib

    where = f"--problem {entry}"
    module_name, colon, attribute = NAMED_PROBLEMS.get(entry, entry).partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"{where}: expected module:factory (e.g. mypackage.data:make_problem) "
                         f"or one of {', '.join(NAMED_PROBLEMS)}")  # fmt: skip
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module: any import-time error is theirs to see
        raise ValueError(
            f"{where}: cannot import {module_name} ({type(error).__name__}: {error})"
        ) from None
    factory = getattr(module, attribute, None)
    if factory is None:
        raise ValueError(f"{where}: module {module_name} has no attribute {attribute!r}")
    if not callable(factory):
        raise ValueError(f"{where}: {attribute} is a {type(factory).__name__}, not a callable")
    try:
        problem = factory(**dict(arguments or {}))
    except TypeError as error:
        raise ValueError(f"{where}: {error}") from None
    try:
        return check_problem(problem)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


@dataclass(frozen=True)
class ProblemRef:
    """A problem by its entry point and arguments: what worker processes and other machines
    receive to rebuild the problem themselves (a Problem may hold closures that do not
    pickle).

    >>> ProblemRef("taskbalance.bench.problem:nothing", {}).entry
    'taskbalance.bench.problem:nothing'
    """

    entry: str
    arguments: Mapping[str, Any]

    def load(self) -> Problem:
        """:func:`load_problem` of this entry point and arguments."""
        return load_problem(self.entry, self.arguments)
