"""ConFIG: conflict-free updates (Liu et al., "ConFIG: Towards Conflict-free Training of
Physics Informed Neural Networks", 2024, Eq. 2).

With unit gradients ``u_t = g_t / ||g_t||`` stacked in U, the direction is
``v = U^+ 1`` (the minimum-norm direction with the same unit projection on every task), made a
unit vector and rescaled by the sum of the task gradients' projections on it:

    update = (sum_t g_t . v^) v^,     v^ = v / ||v||.

``U^+ 1 = U^T (U U^T)^+ 1`` is a combination of the unit gradients whose coefficients come from
the cosine matrix ``C = D^-1 K D^-1`` (``D = diag(||g_t||)``), so ConFIG needs only the
Gramian, not the Jacobian: with ``w = D^-1 C^+ 1``,

    a = (1^T K w / w^T K w) w.

Its direction is IMTL-G's (equal projections on the unit gradients); only the length differs.
Degenerate cases: a zero gradient is left out of C (as torchjd, which zeroes its unit row) and
contributes 0 to the length; when ``C^+ 1 = 0`` (exactly opposite gradients) the update is zero
(weights 0). The pseudo-inverse cut-off is ``T * eps`` of float64, relative, on C's eigenvalues.
Needs: the Gramian. Cost: per-task gradients + one T x T pseudo-inverse.
Default level: ``"parameter"`` (the paper's setting).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods._simplex import check_gramian
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register


def config_weights(gramian: Tensor) -> Tensor:
    """ConFIG's update as weights on the original gradients (see the module docstring).

    >>> config_weights(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))  # v^ = (1, 1)/sqrt(2)
    tensor([1.5000, 0.7500])
    """
    check_gramian(gramian)
    k = gramian.detach().to(torch.float64)
    num = k.shape[0]
    norms = k.diagonal().clamp_min(0).sqrt()
    alive = norms > 0
    weights = k.new_zeros(num)
    if alive.any():
        d = norms[alive]
        cosines = k[alive][:, alive] / (d[:, None] * d[None, :])
        coefficients = torch.linalg.pinv(
            cosines, rtol=num * torch.finfo(torch.float64).eps, hermitian=True
        ).sum(dim=1)
        w = k.new_zeros(num)
        w[alive] = coefficients / d
        squared = w @ k @ w
        if squared > 0:
            weights = (k.sum(dim=0) @ w / squared) * w
    return weights.to(gramian.dtype)


@register
class ConFIG(Method):
    """ConFIG: the equal-unit-projection direction, scaled by the sum of projections.

    Args:
        tasks: optional task count or names (ConFIG keeps no state).
        level: ``"parameter"`` (default, the paper's setting) or ``"feature"``.

    >>> ConFIG().shared_weights(torch.ones(2), torch.eye(2))
    tensor([1., 1.])
    """

    name = "config"
    paper = (
        "Liu et al., ConFIG: Towards Conflict-free Training of Physics Informed Neural "
        "Networks, ICLR 2025"
    )
    requires = Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "parameter"

    def __init__(
        self, tasks: int | Sequence[str] | None = None, level: Level | None = None
    ) -> None:
        super().__init__(tasks=tasks, level=level)

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """See :func:`config_weights`."""
        return config_weights(gramian)
