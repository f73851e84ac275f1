"""FairGrad: alpha-fair resource allocation (Ban & Ji, "Fair Resource Allocation in
Multi-Task Learning", ICML 2024).

The update ``d = G^T a`` maximises the alpha-fair utility of the tasks' improvements
``g_t . d``; its optimality condition is

    K a = a^(-1/alpha)          (elementwise power, a > 0),

proportional fairness (``alpha = 1``) being Nash-MTL's ``K a = 1/a``, and ``alpha -> inf``
max-min fairness. Solved exactly by damped Newton on a strictly convex T-variable problem
(:func:`taskbalance.methods._simplex.power_equation`), where the official code calls
``scipy.optimize.least_squares``. Needs: the Gramian. Cost: per-task gradients + a few T x T
solves. ``alpha = 0`` (linear scalarisation) returns equal weights 1/T, as torchjd does.
Degenerate Gramians (a zero gradient, 0 in the convex hull of some gradients) have no
solution; a relative ridge of 1e-10 keeps the weights finite (large along the offending
direction, which contributes nothing to the update); the zero Gramian gives weights 1.
Default level: ``"parameter"`` (the paper's setting); ``alpha = 1`` by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods._simplex import check_gramian, power_equation
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register


def fairgrad_weights(gramian: Tensor, alpha: float = 1.0) -> Tensor:
    """FairGrad weights: the positive solution of ``K a = a^(-1/alpha)``.

    >>> fairgrad_weights(torch.diag(torch.tensor([4.0, 1.0])), alpha=1.0)
    tensor([0.5000, 1.0000])
    >>> fairgrad_weights(torch.diag(torch.tensor([4.0, 1.0])), alpha=0.0)
    tensor([0.5000, 0.5000])
    """
    check_gramian(gramian)
    if alpha < 0:
        raise ValueError(f"FairGrad: alpha must be >= 0, got {alpha}")
    num = gramian.shape[0]
    if alpha == 0:
        return torch.full((num,), 1.0 / num, dtype=gramian.dtype, device=gramian.device)
    return power_equation(gramian, alpha).to(gramian.dtype)


@register
class FairGrad(Method):
    """FairGrad: alpha-fair weights solving ``K a = a^(-1/alpha)``.

    Args:
        tasks: optional task count or names (FairGrad keeps no state).
        level: ``"parameter"`` (default, the paper's setting) or ``"feature"``.
        alpha: the fairness exponent, >= 0 (default 1: proportional fairness).

    >>> FairGrad(alpha=2.0).alpha
    2.0
    """

    name = "fairgrad"
    paper = "Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024"
    requires = Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "parameter"

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        level: Level | None = None,
        alpha: float = 1.0,
    ) -> None:
        super().__init__(tasks=tasks, level=level)
        if alpha < 0:
            raise ValueError(f"FairGrad: alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """See :func:`fairgrad_weights`."""
        return fairgrad_weights(gramian, self.alpha)

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [super().extra_repr(), f"alpha={self.alpha}"]))
