"""GradNorm: gradient normalisation (Chen et al., "GradNorm: Gradient Normalization for
Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018).

Task weights ``w_t`` (initialised to 1) scale the losses, ``L'_t = w_t L_t``. After each step's
per-task gradients are known, the weights move to make every task's weighted gradient norm
``G_t = ||grad_W (w_t L_t)||`` match a common target that favours the slower tasks:

    Ltilde_t = L_t / L_t(0),   r_t = Ltilde_t / mean_i Ltilde_i,   Gbar = mean_t G_t,
    L_grad = sum_t | G_t - Gbar r_t^alpha |,     (the target Gbar r_t^alpha held constant)
    dL_grad / dw_t = sign(G_t - Gbar r_t^alpha) G_t / w_t      (since G_t = w_t ||grad_W L_t||),

then ``w <- w - lr dL_grad/dw`` and ``w <- T w / sum(w)`` (the weights always sum to T). A task
whose loss has fallen less (larger ``r_t``) gets a larger target, so its weight grows.
The new weights take effect at the next step (this step's update used the weights it started
with, as in the paper).

Where the norms come from: the paper takes ``W`` = the weights of the last shared layer. Here
``level="feature"`` (default) uses the shared representation z that the heads read: the cheap
stand-in, T head-only passes. ``level="parameter"`` uses the shared parameters passed as
``shared=``: pass the last shared layer (``shared=model.trunk[-1]``) for the paper's exact choice,
or the whole trunk.

Choices where the paper is silent: ``L_t(0)`` is the first loss this method sees (kept in a
buffer); the weights follow plain gradient descent with their own learning rate ``lr`` (default
0.025, our choice) and are clamped to at least ``1e-6 T`` before the renormalisation, so that an
overshooting step can never make a weight zero or negative.
Needs: the Gramian's diagonal. Cost: T per-task gradients (batched) + one backward.
Hyperparameters: ``alpha`` (the asymmetry, default 1.5), ``lr``.
Requires positive initial losses (``L_t(0)`` divides) and non-negative losses after; if every
``Ltilde`` is 0 the ratios fall back to ``r = 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register

_MIN_WEIGHT = 1e-6
"""The smallest weight, relative to the number of tasks, before renormalisation."""


def gradnorm_update(
    weights: Tensor,
    norms: Tensor,
    losses: Tensor,
    initial_losses: Tensor,
    alpha: float = 1.5,
    lr: float = 0.025,
) -> Tensor:
    """One GradNorm step on the task weights, renormalised to sum to T.

    Args:
        weights: the current weights ``w``, positive, ``(T,)``.
        norms: ``G_t = ||grad (w_t L_t)||``, ``(T,)``.
        losses: the raw losses ``L_t``, non-negative.
        initial_losses: ``L_t(0)``, positive.
        alpha: the asymmetry (0: equal gradient norms; larger: more weight to slow tasks).
        lr: the weights' learning rate.

    >>> # equal norms, task 1's loss has not moved while task 0's has halved: w_1 grows
    >>> gradnorm_update(torch.ones(2), torch.ones(2), torch.tensor([0.5, 1.0]), torch.ones(2))
    tensor([0.9750, 1.0250])
    """
    num_tasks = weights.numel()
    inverse_rates = losses / initial_losses
    mean_rate = inverse_rates.mean()
    ratios = inverse_rates / mean_rate if mean_rate > 0 else torch.ones_like(inverse_rates)
    target = norms.mean() * ratios.pow(alpha)
    gradient = torch.sign(norms - target) * norms / weights
    stepped = (weights - lr * gradient).clamp_min(_MIN_WEIGHT * num_tasks)
    return num_tasks * stepped / stepped.sum()


@register
class GradNorm(Method):
    """GradNorm: weights that equalise the tasks' gradient norms, adjusted by training rates.

    Args:
        tasks: the number of tasks or their names (required: weights and ``L(0)`` are state).
        level: ``"feature"`` (default: norms w.r.t. z) or ``"parameter"`` (w.r.t. ``shared``).
        alpha: the asymmetry (the paper's 1.5 default; 0: pure norm equalisation).
        lr: the weights' learning rate.

    Raises:
        InvalidLossError: on a first loss <= 0 or a later loss < 0 (naming the task).

    >>> method = GradNorm(tasks=2)
    >>> method.loss_weights(torch.tensor([1.0, 1.0]))[0]
    tensor([1., 1.])
    >>> method.shared_weights(torch.ones(2), torch.diag(torch.tensor([1.0, 4.0])))
    tensor([1., 1.])
    >>> method.task_weights  # task 1's gradient is the larger: its weight goes down
    tensor([1.0380, 0.9620], dtype=torch.float64)
    """

    name = "gradnorm"
    paper = (
        "Chen et al., GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep "
        "Multitask Networks, ICML 2018"
    )
    requires = Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "feature"
    stateful = True

    task_weights: Tensor
    initial_losses: Tensor
    has_initial: Tensor

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        level: Level | None = None,
        alpha: float = 1.5,
        lr: float = 0.025,
    ) -> None:
        super().__init__(tasks=tasks, level=level)
        assert self.num_tasks is not None
        if not alpha >= 0 or not lr > 0:
            raise ValueError(f"GradNorm: need alpha >= 0 and lr > 0, got alpha={alpha}, lr={lr}")
        self.alpha, self.lr = float(alpha), float(lr)
        self.register_buffer("task_weights", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("initial_losses", torch.ones(self.num_tasks, dtype=torch.float64))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))
        self._losses: Tensor | None = None

    def loss_weights(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        """The current weights ``w`` (detached: GradNorm updates them itself)."""
        values = losses.detach().to(self.initial_losses.device, torch.float64)
        if not bool(self.has_initial):
            self.require_positive(losses, "GradNorm divides by the first loss L(0)")
            self.initial_losses.copy_(values)
            self.has_initial.fill_(True)
        else:
            self.require_positive(losses + (losses == 0), "GradNorm's rates need L >= 0")
        self._losses = values
        # A copy: the graph keeps w_t L_t's w, and shared_weights updates task_weights in place.
        return self.task_weights.to(device=losses.device, dtype=losses.dtype, copy=True), None

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """``a = 1``; the weights for the next step are updated from ``G = sqrt(diag K)``."""
        norms = gramian.detach().diagonal().clamp_min(0).sqrt().to(self.task_weights)
        raw = self._losses if self._losses is not None else losses.to(self.task_weights)
        self.task_weights.copy_(
            gradnorm_update(self.task_weights, norms, raw, self.initial_losses, self.alpha, self.lr)
        )
        self._losses = None
        return torch.ones_like(gramian.diagonal())

    def extra_repr(self) -> str:
        return ", ".join(
            filter(None, [super().extra_repr(), f"alpha={self.alpha}", f"lr={self.lr}"])
        )
