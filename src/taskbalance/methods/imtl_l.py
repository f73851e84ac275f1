"""IMTL-L: impartial loss balance (Liu et al., "Towards Impartial Multi-task Learning",
ICLR 2021, Sec. 3.1).

Each task gets a learnable scale ``s_t`` (initialised to 0) and the scaled loss

    L'_t = exp(s_t) L_t - s_t,      dL'_t / ds_t = exp(s_t) L_t - 1,

so that at equilibrium every scaled loss ``exp(s_t) L_t`` is 1, whatever the scale of ``L_t``.
Needs: the losses only (one backward). Memory: T scalars. The scales are parameters of this
module: give them to the optimizer (``method.param_group()`` adds them without weight decay).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from taskbalance.methods._stale import StaleWatch
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register


@register
class IMTLL(Method):
    """IMTL-L: learnable loss scales that equalise the scaled losses.

    Args:
        tasks: the number of tasks or their names (required: one scale per task).

    Raises:
        InvalidLossError: on a loss <= 0, for which ``exp(s) L - s`` has no minimum.

    >>> method = IMTLL(tasks=2)
    >>> weights, offsets = method.loss_weights(torch.tensor([2.0, 0.5]))
    >>> weights.tolist(), offsets.tolist()
    ([1.0, 1.0], [-0.0, -0.0])
    """

    name = "imtl_l"
    paper = "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021"
    stateful = True

    def __init__(self, tasks: int | Sequence[str] | None = None) -> None:
        super().__init__(tasks=tasks)
        assert self.num_tasks is not None
        self.scales = nn.Parameter(torch.zeros(self.num_tasks))
        self._stale = StaleWatch(type(self).__name__, "loss scales")

    def loss_weights(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        """``w_t = exp(s_t)`` and ``c_t = -s_t``."""
        self.require_positive(losses, "exp(s) L - s has no minimum for L <= 0")
        self._stale(self.scales)
        return torch.exp(self.scales), -self.scales
