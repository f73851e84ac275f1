"""UW: uncertainty weighting (Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty
to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

Each task gets a learnable log-variance ``s_t = log sigma_t^2`` (initialised to 0) and the loss

    L'_t = exp(-s_t) L_t + s_t,        dL'_t / ds_t = 1 - exp(-s_t) L_t,

so that for a fixed loss the optimal ``s_t`` is ``log L_t`` and the task's weight
``exp(-s_t)`` tends to ``1 / L_t``.

Variant (the paper is not uniform here, so this is a choice): the paper derives
``L_t / (2 sigma_t^2) + log sigma_t`` for a Gaussian (regression) likelihood and
``L_t / sigma_t^2 + log sigma_t`` for a softmax (classification) one. We use the common single
form above for every task, which is twice the regression form written in ``s_t``
(``half=True`` gives that form exactly: ``exp(-s_t) L_t / 2 + s_t / 2``; the 1/2 halves both the
model's and the scales' gradients but not the equilibrium ``exp(s_t) = L_t``). The
classification form (equilibrium ``exp(s_t) = 2 L_t``) is not offered: it differs from the
regression one by a constant factor in the weight, which the user can fold into the loss.

Needs: the losses only (one backward). Memory: T scalars. The log-variances are parameters of
this module: give them to the optimizer (``method.param_group()`` adds them without weight
decay, which would pull every ``s_t`` to 0, i.e. towards equal weights).
Requires positive losses: for ``L_t <= 0`` the objective has no minimum in ``s_t`` (it drifts to
``-inf`` and the weight ``exp(-s_t)`` explodes), so such a loss is an error naming the task.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from taskbalance.methods._stale import StaleWatch
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register


def uw_loss_terms(log_vars: Tensor, half: bool = False) -> tuple[Tensor, Tensor]:
    """Weights ``w_t = exp(-s_t)`` and offsets ``c_t = s_t`` (both halved if ``half``).

    They carry gradient into ``log_vars``.

    >>> uw_loss_terms(torch.tensor([0.0, 2.0]))[0]
    tensor([1.0000, 0.1353])
    """
    weights, offsets = torch.exp(-log_vars), log_vars
    if half:
        return weights / 2, offsets / 2
    return weights, offsets


@register
class UW(Method):
    """Uncertainty weighting: learnable log-variances ``s_t``, ``L'_t = exp(-s_t) L_t + s_t``.

    Args:
        tasks: the number of tasks or their names (required: one log-variance per task).
        half: use Kendall et al.'s regression form ``exp(-s_t) L_t / 2 + s_t / 2``.
        init: the initial log-variance of every task (0: weights 1, as equal weighting).

    Raises:
        InvalidLossError: on a loss <= 0 (the message names the task).

    >>> method = UW(tasks=2)
    >>> optimizer = torch.optim.SGD([method.param_group(lr=0.1)])
    >>> weights, offsets = method.loss_weights(torch.tensor([2.0, 0.5]))
    >>> (weights * torch.tensor([2.0, 0.5]) + offsets).sum().backward()
    >>> method.log_vars.grad  # 1 - exp(-s) L
    tensor([-1.0000,  0.5000])
    """

    name = "uw"
    paper = (
        "Kendall et al., Multi-Task Learning Using Uncertainty to Weigh Losses for Scene "
        "Geometry and Semantics, CVPR 2018"
    )
    stateful = True

    def __init__(
        self, tasks: int | Sequence[str] | None = None, half: bool = False, init: float = 0.0
    ) -> None:
        super().__init__(tasks=tasks)
        assert self.num_tasks is not None
        self.half = bool(half)
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init)))
        self._stale = StaleWatch(type(self).__name__, "log-variances")

    def loss_weights(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        """``w_t = exp(-s_t)``, ``c_t = s_t`` (halved with ``half=True``)."""
        self.require_positive(losses, "exp(-s) L + s has no minimum in s for L <= 0")
        self._stale(self.log_vars)
        weights, offsets = uw_loss_terms(self.log_vars, self.half)
        return weights.to(losses.dtype), offsets.to(losses.dtype)

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [super().extra_repr(), f"half={self.half}"]))
