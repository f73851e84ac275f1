"""Per-task metrics (accuracy, AUC, MAE), the training losses, and Delta m %.

Metrics (each knows whether higher is better, ``HIGHER_IS_BETTER``):

* ``accuracy``: the fraction of argmax predictions equal to the label (multiclass).
* ``auc``: scikit-learn's ``roc_auc_score`` of the logits; rows whose label is the task's
  ``missing_label`` are skipped (MovieLens' "like" on unrated impressions).
* ``mae``: mean absolute error in the target's ORIGINAL units: the loaders standardise
  regression targets, so the error is multiplied by the training std in
  ``MultiTaskData.target_stats`` (a pure scale: the mean cancels in a difference).

Delta m % (Maninis et al. 2019; Vandenhende et al. 2021; the form used by Nash-MTL and FAMO):

    Delta m = (1 / K) sum_k (-1)^{h_k} (M_k - B_k) / B_k * 100

over the K metrics of all tasks (one per task, or several for a task scored by several
metrics: NYUv2's nine), ``h_k = 1`` when higher is better, ``B_k`` the single-task baseline's
value under the same protocol and seed. Lower is better; negative beats single-task learning.

Training losses (:func:`task_loss`): cross-entropy (multiclass), BCE with logits averaged over
the non-missing rows (binary), and mean squared error (default) or L1 on the standardised
targets (regression).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from taskbalance.bench.data.types import TaskSpec

RegressionLoss = Literal["mse", "l1"]
#: Whether a larger value of each metric is better.
HIGHER_IS_BETTER: dict[str, bool] = {"accuracy": True, "auc": True, "mae": False}


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """The fraction of rows whose argmax logit is the label.

    >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
    0.6666666666666666
    """
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    return float((logits.argmax(dim=-1) == labels).double().mean())


def auc(scores: Tensor, labels: Tensor, missing_label: float | None = None) -> float:
    """ROC AUC (scikit-learn) of ``scores`` against 0/1 ``labels``, skipping missing labels.

    Raises ``ValueError`` when the kept labels contain a single class (AUC is undefined).

    >>> auc(torch.tensor([0.1, 0.9, 0.4, 5.0]), torch.tensor([0.0, 1.0, 1.0, -1.0]), -1.0)
    1.0
    """
    from sklearn.metrics import roc_auc_score

    keep = _kept(labels, missing_label)
    y = labels[keep].double().cpu().numpy()
    if len(set(y.tolist())) < 2:
        raise ValueError("AUC needs both classes among the labelled rows")
    return float(roc_auc_score(y, scores[keep].double().cpu().numpy()))


def mae(predictions: Tensor, targets: Tensor, scale: float = 1.0) -> float:
    """Mean absolute error, multiplied by ``scale`` (the target's std: original units).

    >>> mae(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), scale=2.0)
    1.0
    """
    if len(targets) == 0:
        raise ValueError("MAE of an empty set")
    return float((predictions.double() - targets.double()).abs().mean()) * scale


def _kept(labels: Tensor, missing_label: float | None) -> Tensor:
    if missing_label is None:
        return torch.ones_like(labels, dtype=torch.bool)
    return labels != missing_label


def task_metric(
    spec: TaskSpec,
    output: Tensor,
    target: Tensor,
    target_stats: Mapping[str, tuple[float, float]] | None = None,
) -> float:
    """The metric ``spec.metric`` of one task's model ``output`` against ``target``.

    ``target_stats[spec.name] = (mean, std)`` converts an MAE to original units. Errors name the
    task.

    >>> spec = TaskSpec("y", "regression", 1, "mae", False)
    >>> task_metric(spec, torch.zeros(2), torch.ones(2), {"y": (5.0, 3.0)})
    3.0
    """
    try:
        if spec.metric == "accuracy":
            return accuracy(output, target)
        if spec.metric == "auc":
            return auc(output, target, spec.missing_label)
        if spec.metric == "mae":
            keep = _kept(target, spec.missing_label)
            scale = (target_stats or {}).get(spec.name, (0.0, 1.0))[1]
            return mae(output[keep], target[keep], scale)
    except ValueError as error:
        raise ValueError(f"task {spec.name!r}: {error}") from None
    raise ValueError(f"task {spec.name!r}: unknown metric {spec.metric!r}")


def task_loss(
    spec: TaskSpec, output: Tensor, target: Tensor, regression: RegressionLoss = "mse"
) -> Tensor:
    """The training loss of one task (a scalar), skipping rows with the missing label.

    A batch in which every label is missing gives ``0 * output.sum()``: a zero loss that still
    depends on the model (a legitimate zero gradient, not a detached constant).

    >>> spec = TaskSpec("y", "binary", 1, "auc", True, missing_label=-1.0)
    >>> float(task_loss(spec, torch.zeros(3), torch.tensor([1.0, -1.0, 0.0])))  # log 2
    0.6931471824645996
    """
    if spec.missing_label is not None:
        # Only tasks that can miss labels pay for the mask (and its host sync) every step.
        keep = target != spec.missing_label
        if not bool(keep.all()):
            if not bool(keep.any()):
                return output.sum() * 0.0
            output, target = output[keep], target[keep]
    if spec.kind == "multiclass":
        return F.cross_entropy(output, target)
    if spec.kind == "binary":
        return F.binary_cross_entropy_with_logits(output, target.to(output.dtype))
    if spec.kind == "regression":
        if regression == "mse":
            return F.mse_loss(output, target)
        if regression == "l1":
            return F.l1_loss(output, target)
        raise ValueError(f"regression loss must be 'mse' or 'l1', got {regression!r}")
    raise ValueError(f"task {spec.name!r}: unknown kind {spec.kind!r}")


def delta_m(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> float:
    """Delta m % of ``metrics`` against ``baseline`` (lower is better; see the module docstring).

    The three mappings are keyed by metric: a task's name, or ``task/metric`` for each metric
    of a task that has several (:attr:`taskbalance.bench.problem.Task.metric_keys`). Raises
    ``ValueError`` naming the key for a zero or non-finite baseline value or a key missing from
    a mapping.

    >>> delta_m({"acc": 0.9, "mae": 1.0}, {"acc": 0.8, "mae": 2.0}, {"acc": True, "mae": False})
    -31.25
    """
    terms = []
    for task, value in metrics.items():
        if task not in baseline or task not in higher_is_better:
            raise ValueError(f"task {task!r} has no baseline value or no direction")
        base = baseline[task]
        if base == 0 or not math.isfinite(base):
            raise ValueError(f"task {task!r}: baseline value {base} cannot normalise Delta m")
        sign = -1.0 if higher_is_better[task] else 1.0
        terms.append(sign * (value - base) / abs(base) * 100.0)
    if not terms:
        raise ValueError("Delta m of no tasks")
    return sum(terms) / len(terms)
