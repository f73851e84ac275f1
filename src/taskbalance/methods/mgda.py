"""MGDA: the multiple-gradient descent algorithm as multi-task learning (Sener & Koltun,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018).

The update is the minimum-norm point of the convex hull of the task gradients:

    a = argmin_{a in simplex} a^T K a,      update = sum_t a_t g_t,

a direction of common descent (``g_t . update >= ||update||^2`` for every task) unless the
gradients are Pareto-stationary, where it is zero. The paper's fast variant, MGDA-UB, takes the
gradients w.r.t. the shared representation z (the upper bound of its Theorem 1): that is
``level="feature"`` here, the default. ``level="parameter"`` is the exact MGDA.

Solver: the paper uses Frank-Wolfe; here an exact active-set method on the T x T Gramian
(:func:`taskbalance.methods._simplex.simplex_qp`), which satisfies the optimality conditions to
rounding error (Frank-Wolfe converges sublinearly and is stopped early in practice).

Optional gradient normalisation (the paper's code, ``normalization``): the QP is solved on the
normalised gradients ``g_t / n_t`` and the weights are applied to the raw gradients, with
``n_t = ||g_t||`` ("l2"), ``L_t`` ("loss"), ``L_t ||g_t||`` ("loss+"), or 1 ("none", default).
Needs: the Gramian. Cost: per-task gradients at the chosen level + one T x T QP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from taskbalance.engine.placement import on_accelerator
from taskbalance.engine.requirement import Level, Requirement
from taskbalance.errors import InvalidLossError
from taskbalance.methods._simplex import check_gramian, simplex_qp
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register

Normalization = Literal["none", "l2", "loss", "loss+"]


def mgda_weights(gramian: Tensor) -> Tensor:
    """MGDA weights: the minimum-norm point of the convex hull of the gradients.

    ``a = argmin_{a >= 0, sum(a) = 1} a^T K a``, solved exactly (active-set method, float64).
    At the optimum every task with ``a_t > 0`` has ``(K a)_t = a^T K a`` and every other task
    ``(K a)_t >= a^T K a``. Degenerate cases: the zero Gramian gives equal weights (the update is
    zero anyway); identical gradients give equal weights (the minimum-norm solution among the
    optimal ones); with a zero gradient the update is zero (a zero gradient makes
    the tasks Pareto-stationary).

    >>> mgda_weights(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    tensor([0.8000, 0.2000])
    """
    check_gramian(gramian)
    return simplex_qp(gramian).to(gramian.dtype)


@register
class MGDA(Method):
    """MGDA (MGDA-UB at feature level): the minimum-norm convex combination of task gradients.

    Args:
        tasks: optional task count or names (MGDA keeps no state).
        level: ``"feature"`` (default: MGDA-UB, the paper's fast variant) or ``"parameter"``.
        normalization: how the gradients are normalised before the QP: ``"none"`` (default),
            ``"l2"``, ``"loss"`` or ``"loss+"`` (see the module docstring). ``"loss"`` and
            ``"loss+"`` need positive losses.

    >>> MGDA().shared_weights(torch.ones(2), torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    tensor([0.8000, 0.2000])
    """

    name = "mgda"
    paper = "Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018"
    requires = Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "feature"

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        level: Level | None = None,
        normalization: Normalization = "none",
    ) -> None:
        super().__init__(tasks=tasks, level=level)
        if normalization not in ("none", "l2", "loss", "loss+"):
            raise ValueError(
                f"MGDA: normalization must be 'none', 'l2', 'loss' or 'loss+', got "
                f"{normalization!r}"
            )
        self.normalization = normalization

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """:func:`mgda_weights` of the (optionally normalised) Gramian."""
        if self.normalization == "none":
            return mgda_weights(gramian)
        k = gramian.detach().to(torch.float64)
        if self.normalization in ("loss", "loss+") and not on_accelerator(losses):
            bad = (losses <= 0).nonzero().flatten().tolist()
            if bad:
                listed = ", ".join(f"'{self.task_label(i)}' = {losses[i].item():.4g}" for i in bad)
                raise InvalidLossError(
                    f"MGDA(normalization={self.normalization!r}) divides by the losses, which "
                    f"must be positive; got {listed}",
                    task=self.task_label(bad[0]),
                )
        norms = k.diagonal().clamp_min(0).sqrt()
        # A zero gradient cannot be normalised: it keeps its (zero) length.
        lengths = torch.where(norms > 0, norms, 1.0)
        divisor = {
            "l2": lengths,
            "loss": losses.detach().to(k),
            "loss+": losses.detach().to(k) * lengths,
        }[self.normalization]
        return simplex_qp(k / (divisor[:, None] * divisor[None, :])).to(gramian.dtype)

    def extra_repr(self) -> str:
        return ", ".join(
            filter(None, [super().extra_repr(), f"normalization={self.normalization!r}"])
        )
