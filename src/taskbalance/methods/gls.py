"""GLS: geometric loss strategy (Chennupati et al., "MultiNet++: Multi-Stream Feature
Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019).

The task losses are combined by their geometric mean instead of their sum:

    L_GLS = (prod_t L_t)^(1/T).

Its gradient is a weighted sum of the task gradients with weights that follow from the chain
rule (with ``GM = L_GLS``):

    grad L_GLS = (1/T) GM sum_t grad L_t / L_t = sum_t w_t grad L_t,   w_t = GM / (T L_t),

so GLS is a loss-level method with the detached weights ``w_t = GM / (T L_t)``; the weighted
sum ``sum_t w_t L_t`` then equals ``GM`` in value too. Because ``grad L_GLS`` only depends on
``grad log L_t``, multiplying one task's loss by a constant ``c`` multiplies the whole update by
``c^(1/T)`` and leaves its direction unchanged.

Needs: the losses only (one ordinary backward). Cost: O(T). No hyperparameters.
Requires positive losses: the geometric mean of a zero loss is 0 (every other task's gradient
vanishes) and of a negative one undefined, so a loss <= 0 is an error naming the task.
GM is computed in log space, ``exp(mean(log L))``, so that it neither under- nor overflows for
many tasks or extreme loss scales.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from taskbalance.methods.base import Method
from taskbalance.methods.registry import register

if TYPE_CHECKING:
    from collections.abc import Sequence


def gls_weights(losses: Tensor) -> Tensor:
    """GLS loss weights ``w_t = GM / (T L_t)``, ``GM = (prod_t L_t)^(1/T)``, for positive losses.

    The caller checks positivity (a loss <= 0 gives 0, inf or NaN here).

    >>> gls_weights(torch.tensor([1.0, 4.0]))  # GM = 2
    tensor([1.0000, 0.2500])
    """
    logs = losses.detach().log()
    geometric_mean = torch.exp(logs.mean())
    return geometric_mean / (losses.numel() * losses.detach())


@register
class GLS(Method):
    """Geometric loss strategy: minimise the geometric mean of the task losses.

    Args:
        tasks: optional task count or names (GLS keeps no state).

    Raises:
        InvalidLossError: on a loss <= 0 (the message names the task).

    >>> GLS().loss_weights(torch.tensor([2.0, 8.0]))[0]  # GM = 4: w = 4 / (2 L)
    tensor([1.0000, 0.2500])
    """

    name = "gls"
    paper = (
        "Chennupati et al., MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss "
        "Strategy for Multi-Task Learning, CVPR Workshops 2019"
    )

    def __init__(self, tasks: int | Sequence[str] | None = None) -> None:
        super().__init__(tasks=tasks)

    def loss_weights(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        """``w_t = GM / (T L_t)``; see :func:`gls_weights`."""
        self.require_positive(losses, "the geometric mean takes log L")
        return gls_weights(losses), None
