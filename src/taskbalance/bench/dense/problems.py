"""The dense data sets as :class:`~taskbalance.bench.problem.Problem` objects, the form
``taskbalance bench --problem`` trains::

    taskbalance bench --problem taskbalance.bench.dense.problems:nyuv2 root=DIR --batch-size 8
    taskbalance bench --problem taskbalance.bench.dense.problems:cityscapes root=DIR
    taskbalance bench --problem taskbalance.bench.dense.problems:dense_multi_mnist

Per task (:func:`dense_tasks`): the per-pixel loss of :mod:`.metrics` (cross-entropy over
labelled pixels, L1 on valid depths, 1 - cos on valid normals) and every standard metric of its
kind (:data:`~taskbalance.bench.dense.metrics.METRICS`: mIoU and pixel accuracy; absolute and
relative depth error; mean and median angle and the shares within 11.25, 22.5 and 30 degrees),
so the table has the papers' columns (nine on NYUv2, four on Cityscapes) and Delta m is taken
over all of them, as in the papers.

Model options (``KEY=VALUE`` after the entry point, or keyword arguments): ``arch``
(``segnet`` or ``deeplab``) and the options of
:func:`~taskbalance.bench.dense.models.build_dense_model`; tuple options (``widths``,
``convs``, ``layers``, ``rates``) may be given as comma-separated text (``widths=8,16,32``).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from typing import Any

from torch import nn

from taskbalance.bench.problem import Problem, Task

from . import metrics
from .digits import load_dense_multi_mnist
from .models import build_dense_model
from .scenes import DenseData, DenseTarget, load_cityscapes, load_nyuv2

_TUPLE_OPTIONS = ("widths", "convs", "layers", "rates")
#: The small SegNet the dense MultiMNIST trains by default (2 CPU cores).
SMALL_SEGNET = {"widths": (16, 32, 64, 64), "convs": (1, 1, 1, 1)}


def full_metric(
    target: DenseTarget,
) -> metrics.SegmentationMetric | metrics.DepthMetric | metrics.NormalMetric:
    """A fresh accumulator of every standard metric of ``target``'s kind.

    >>> full_metric(DenseTarget("depth", "depth", 1)).__class__.__name__
    'DepthMetric'
    """
    if target.kind == "segmentation":
        return metrics.SegmentationMetric(target.channels)
    return metrics.DepthMetric() if target.kind == "depth" else metrics.NormalMetric()


def dense_tasks(targets: tuple[DenseTarget, ...]) -> tuple[Task, ...]:
    """One :class:`~taskbalance.bench.problem.Task` per dense target: its per-pixel loss and
    every standard metric of its kind (:data:`~taskbalance.bench.dense.metrics.METRICS`), each
    with its direction.

    >>> [t.directions for t in dense_tasks((DenseTarget("depth", "depth", 1),))]
    [{'depth/abs_err': False, 'depth/rel_err': False}]
    """
    return tuple(
        Task(
            t.name,
            metrics.LOSSES[t.kind],
            full_metric(t),
            {m: metrics.HIGHER_IS_BETTER[m] for m in metrics.METRICS[t.kind]},
        )
        for t in targets
    )


def _model(
    arch: str,
    outputs: Mapping[str, int],
    in_channels: int,
    options: Mapping[str, Any],
    tasks: tuple[str, ...],
) -> nn.Module:
    return build_dense_model(arch, {t: outputs[t] for t in tasks}, in_channels, options)


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Model options with comma-separated text turned into tuples of ints."""
    out = dict(options)
    for key in _TUPLE_OPTIONS:
        value = out.get(key)
        if isinstance(value, str):
            try:
                out[key] = tuple(int(v) for v in value.split(","))
            except ValueError:
                raise ValueError(f"{key}={value}: expected integers separated by commas") from None
        elif isinstance(value, int):
            out[key] = (value,)
    return out


