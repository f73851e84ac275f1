"""What the framework integrations share: the step's metrics, the method's backward under a
framework's gradient factor, and the checks every integration makes.

A framework divides the loss before its backward (by the number of gradient accumulation
steps) and may multiply it by a mixed-precision loss scale. A method must not see that factor
(its weights would change with it: IMTL-L's scales, EMTL's ``L_t / ||g_t||``), yet every
gradient it writes must carry it. :func:`method_backward` passes the factor to
``method.backward`` as the loss scale of its ``scaler`` argument: the per-task gradients are
divided by it before the method sees them, and ``.grad`` receives it, exactly as with a
``torch.amp.GradScaler``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from taskbalance.engine.requirement import Requirement

if TYPE_CHECKING:
    from torch import nn
    from torch.amp import GradScaler

    from taskbalance.apply import StepInfo
    from taskbalance.engine.losses import LossesLike
    from taskbalance.methods.base import Method


def missing_extra(framework: str, extra: str, error: ImportError) -> ImportError:
    """The ImportError raised when an integration's framework is not installed.

    >>> error = missing_extra("Hugging Face Transformers", "hf", ImportError("no transformers"))
    >>> "pip install 'taskbalance[hf]'" in str(error)
    True
    """
    return ImportError(
        f"the {framework} integration needs {framework}: pip install 'taskbalance[{extra}]' "
        f"({error})"
    )


def step_metrics(info: StepInfo, prefix: str = "taskbalance") -> dict[str, Tensor]:
    """A step's record as named scalars (0-dim detached tensors), ready for a logger.

    Names, with ``<t>`` a task name: ``<prefix>/loss/<t>``, ``<prefix>/weight/<t>`` (the total
    weight ``a_t w_t`` of the task's raw gradient), for a gradient-level method also
    ``<prefix>/loss_weight/<t>`` and ``<prefix>/gradient_weight/<t>``, ``<prefix>/grad_norm/<t>``
    and ``<prefix>/cosine/<t>-<u>`` when the step computed them, and ``<prefix>/skipped``
    (1 for a step skipped for a non-finite loss, which then records nothing else).

    >>> import torch, taskbalance
    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> info = taskbalance.EW().backward({"a": w.sum(), "b": (w * w).sum()})
    >>> for name, value in step_metrics(info).items():
    ...     print(name, float(value))
    taskbalance/skipped 0.0
    taskbalance/loss/a 3.0
    taskbalance/loss/b 5.0
    taskbalance/weight/a 1.0
    taskbalance/weight/b 1.0
    """
    metrics = {f"{prefix}/skipped": torch.tensor(float(info.skipped))}
    if info.skipped:
        return metrics
    vectors = {"loss": info.losses, "weight": info.weights}
    if info.gradient_weights is not None:
        vectors["loss_weight"] = info.loss_weights
        vectors["gradient_weight"] = info.gradient_weights
    if info.grad_norms is not None:
        vectors["grad_norm"] = info.grad_norms
    for name, vector in vectors.items():
        for task, value in zip(info.tasks, vector.detach().unbind(), strict=True):
            metrics[f"{prefix}/{name}/{task}"] = value
    if info.cosines is not None:
        cosines = info.cosines.detach()
        for i, task in enumerate(info.tasks):
            for j in range(i + 1, len(info.tasks)):
                metrics[f"{prefix}/cosine/{task}-{info.tasks[j]}"] = cosines[i, j]
    return metrics


class GradientFactor:
    """A loss scale for ``method.backward(..., scaler=...)``: every gradient written is
    multiplied by ``factor`` (times the mixed-precision scaler's scale, when there is one),
    and the method sees the unscaled quantities.

    Args:
        factor: the framework's multiplier of the loss (``1 / accumulation steps``).
        amp: the framework's ``torch.amp.GradScaler``, if any; ``scale`` goes through it so
            that its bookkeeping for ``scaler.step`` starts as with an ordinary backward.

    >>> GradientFactor(0.5).scale(torch.tensor(3.0))
    tensor(1.5000)
    """

    def __init__(self, factor: float, amp: GradScaler | None = None) -> None:
        self.factor = factor
        self.amp = amp if amp is not None and amp.is_enabled() else None

    def is_enabled(self) -> bool:
        """Always on: ``method.backward`` applies the factor."""
        return True

    def scale(self, tensor: Tensor) -> Tensor:
        """``tensor`` times the factor (and the mixed-precision scale)."""
        scaled = self.amp.scale(tensor) if self.amp is not None else tensor
        return scaled * self.factor

    def get_scale(self) -> float:
        """The total multiplier of the gradients."""
        return self.factor * (self.amp.get_scale() if self.amp is not None else 1.0)


def check_method(method: Method) -> None:
    """Reject a method the integrations cannot drive (its loop needs a call they cannot make).

    >>> check_method(__import__("taskbalance").EW())
    """
    if method.wants_new_losses:
        raise ValueError(
            f"{type(method).__name__} needs the losses re-evaluated after each optimizer step "
            "(method.update(new_losses)), which a framework's training step does not provide; "
            "construct it with update='next_step'"
        )


def check_in_optimizers(method: Method, param_groups: Iterable[dict[str, Any]]) -> None:
    """Raise if some of the method's own parameters are in no optimizer parameter group.

    >>> method = __import__("taskbalance").IMTLL(tasks=2)
    >>> check_in_optimizers(method, [method.param_group()])
    """
    present = {id(param) for group in param_groups for param in group["params"]}
    absent = [name for name, param in method.named_parameters() if id(param) not in present]
    if absent:
        raise ValueError(
            f"the parameters {absent} of {type(method).__name__} are in no optimizer, so they "
            "would never be trained: add method.param_group() to the optimizer's groups"
        )


def method_backward(
    method: Method,
    losses: LossesLike,
    *,
    shared: nn.Module | Iterable[Tensor] | None,
    features: Tensor | Sequence[Tensor] | None,
    factor: float,
    amp: GradScaler | None = None,
    **options: Any,
) -> StepInfo:
    """``method.backward`` with every gradient multiplied by ``factor`` (and ``amp``'s scale).

    Args:
        method: the balancing method.
        losses, shared, features: as in :func:`taskbalance.backward`.
        factor: the framework's multiplier of the loss; the method never sees it.
        amp: the framework's mixed-precision ``GradScaler``; without one, per-task gradients
            that are not finite raise ``FloatingPointError`` as in an unscaled backward.
        options: other keyword arguments of ``method.backward`` (``jacobian_mode``,
            ``on_nonfinite``, ``retain_graph``).

    >>> import torch, taskbalance
    >>> w = torch.ones(2, requires_grad=True)
    >>> _ = method_backward(taskbalance.EW(), [w.sum()], shared=None, features=None, factor=0.5)
    >>> w.grad
    tensor([0.5000, 0.5000])
    """
    scaler = GradientFactor(factor, amp)
    if scaler.amp is None and factor == 1:
        return method.backward(losses, shared, features, **options)
    info = method.backward(losses, shared, features, scaler=scaler, **options)  # type: ignore[arg-type]
    overflowed = method.requires is not Requirement.LOSSES and info.grad_norms is None
    if overflowed and scaler.amp is None and not info.skipped:
        # method.backward lets an overflow through unweighted for a GradScaler to skip the
        # step; without one it must stop, as it does without a factor.
        raise FloatingPointError(
            "the per-task gradients are not finite (overflow in the model's backward?); with "
            "mixed precision, use the framework's loss scaling (precision='16-mixed' or fp16)"
        )
    return info
