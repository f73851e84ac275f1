"""DB-MTL: dual balancing (Lin et al., "Dual-Balancing for Multi-Task Learning", 2023,
arXiv 2308.12029).

Two balancing steps:

1. loss-scale balancing: every task loss is log-transformed, ``L_t -> log L_t``. In this API
   that is the detached loss weight ``w_t = 1 / L_t``: ``grad (w_t L_t) = grad L_t / L_t =
   grad log L_t``. The heads are trained on ``sum_t log L_t`` (the same gradient);
2. gradient-magnitude balancing on the shared part: with ``n_t = ||grad log L_t||`` (the square
   root of the Gramian's diagonal) and its exponential moving average
   ``m_t <- beta m_t + (1 - beta) n_t`` (``m = n`` at the first step), the shared part receives

       sum_t a_t grad log L_t,     a_t = max_i m_i / m_t,

   so every task's (averaged) gradient has the magnitude of the largest one.

Deviation from the paper (forced by the Gramian API, and documented): the paper keeps an EMA of
the gradient VECTORS, ``ghat_t <- beta ghat_t + (1 - beta) grad log L_t``, and updates with
``max_i ||ghat_i|| sum_t ghat_t / ||ghat_t||``, i.e. the direction is averaged too. Here only
the NORMS are averaged and the direction is the current step's; this needs T numbers of state
instead of T copies of the shared gradient, and it works at feature level, where gradients of
different mini-batches (different samples, even different batch sizes) cannot be averaged.
When the gradient norms are steady the two agree on the magnitudes. The first-step
initialisation ``m = n`` (instead of the paper's zero-initialised, then bias-prone, average) is
our choice.

Levels: ``"parameter"`` (default, as in the paper: gradients w.r.t. the shared parameters) or
``"feature"`` (w.r.t. the shared representation z: cheaper, head-only passes).
Needs: the Gramian's diagonal. Cost: T per-task gradients (batched) + one backward.
Hyperparameters: ``beta`` (default 0.9, our choice; the paper tunes it).
Requires positive losses (log L): a loss <= 0 is an error naming the task. A task whose averaged
norm is 0 (its gradient has always been zero) gets ``a_t = 0``: it contributes nothing anyway,
and ``max / 0`` would not be finite; if every averaged norm is 0, ``a = 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register


def db_mtl_gradient_weights(average_norms: Tensor) -> Tensor:
    """``a_t = max_i m_i / m_t`` for the averaged gradient norms ``m`` (0 where ``m_t = 0``).

    >>> db_mtl_gradient_weights(torch.tensor([1.0, 4.0, 0.0]))
    tensor([4., 1., 0.])
    """
    largest = average_norms.max()
    if not largest > 0:
        return torch.ones_like(average_norms)
    positive = average_norms > 0
    return torch.where(positive, largest / torch.where(positive, average_norms, 1.0), 0.0)


@register
class DBMTL(Method):
    """Dual balancing: log-losses, then every shared gradient scaled to the largest norm.

    Args:
        tasks: the number of tasks or their names (required: the norm averages are state).
        level: ``"parameter"`` (default, the paper's) or ``"feature"``.
        beta: the averaging factor of the gradient norms, in [0, 1) (0: no averaging).

    Raises:
        InvalidLossError: on a loss <= 0 (the message names the task).

    >>> method = DBMTL(tasks=2)
    >>> method.loss_weights(torch.tensor([2.0, 0.5]))[0]  # grad log L = grad L / L
    tensor([0.5000, 2.0000])
    >>> method.shared_weights(torch.ones(2), torch.diag(torch.tensor([1.0, 9.0])))  # norms 1, 3
    tensor([3., 1.])
    """

    name = "db_mtl"
    paper = "Lin et al., Dual-Balancing for Multi-Task Learning, arXiv 2308.12029, 2023"
    requires = Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "parameter"
    stateful = True

    average_norms: Tensor
    steps: Tensor

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        level: Level | None = None,
        beta: float = 0.9,
    ) -> None:
        super().__init__(tasks=tasks, level=level)
        assert self.num_tasks is not None
        if not 0 <= beta < 1:
            raise ValueError(f"DBMTL: beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.register_buffer("average_norms", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def loss_weights(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        """``w_t = 1 / L_t`` (detached): the gradient of ``w_t L_t`` is that of ``log L_t``."""
        self.require_positive(losses, "DB-MTL takes log L")
        return 1 / losses.detach(), None

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """Update the norm averages from ``diag K``; see :func:`db_mtl_gradient_weights`."""
        norms = gramian.detach().diagonal().clamp_min(0).sqrt().to(self.average_norms)
        if int(self.steps) == 0:
            self.average_norms.copy_(norms)
        else:
            self.average_norms.mul_(self.beta).add_(norms, alpha=1 - self.beta)
        self.steps += 1
        weights = db_mtl_gradient_weights(self.average_norms)
        return weights.to(device=gramian.device, dtype=gramian.dtype)

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [super().extra_repr(), f"beta={self.beta}"]))
