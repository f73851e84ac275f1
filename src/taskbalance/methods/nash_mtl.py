"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022).

The update ``d = G^T a`` is the Nash bargaining solution of the tasks' improvements
``g_t . d`` in a ball; its weights are the positive solution of

    K a = 1 / a          (elementwise: a_t (K a)_t = 1 for every task),

so that every task's improvement is inversely proportional to its weight, and
``||d||^2 = a^T K a = T`` whatever the gradients' scale.

Solver: the paper approximates ``a`` by a sequence of convex problems solved with cvxpy (ECOS).
Here ``a`` is the unique minimiser of the strictly convex ``1/2 a^T K a - sum_t log a_t``, found
exactly by damped Newton on the T x T system
(:func:`taskbalance.methods._simplex.power_equation` with ``alpha = 1``; FairGrad is the same
equation with another exponent), warm-started from the previous step's weights (kept in a
buffer). No cvxpy, no scipy.

As in the paper's code: ``update_weights_every`` (default 1) recomputes the weights only every
k-th call and reuses the last ones in between; ``max_norm`` (default 1.0; 0 disables) scales the
weights so that ``||G^T a|| <= max_norm``. Since ``||G^T a|| = sqrt(T)`` at the solution, the
default clipping gives every update norm exactly 1 when T >= 2.
Degenerate Gramians (a zero gradient, or 0 in the convex hull of some gradients: no solution
exists) get a relative ridge of 1e-10: finite weights, large along the offending direction,
which contributes nothing to the update; the zero Gramian gives weights 1.
Needs: the Gramian. Cost: per-task gradients + a few T x T solves.
Default level: ``"parameter"`` (the paper's setting).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.engine.placement import on_accelerator
from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods._simplex import check_gramian, power_equation
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register


def nash_mtl_weights(gramian: Tensor, init: Tensor | None = None) -> Tensor:
    """The positive solution of ``K a = 1/a`` (no clipping), optionally warm-started.

    >>> nash_mtl_weights(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
    tensor([0.5000, 1.0000])
    """
    check_gramian(gramian)
    return power_equation(gramian, 1.0, init=init).to(gramian.dtype)


def clip_weights(gramian: Tensor, weights: Tensor, max_norm: float) -> Tensor:
    """Scale ``weights`` so that ``||G^T a|| = sqrt(a^T K a) <= max_norm`` (0: no clipping).

    >>> clip_weights(torch.eye(2), torch.tensor([3.0, 4.0]), max_norm=1.0)
    tensor([0.6000, 0.8000])
    """
    if max_norm <= 0:
        return weights
    w = weights.to(torch.float64)
    norm = (w @ gramian.detach().to(torch.float64) @ w).clamp_min(0).sqrt()
    return (w * (max_norm / norm).clamp_max(1.0)).to(weights.dtype)  # no branch: no read


@register
class NashMTL(Method):
    """Nash-MTL: the Nash bargaining weights ``K a = 1/a``, clipped to ``max_norm``.

    Args:
        tasks: the number of tasks or their names (required: the warm start is per task).
        level: ``"parameter"`` (default, the paper's setting) or ``"feature"``.
        max_norm: upper bound on ``||G^T a||`` (default 1.0, the paper's code; 0 disables).
        update_weights_every: recompute the weights every k-th call (default 1).

    >>> method = NashMTL(tasks=2, max_norm=0.0)
    >>> method.shared_weights(torch.ones(2), torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
    tensor([0.5000, 1.0000])
    """

    name = "nash_mtl"
    paper = "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022"
    requires = Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "parameter"
    stateful = True

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        level: Level | None = None,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
    ) -> None:
        super().__init__(tasks=tasks, level=level)
        if max_norm < 0:
            raise ValueError(f"Nash-MTL: max_norm must be >= 0, got {max_norm}")
        if update_weights_every < 1:
            raise ValueError(
                f"Nash-MTL: update_weights_every must be >= 1, got {update_weights_every}"
            )
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)
        assert self.num_tasks is not None
        self.register_buffer("weights", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """:func:`nash_mtl_weights` (warm-started, every k-th call), then :func:`clip_weights`."""
        due = (self.weights <= 0).any() | (self.step % self.update_weights_every == 0)
        if on_accelerator(gramian):  # solved every step, kept where due: nothing read back
            solution = power_equation(gramian, 1.0, init=self.weights)
            self.weights.copy_(torch.where(due, solution, self.weights))
        elif bool(due):
            self.weights.copy_(power_equation(gramian, 1.0, init=self.weights))
        self.step += 1
        return clip_weights(gramian, self.weights.to(gramian), self.max_norm)

    def extra_repr(self) -> str:
        return ", ".join(
            filter(
                None,
                [
                    super().extra_repr(),
                    f"max_norm={self.max_norm}",
                    f"update_weights_every={self.update_weights_every}",
                ],
            )
        )
