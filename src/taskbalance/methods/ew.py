"""EW: equal weighting, the baseline every multi-task paper compares against.

``sum_t L_t`` (reduction ``"sum"``, what ``sum(losses).backward()`` does) or ``(1/T) sum_t L_t``
(reduction ``"mean"``). Cost: one ordinary backward pass.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from taskbalance.methods.base import Method
from taskbalance.methods.registry import register


@register
class EW(Method):
    """Equal weighting of the task losses.

    Args:
        tasks: optional task count or names.
        reduction: ``"sum"`` (weights 1) or ``"mean"`` (weights 1/T).

    >>> EW(reduction="mean").loss_weights(torch.tensor([3.0, 1.0]))[0]
    tensor([0.5000, 0.5000])
    """

    name = "ew"
    paper = "equal weighting (the standard baseline)"

    def __init__(
        self, tasks: int | list[str] | None = None, reduction: Literal["sum", "mean"] = "sum"
    ) -> None:
        super().__init__(tasks=tasks)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"EW: reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    @property
    def unit_loss_weights(self) -> bool:
        """The sum's weights are ones: the engine skips them."""
        return self.reduction == "sum"

    def loss_weights(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        """Ones, or ``1/T`` for the mean."""
        weight = 1.0 if self.reduction == "sum" else 1.0 / losses.numel()
        return torch.full_like(losses, weight), None

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [super().extra_repr(), f"reduction={self.reduction!r}"]))
