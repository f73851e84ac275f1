"""The built-in data sets as problems: a :class:`~taskbalance.bench.data.types.MultiTaskData`
becomes a :class:`~taskbalance.bench.problem.Problem` like any user's, so the harness has one
path for both.

What the conversion fixes, the choices the built-in benchmark has always made:

* data: each split is a :class:`~taskbalance.bench.problem.TensorData` with inputs ``x`` (or
  ``(x, x_cat)`` when the data set has categorical columns) and every task's labels;
* model: :func:`taskbalance.bench.models.build_model` of the architecture and its options;
* per task: the loss :func:`taskbalance.bench.metrics.task_loss` (with the regression loss
  chosen) and the metric :func:`taskbalance.bench.metrics.task_metric` (accuracy, AUC or the
  MAE in original units), both on the concatenated split, as before the plug-in existed;
* fingerprint: the data's own, so checkpoints written before the plug-in still resume.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from torch import nn

from taskbalance.bench.data.types import MultiTaskData, Split
from taskbalance.bench.metrics import HIGHER_IS_BETTER, RegressionLoss, task_loss, task_metric
from taskbalance.bench.models import build_model
from taskbalance.bench.problem import Problem, Task, TensorData


def _dataset(split: Split) -> TensorData:
    inputs = split.x if split.x_cat is None else (split.x, split.x_cat)
    return TensorData(inputs, split.y)


def _model(
    arch: str, data: MultiTaskData, options: Mapping[str, int], tasks: Sequence[str]
) -> nn.Module:
    return build_model(arch, data, tasks, options)


def builtin_problem(
    data: MultiTaskData,
    arch: str = "hps",
    model_options: Mapping[str, int] | None = None,
    regression_loss: RegressionLoss = "mse",
) -> Problem:
    """``data`` as a :class:`Problem` trained with the architecture ``arch`` (see the module
    docstring). Everything in it pickles (worker processes receive it whole).

    >>> import torch
    >>> from taskbalance.bench.data.types import Split, TaskSpec
    >>> s = Split(torch.zeros(4, 3), {"y": torch.zeros(4)})
    >>> d = MultiTaskData("toy", (TaskSpec("y", "regression", 1, "mae", False),), s, s, s, "", "")
    >>> p = builtin_problem(d, model_options={"hidden": 8})
    >>> p.task("y").metric_name, p.key == d.fingerprint, type(p.model(("y",))).__name__
    ('mae', True, 'MLPSharedBottom')
    """
    stats = dict(data.target_stats)
    tasks = tuple(
        Task(
            spec.name,
            functools.partial(task_loss, spec, regression=regression_loss),
            functools.partial(task_metric, spec, target_stats=stats),
            HIGHER_IS_BETTER[spec.metric],
            spec.metric,
            spec.unit,
        )
        for spec in data.tasks
    )
    return Problem(
        name=data.name,
        tasks=tasks,
        train=_dataset(data.train),
        val=_dataset(data.val),
        test=_dataset(data.test),
        model=functools.partial(_model, arch, data, dict(model_options or {})),
        description=data.description,
        licence=data.licence,
        fingerprint=data.fingerprint,
    )