def dense_problem(
    data: DenseData,
    arch: str = "segnet",
    model_options: Mapping[str, Any] | None = None,
    eval_batch_size: int = 8,
) -> Problem:
    """``data`` as a :class:`~taskbalance.bench.problem.Problem` trained with the dense model
    ``arch`` (see the module docstring). Everything in it pickles (worker processes receive
    it whole). The fingerprint is a digest of the name, the targets, the data's description
    (which names the sizes, the resolution and the seed) and the metric keys the results
    hold.

    >>> import torch
    >>> from taskbalance.bench.problem import TensorData
    >>> x = torch.zeros(4, 1, 8, 8)
    >>> split = TensorData(x, {"depth": torch.ones(4, 1, 8, 8)})
    >>> data = DenseData("toy", (DenseTarget("depth", "depth", 1),), split, split, split, "", "")
    >>> p = dense_problem(data, model_options={"widths": "4,8", "convs": "1,1"})
    >>> p.task_names, p.model(("depth",))(x)[1]["depth"].shape
    (('depth',), torch.Size([4, 1, 8, 8]))
    """
    options = _options(model_options or {})
    outputs = {t.name: t.channels for t in data.targets}
    build_dense_model(arch, outputs, data.in_channels, options)  # bad options fail here, once
    tasks = dense_tasks(data.targets)
    keys = [k for t in tasks for k in t.metric_keys]  # a checkpoint's results hold these
    digest = hashlib.sha256(repr((data.name, data.targets, data.description, keys)).encode())
    return Problem(
        name=data.name,
        tasks=tasks,
        train=data.train,
        val=data.val,
        test=data.test,
        model=functools.partial(_model, arch, outputs, data.in_channels, options),
        description=data.description,
        licence=data.licence,
        eval_batch_size=eval_batch_size,
        fingerprint=digest.hexdigest()[:16],
    )


def nyuv2(
    root: str,
    arch: str = "segnet",
    val_size: int | None = None,
    seed: int = 0,
    **model_options: Any,
) -> Problem:
    """NYUv2 (:func:`~taskbalance.bench.dense.scenes.load_nyuv2`) with the model ``arch``.

    >>> nyuv2("/nowhere")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    taskbalance.bench.dense.scenes.LayoutError: nyuv2: root /nowhere is not a folder ...
    """
    return dense_problem(load_nyuv2(root, val_size=val_size, seed=seed), arch, model_options)


def cityscapes(
    root: str,
    classes: int = 7,
    arch: str = "segnet",
    val_size: int | None = None,
    seed: int = 0,
    **model_options: Any,
) -> Problem:
    """Cityscapes (:func:`~taskbalance.bench.dense.scenes.load_cityscapes`) with the model
    ``arch``.

    >>> cityscapes("/nowhere")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    taskbalance.bench.dense.scenes.LayoutError: cityscapes: root /nowhere is not a folder ...
    """
    data = load_cityscapes(root, classes=classes, val_size=val_size, seed=seed)
    return dense_problem(data, arch, model_options)


def dense_multi_mnist(
    size: int = 3_000,
    test_size: int = 1_000,
    canvas: int = 32,
    digits: int = 2,
    seed: int = 0,
    root: str | None = None,
    cache_dir: str | None = None,
    arch: str = "segnet",
    **model_options: Any,
) -> Problem:
    """Dense MultiMNIST (:func:`~taskbalance.bench.dense.digits.load_dense_multi_mnist`;
    SYNTHETIC geometry) with the model ``arch``: by default the small SegNet
    :data:`SMALL_SEGNET`, sized for 2 CPU cores.

    >>> dense_multi_mnist(size=5, test_size=10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: dense_multi_mnist: size=5, val_size=0, ... leave an empty split ...
    """
    data = load_dense_multi_mnist(size, test_size, canvas=canvas, digits=digits, seed=seed,
                                  root=root, cache_dir=cache_dir)  # fmt: skip
    options = model_options or (dict(SMALL_SEGNET) if arch == "segnet" else {})
    return dense_problem(data, arch, options, eval_batch_size=256)
