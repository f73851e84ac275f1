"""Exceptions raised by taskbalance.

Every error names the task it is about, so that a user never has to read our source to find
which of their losses is at fault.
"""

from __future__ import annotations

from torch import Tensor


class InvalidLossError(ValueError):
    """A task loss cannot be used: wrong shape, no gradient, no path to the shared part, ...

    Attributes:
        task: the name of the offending task (``None`` when the problem concerns all tasks).
    """

    def __init__(self, message: str, task: str | None = None) -> None:
        super().__init__(message)
        self.task = task


class NonFiniteLossError(InvalidLossError):
    """A task loss is NaN or infinite.

    Raised before any gradient is computed, so ``.grad`` and the method's state are untouched
    and the caller may skip the step.

    Attributes:
        task: the first task whose loss is not finite.
        names: every task's name, in order (empty when raised by a method on its own input).
        values: every task's loss (detached; averaged over the ranks under torch.distributed),
            or ``None``.
    """

    def __init__(
        self,
        message: str,
        task: str | None = None,
        names: tuple[str, ...] = (),
        values: Tensor | None = None,
    ) -> None:
        super().__init__(message, task=task)
        self.names = names
        self.values = values
