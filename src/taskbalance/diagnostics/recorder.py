"""A read-only recorder of the diagnostics, sampled every k steps, into a tidy table.

Usage::

    recorder = Recorder(every=10)                     # or Recorder(every=10, au=opt.track_au(10))
    for step, (x, ys) in enumerate(loader):
        opt.zero_grad()
        info = method.backward(losses, shared=model.trunk)
        opt.step()
        recorder.observe(info, step)                  # reads info: no backward, no .grad
    recorder.to_dataframe()                           # pandas, when installed

Every record is one number: ``{"step", "metric", "task", "other", "layer", "value"}`` (``None``
where a key does not apply), the long ("tidy") format that filters, groups and plots without
reshaping. Metrics, each recorded when the step computed what it needs:

==================  ===================  =====================================================
metric              keys                 value
==================  ===================  =====================================================
``loss``            task                 ``L_t``
``loss_weight``     task                 the loss-level weight ``w_t``
``gradient_weight`` task                 the gradient-level weight ``a_t`` (Gramian methods)
``weight``          task                 ``a_t w_t``: the total weight of the raw gradient
``grad_norm``       task                 ``||grad(w_t L_t)||`` at the method's level
``r``               task                 EMTL's ``r_t = L_t / ||g_t||`` (``inf``: zero gradient)
``r_spread``        --                   ``std(r) / mean(r)`` over the finite ``r_t``
``cosine``          task, other          the cosine of two tasks' gradients (``task < other``)
``conflict_rate``   --                   the share of pairs with cosine < 0
``projection``      task                 the shared update's projection on ``u_t``
``au``              layer, task          AdaTask's AU (bias-corrected average squared update)
``au_share``        layer, task          the task's share of the layer's AU (``layer="*"``: all)
==================  ===================  =====================================================

The projection is ``(K a)_t / sqrt(K_tt)`` with ``K`` the Gramian of the gradients of
``w_t L_t`` and ``a`` the gradient weights (ones for a loss-level method: the update is their
sum; not recorded for Jacobian methods, whose update is not a combination). The Gramian comes
from ``gramian=``, else from ``blocks=`` (per-task gradients, e.g. from
:func:`taskbalance.task_gradients`), else from the step's norms and cosines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from taskbalance.diagnostics.au import AdamAU, AUTracker
from taskbalance.diagnostics.quantities import (
    conflict_rate,
    cosines_from,
    gramian_from,
    projections,
    relative_contributions,
    spread,
)

if TYPE_CHECKING:
    from taskbalance.apply import StepInfo

Record = dict[str, Any]
COLUMNS = ("step", "metric", "task", "other", "layer", "value")


class Recorder:
    """Samples a step's diagnostics every ``every`` steps into a list of tidy records.

    Args:
        every: record steps ``0, every, 2 every, ...`` (the ``step`` passed to
            :meth:`observe`, or the count of calls).
        au: an :class:`~taskbalance.diagnostics.AUTracker` (e.g. ``opt.track_au()``) or an
            :class:`~taskbalance.diagnostics.AdamAU` whose AU and shares to record.
        cosines: record every pairwise cosine (``T (T - 1) / 2`` records a step).

    Cost: O(T^2) numbers per sampled step, read from what the step computed; nothing on the
    other steps. No backward pass, no access to ``.grad``.

    >>> import torch, taskbalance
    >>> w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    >>> losses = [(w * w).sum(), 10 * (w - 2).pow(2).sum()]
    >>> info = taskbalance.IMTLG(level="parameter").backward(losses, shared=[w])
    >>> recorder = Recorder()
    >>> recorder.observe(info, step=0)
    True
    >>> [round(r["value"], 6) for r in recorder.records("projection")]  # IMTL-G: equal
    [8.154313, 8.154313]
    """

    def __init__(
        self, every: int = 1, au: AUTracker | AdamAU | None = None, cosines: bool = True
    ) -> None:
        if every < 1:
            raise ValueError(f"Recorder: every must be >= 1, got {every}")
        self.every = every
        self.au = au
        self.cosines = cosines
        self.calls = 0
        self._records: list[Record] = []

    def due(self, step: int | None = None) -> bool:
        """Whether :meth:`observe` would record this step (to skip extra work otherwise)."""
        return (self.calls if step is None else step) % self.every == 0

    @torch.no_grad()
    def observe(
        self,
        info: StepInfo,
        step: int | None = None,
        *,
        gramian: Tensor | None = None,
        blocks: Sequence[Tensor | None] | None = None,
    ) -> bool:
        """Record the step's diagnostics if it is due; return whether it was recorded.

        Args:
            info: what :func:`taskbalance.backward` (or ``task_gradients``, or an AdaTask
                optimizer's ``backward``) returned.
            step: the training step (default: the number of earlier calls).
            gramian: the T x T Gramian of the per-task gradients of ``w_t L_t``, if known.
            blocks: per-task gradients ``(T, *shape)`` per shared tensor, to form the Gramian
                when the step did not (loss-level methods).
        """
        step = self.calls if step is None else int(step)
        self.calls += 1
        if step % self.every != 0:
            return False
        tasks = info.tasks
        add = self._adder(step)
        _per_task(add, "loss", tasks, info.losses)
        _per_task(add, "loss_weight", tasks, info.loss_weights)
        if info.gradient_weights is not None:
            _per_task(add, "gradient_weight", tasks, info.gradient_weights)
        _per_task(add, "weight", tasks, info.weights)
        if gramian is None and blocks is not None:
            from taskbalance.engine.jacobian import gramian as gramian_of

            gramian = gramian_of(list(blocks), len(tasks))
        if gramian is None and info.grad_norms is not None and info.cosines is not None:
            gramian = gramian_from(info.grad_norms, info.cosines)
        norms = info.grad_norms
        if gramian is not None:
            gramian = gramian.detach().to(torch.float64)
            norms = gramian.diagonal().clamp_min(0).sqrt()
        if norms is not None:
            _per_task(add, "grad_norm", tasks, norms)
            weighted = (info.losses * info.loss_weights.abs()).to(norms.dtype)
            r = relative_contributions(weighted, norms)
            _per_task(add, "r", tasks, r)
            add("r_spread", spread(r))
        if gramian is not None:
            cosines = cosines_from(gramian)
            if self.cosines:
                for t in range(len(tasks)):
                    for s in range(t + 1, len(tasks)):
                        add("cosine", float(cosines[t, s]), task=tasks[t], other=tasks[s])
            add("conflict_rate", conflict_rate(cosines))
            if info.gradient_weights is not None or info.level is None:
                weights = (
                    info.gradient_weights
                    if info.gradient_weights is not None
                    else torch.ones(len(tasks), dtype=gramian.dtype)
                )
                _per_task(add, "projection", tasks, projections(gramian, weights))
        self._record_au(add, tasks)
        return True

    def _adder(self, step: int):
        def add(
            metric: str,
            value: float,
            task: str | None = None,
            other: str | None = None,
            layer: str | None = None,
        ) -> None:
            self._records.append(
                {
                    "step": step,
                    "metric": metric,
                    "task": task,
                    "other": other,
                    "layer": layer,
                    "value": float(value),
                }
            )

        return add

    def _record_au(self, add, tasks: tuple[str, ...]) -> None:
        tracker = self.au.tracker if isinstance(self.au, AdamAU) else self.au
        if tracker is None:
            return
        values, shares = tracker.values(), tracker.shares()
        for layer, value in values.items():
            names = tasks if len(tasks) == value.numel() else [str(i) for i in range(value.numel())]
            for name, v, share in zip(names, value.tolist(), shares[layer].tolist(), strict=True):
                add("au", v, task=name, layer=layer)
                add("au_share", share, task=name, layer=layer)
        total = tracker.total_shares()
        if total is not None:
            names = tasks if len(tasks) == total.numel() else [str(i) for i in range(total.numel())]
            for name, share in zip(names, total.tolist(), strict=True):
                add("au_share", share, task=name, layer="*")

    # -- reading ----------------------------------------------------------------------------
    def records(
        self,
        metric: str | None = None,
        task: str | None = None,
        layer: str | None = None,
    ) -> list[Record]:
        """The records (copies), optionally filtered by metric, task and layer."""
        return [
            dict(r)
            for r in self._records
            if (metric is None or r["metric"] == metric)
            and (task is None or r["task"] == task)
            and (layer is None or r["layer"] == layer)
        ]

    def series(
        self, metric: str, task: str | None = None, layer: str | None = None
    ) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of one metric (for one task / layer)."""
        chosen = self.records(metric, task, layer)
        return [r["step"] for r in chosen], [r["value"] for r in chosen]

    def to_dataframe(self):
        """The records as a pandas DataFrame (columns :data:`COLUMNS`); needs pandas."""
        try:
            import pandas as pd
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Recorder.to_dataframe needs pandas: pip install 'taskbalance[bench]', or use "
                "Recorder.records() (a list of dicts)"
            ) from error
        return pd.DataFrame(self._records, columns=list(COLUMNS))

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per metric and key (``task``, ``task|other``, ``layer/task`` or ``"-"``): the last
        value and the mean over the recorded steps (finite values only; NaN if none).

        >>> recorder = Recorder()
        >>> recorder._adder(0)("loss", 2.0, task="a"); recorder._adder(1)("loss", 4.0, task="a")
        >>> recorder.summary()["loss"]["a"]
        {'last': 4.0, 'mean': 3.0, 'count': 2}
        """
        grouped: dict[str, dict[str, list[float]]] = {}
        for r in self._records:
            key = (
                "/".join(
                    filter(None, [r["layer"], "|".join(filter(None, [r["task"], r["other"]]))])
                )
                or "-"
            )
            grouped.setdefault(r["metric"], {}).setdefault(key, []).append(r["value"])
        result: dict[str, dict[str, dict[str, float]]] = {}
        for metric, by_key in grouped.items():
            result[metric] = {}
            for key, values in by_key.items():
                finite = [v for v in values if math.isfinite(v)]
                mean = sum(finite) / len(finite) if finite else math.nan
                result[metric][key] = {"last": values[-1], "mean": mean, "count": len(values)}
        return result

    def __len__(self) -> int:
        return len(self._records)

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The records, the sampling settings and the call count (and the AU's state)."""
        state: dict[str, Any] = {
            "every": self.every,
            "cosines": self.cosines,
            "calls": self.calls,
            "records": [dict(r) for r in self._records],
        }
        if self.au is not None:
            state["au"] = self.au.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the AU's too, when this recorder has one)."""
        self.every, self.cosines, self.calls = state["every"], state["cosines"], state["calls"]
        self._records = [dict(r) for r in state["records"]]
        if self.au is not None and "au" in state:
            self.au.load_state_dict(state["au"])


def _per_task(add, metric: str, tasks: tuple[str, ...], values: Tensor) -> None:
    for name, value in zip(tasks, values.tolist(), strict=True):
        add(metric, value, task=name)
