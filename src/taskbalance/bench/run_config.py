"""What defines one benchmark run (:class:`RunConfig`) and what it produced (:class:`RunResult`).

A config is everything a run's numbers depend on: the method spec, the tasks, the model
options, epochs, batch size, learning rate, weight decay, seed, device, loss scales and the
reference that selects its epoch; a checkpoint is resumed only by the config that wrote it. A
result is JSON-able (:meth:`RunResult.to_dict`), as checkpoints, ``results.json`` and the
worker processes carry it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from taskbalance.bench.method_specs import MethodSpec
from taskbalance.bench.metrics import RegressionLoss


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run (and must match for a checkpoint to be resumed).

    ``tasks=None`` trains all tasks; a single task name makes a single-task baseline (its method
    is EW, and ``loss_scale`` does not apply: one loss has nothing to be balanced against).

    >>> RunConfig(method=MethodSpec("ew"), epochs=2).label
    'ew'
    """

    method: MethodSpec = field(default_factory=lambda: MethodSpec("ew"))
    tasks: tuple[str, ...] | None = None
    arch: str = "hps"
    model_options: dict[str, int] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 256
    eval_batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    loss_scale: dict[str, float] = field(default_factory=dict)
    regression_loss: RegressionLoss = "mse"
    reference: dict[str, float] | None = None
    """Validation metrics of the single-task baselines (same seed), per metric key: when given,
    epochs are selected by the validation Delta m % against them, else by the mean validation
    loss."""

    @property
    def label(self) -> str:
        """The method's label, or ``stl:<task>`` for a single-task baseline."""
        if self.tasks is not None and len(self.tasks) == 1:
            return f"stl:{self.tasks[0]}"
        return self.method.label

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the form stored in checkpoints and results)."""
        out = asdict(self)
        out["method"] = {"name": self.method.name, "options": dict(self.method.options)}
        out["tasks"] = None if self.tasks is None else list(self.tasks)
        return out


@dataclass
class RunResult:
    """What one run produced (JSON-able through :meth:`to_dict`).

    Attributes:
        config: the run's :meth:`RunConfig.to_dict`.
        label: the method label (``stl:<task>`` for a single-task baseline).
        tasks: the tasks trained.
        history: one dict per epoch: ``epoch``, ``train_loss``/``val_loss``/``val_metric``
            (per task), ``criterion`` (the selection criterion: validation Delta m % or mean
            unscaled validation loss, see :attr:`RunConfig.reference`), ``weights`` (mean task
            weights of the epoch), ``step_ms`` (median step time of the epoch).
        best_epoch: the selected epoch (1-based; 0 if none).
        val_metrics, test_metrics: per metric key (the task's name, or ``task/metric`` for a
            task with several metrics: :attr:`~taskbalance.bench.problem.Task.metric_keys`),
            at the selected epoch; test_losses: per task.
        step_ms: median wall time of a training step over the run, in milliseconds.
        status: ``"ok"`` or ``"diverged"``; diverged_epoch: the epoch it diverged at.
        train_seconds: wall time spent in training steps.
        records: the diagnostics recorder's tidy records (``step``, ``metric``, ``task``,
            ``other``, ``layer``, ``value``; see :class:`taskbalance.Recorder`); empty when
            nothing was recorded.
    """

    config: dict[str, Any]
    label: str
    tasks: list[str]
    history: list[dict[str, Any]]
    best_epoch: int
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    test_losses: dict[str, float]
    step_ms: float
    status: str
    diverged_epoch: int | None
    train_seconds: float
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResult:
        """Rebuild a result from :meth:`to_dict`'s output."""
        return cls(**dict(data))
