"""Turning what the user passes (a dict or a sequence of losses, parameters) into checked tensors.

Every check here runs before any gradient is computed, so a bad input leaves ``.grad`` and
every method's state untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from taskbalance.errors import InvalidLossError, NonFiniteLossError

LossesLike = Mapping[str, Tensor] | Sequence[Tensor] | Tensor


@dataclass(frozen=True)
class TaskLosses:
    """The task losses of one step, checked and in a fixed task order.

    Attributes:
        names: task names (the dict keys, or ``"0"``, ``"1"``, ... for a sequence).
        tensors: each task's scalar loss as given (kept to walk each task's own graph).
        values: the losses stacked into one vector of shape ``(T,)``, still in the graph.
        from_mapping: whether the names came from a dict (and so identify the tasks).
    """

    names: tuple[str, ...]
    tensors: tuple[Tensor, ...]
    values: Tensor
    from_mapping: bool


def collect_losses(
    losses: LossesLike, expected: Sequence[str] | None = None, check_finite: bool = True
) -> TaskLosses:
    """Check the task losses and stack them in a fixed order.

    Args:
        losses: ``{task name: scalar loss}``, a sequence of scalar losses, or a 1-D tensor of
            losses.
        expected: task names from an earlier step or from the method's constructor; a dict is
            reordered to match them, and a dict with other names is an error.
        check_finite: raise on a NaN or infinite loss (under torch.distributed the check runs
            on the losses reduced over the ranks instead, so that every rank raises together).

    Raises:
        InvalidLossError: no tasks, a non-tensor, a non-scalar loss, a loss without gradient,
            or task names that differ from ``expected``.
        NonFiniteLossError: a NaN or infinite loss (naming every such task).

    >>> collect_losses({"a": torch.tensor(1.0, requires_grad=True)}).names
    ('a',)
    """
    names, tensors, from_mapping = _split(losses, expected)
    if not tensors:
        raise InvalidLossError(
            "no task losses were given: pass {task name: scalar loss} or a sequence of losses"
        )
    for name, loss in zip(names, tensors, strict=True):
        _check_one(name, loss)
    devices = {loss.device for loss in tensors}
    if len(devices) > 1:
        raise InvalidLossError(
            f"the task losses live on different devices: {sorted(map(str, devices))}"
        )
    values = torch.stack([loss if loss.dim() == 0 else loss.reshape(()) for loss in tensors])
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()  # loss weights and solves are ill-served by half precision
    if check_finite:
        check_finite_losses(names, values)
    return TaskLosses(names, tensors, values, from_mapping)


def check_finite_losses(names: Sequence[str], values: Tensor) -> None:
    """Raise :class:`NonFiniteLossError` naming every task whose loss is NaN or infinite.

    >>> check_finite_losses(["a"], torch.tensor([1.0]))  # fine: returns None
    """
    values = values.detach()
    host = (values.float() if values.dtype == torch.bfloat16 else values).cpu().numpy()
    # One round trip; numpy checks a few numbers in about 3 us, torch's isfinite took ~8.
    if np.isfinite(host).all():
        return
    bad = ~torch.isfinite(values)
    if bad.any():
        indices = bad.nonzero().flatten().tolist()
        listed = ", ".join(f"'{names[i]}' = {values[i].item()}" for i in indices)
        raise NonFiniteLossError(
            f"non-finite task loss: {listed}; nothing was back-propagated",
            task=names[indices[0]],
            names=tuple(names),
            values=values,
        )


def _split(
    losses: LossesLike, expected: Sequence[str] | None
) -> tuple[tuple[str, ...], tuple[Tensor, ...], bool]:
    if isinstance(losses, Mapping):
        given = {str(name): loss for name, loss in losses.items()}
        if expected is None:
            return tuple(given), tuple(given.values()), True
        missing = [name for name in expected if name not in given]
        unexpected = [name for name in given if name not in expected]
        if missing or unexpected:
            raise InvalidLossError(
                f"the tasks changed: expected {list(expected)}, missing {missing}, "
                f"unexpected {unexpected}. A method keeps per-task state in a fixed task order; "
                "create a new method for a new set of tasks"
            )
        return tuple(expected), tuple(given[name] for name in expected), True
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise InvalidLossError(
                f"a tensor of task losses must be 1-D (one loss per task), got shape "
                f"{tuple(losses.shape)}"
            )
        tensors = tuple(losses.unbind())
    elif isinstance(losses, Sequence) and not isinstance(losses, str):
        tensors = tuple(losses)
    else:
        raise InvalidLossError(
            f"losses must be a dict {{task name: loss}} or a sequence of losses, got "
            f"{type(losses).__name__}"
        )
    if expected is not None and len(expected) != len(tensors):
        raise InvalidLossError(f"expected {len(expected)} task losses, got {len(tensors)}")
    names = tuple(expected) if expected is not None else tuple(str(i) for i in range(len(tensors)))
    return names, tensors, False


def _check_one(name: str, loss: object) -> None:
    if not isinstance(loss, Tensor):
        raise InvalidLossError(
            f"the loss of task '{name}' is a {type(loss).__name__}, expected a scalar tensor",
            task=name,
        )
    if loss.numel() != 1:
        raise InvalidLossError(
            f"the loss of task '{name}' has shape {tuple(loss.shape)}; a task loss must be a "
            "scalar (reduce it, e.g. with .mean())",
            task=name,
        )
    if not loss.is_floating_point():
        raise InvalidLossError(
            f"the loss of task '{name}' has dtype {loss.dtype}; it must be floating point",
            task=name,
        )
    if not loss.requires_grad:
        raise InvalidLossError(
            f"the loss of task '{name}' does not require grad: was it computed under "
            "torch.no_grad() or from detached tensors?",
            task=name,
        )


def unique_tensors(tensors: nn.Module | Iterable[Tensor] | Tensor, what: str) -> tuple[Tensor, ...]:
    """The trainable tensors of a module or an iterable, checked: leaves, none given twice.

    Frozen tensors (``requires_grad=False``, e.g. a frozen embedding or first block in
    fine-tuning) are left out, as ``torch.optim`` leaves them alone.

    Args:
        tensors: an ``nn.Module`` (its parameters), a tensor, or an iterable of tensors.
        what: how to call them in an error message (e.g. ``"shared parameters"``).

    Raises:
        ValueError: a tensor given twice, none given, all frozen, or one that is not a leaf
            (a view such as ``base.chunk(2)``, or a computed tensor: its ``.grad`` would never
            reach an optimizer).
        TypeError: something that is not a tensor.

    >>> layer = nn.Linear(2, 2)
    >>> layer.bias.requires_grad_(False)  # doctest: +ELLIPSIS
    Parameter containing:...
    >>> [tuple(p.shape) for p in unique_tensors(layer, "shared parameters")]
    [(2, 2)]
    """
    if isinstance(tensors, nn.Module):
        items = tuple(tensors.parameters())
    elif isinstance(tensors, Tensor):
        items = (tensors,)
    else:
        items = tuple(tensors)
    if not items:
        raise ValueError(f"no {what} were given")
    seen: set[int] = set()
    trainable = []
    for i, tensor in enumerate(items):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{what}: item {i} is a {type(tensor).__name__}, not a tensor")
        if id(tensor) in seen:
            raise ValueError(
                f"{what}: item {i} (shape {tuple(tensor.shape)}) was given twice; "
                "each tensor must appear once"
            )
        seen.add(id(tensor))
        if not tensor.requires_grad:
            continue
        if not tensor.is_leaf:
            made_by = type(tensor.grad_fn).__name__
            raise ValueError(
                f"{what}: item {i} (shape {tuple(tensor.shape)}) is not a leaf tensor but the "
                f"output of {made_by} (a view such as base.chunk(2), or a computed tensor), "
                "whose .grad never reaches an optimizer; pass the parameter it comes from"
            )
        trainable.append(tensor)
    if not trainable:
        raise ValueError(
            f"{what}: all {len(items)} given are frozen (requires_grad=False); nothing to train"
        )
    return tuple(trainable)
