"""UPGrad: unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", 2024).

Each task gradient, scaled by 1/T, is projected onto the dual cone of the rows of the Jacobian
``{x : G x >= 0}`` (the directions that conflict with no task), and the projections are
summed. By the paper's Proposition 1 the projection of ``G^T u`` is ``G^T v`` with

    v = argmin_{v >= u} v^T K v,

so UPGrad needs only the Gramian: ``a = sum_i v_i`` with ``u_i = e_i / T``. The update
``G^T a`` conflicts with no task (``G G^T a >= 0``), and equals the mean gradient when no
pair of gradients conflicts.

Solver: each of the T problems is a non-negative QP in ``x = v - u``
(``min 1/2 x^T K x + (K u)^T x, x >= 0``), solved exactly by the active-set method of
:func:`taskbalance.methods._simplex.nonnegative_qp`, the T problems as one batch, each
warm-started from the tasks that conflict with its own (torchjd uses quadprog on a normalised,
regularised Gramian). Needs: the Gramian. Cost: per-task gradients + T small QPs, batched.
Default level: ``"parameter"`` (the paper's setting).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods._simplex import check_gramian, nonnegative_qp
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register


def dual_cone_weights(gramian: Tensor, u: Tensor) -> Tensor:
    """Weights ``v`` of the projection of ``G^T u`` onto the dual cone ``{x : G x >= 0}``.

    ``v = argmin_{v >= u} v^T K v`` (exact active-set solve, float64). The projection is
    ``G^T v``; ``G G^T v >= 0`` up to rounding.

    >>> dual_cone_weights(torch.tensor([[1.0, -1.0], [-1.0, 4.0]]), torch.tensor([1.0, 0.0]))
    tensor([1.0000, 0.2500])
    """
    check_gramian(gramian)
    k = gramian.detach().to(torch.float64)
    base = u.detach().to(k)
    return (base + nonnegative_qp(k, k @ base)).to(gramian.dtype)


def upgrad_weights(gramian: Tensor) -> Tensor:
    """UPGrad weights: ``sum_i v_i``, ``v_i`` the dual-cone projection weights of ``e_i / T``.

    Degenerate cases: a zero gradient keeps weight 1/T (its projection is itself, zero); the
    zero Gramian gives weights 1/T; identical gradients give 1/T each (the mean).

    >>> upgrad_weights(torch.eye(2))  # orthogonal gradients: no conflict, the mean
    tensor([0.5000, 0.5000])
    """
    check_gramian(gramian)
    k = gramian.detach().to(torch.float64)
    num = k.shape[0]
    # The T problems v_i = u_i + argmin_{x >= 0} 1/2 x^T K x + (K u_i)^T x, u_i = e_i / T,
    # share K: one batched solve (row i of K / T is K u_i, K being symmetric).
    offsets = nonnegative_qp(k, k / num)
    return (1.0 / num + offsets.sum(dim=0)).to(gramian.dtype)


@register
class UPGrad(Method):
    """UPGrad: the mean of the task gradients, each projected onto the dual cone.

    Args:
        tasks: optional task count or names (UPGrad keeps no state).
        level: ``"parameter"`` (default, the paper's setting) or ``"feature"``.

    >>> UPGrad().shared_weights(torch.ones(2), torch.eye(2))
    tensor([0.5000, 0.5000])
    """

    name = "upgrad"
    paper = "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, 2024"
    requires = Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "parameter"

    def __init__(
        self, tasks: int | Sequence[str] | None = None, level: Level | None = None
    ) -> None:
        super().__init__(tasks=tasks, level=level)

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """See :func:`upgrad_weights`."""
        return upgrad_weights(gramian)
