"""FAMO: fast adaptive multitask optimisation (Liu et al., "FAMO: Fast Adaptive Multitask
Optimization", NeurIPS 2023).

FAMO keeps logits ``xi`` (T numbers, initialised to 0) and task weights ``z = softmax(xi)``.

Model step: the model descends ``sum_t z_t log L_t`` rescaled so that its gradient is a convex
combination of the raw task gradients,

    d = sum_t c_t grad L_t,   c_t = (z_t / L_t) / sum_i (z_i / L_i),

so FAMO is a loss-level method with the detached weights ``w_t = c_t`` (they sum to 1 in the
weight of ``grad log L``; on the raw gradients they favour the tasks with small losses unless
``z`` compensates).

Logit step, after the model has moved: with the log-loss decreases
``delta_t = log L_t(old) - log L_t(new)``, the logits descend

    grad_xi = J_softmax(xi)^T delta = z * (delta - z . delta)   (+ gamma xi, the decay),

which lowers the weight of the tasks whose loss fell fastest, so that over time every task's log
loss decreases at the same rate. The paper's defaults: logit learning rate ``lr = 0.025`` and
decay ``gamma = 0.001``; the logit optimiser is Adam (betas 0.9, 0.999, eps 1e-8) with ``gamma``
as L2 decay, as in the authors' experiments (``optimizer="sgd"`` gives the plain step
``xi <- xi - lr (grad_xi + gamma xi)``).

Where the new losses come from (an honest API: the method cannot see them itself):

- ``update="manual"`` (default): after ``optimizer.step()`` the user calls
  ``method.update(new_losses)`` with the losses at the new parameters. Faithful: evaluate the
  SAME mini-batch again (one extra forward pass, no backward, under ``torch.no_grad()``), which
  is what the authors' released example does. Cheaper: pass the next step's losses (another
  mini-batch: noisier, since batch-to-batch variation enters ``delta``). If a step's
  ``update`` is skipped, the next call warns once (``RuntimeWarning``) and drops the stale
  losses: the weights then do not adapt.
- ``update="next_step"``: no call needed; every call first updates the logits with the previous
  call's losses as ``old`` and this call's as ``new`` (the cheap option above, automated).

Needs: the losses only (one backward, plus one forward for the faithful update). Memory: 4 T
numbers. Requires positive losses (FAMO takes ``log L``): a loss <= 0 is an error naming the
task (the paper's ``L_t - L_t^*`` with a known lower bound ``L_t^*`` is available by shifting
the loss before passing it). The logits, Adam's moments and the pending losses live in buffers,
so ``state_dict`` round-trips mid-run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from taskbalance.errors import InvalidLossError
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register

_BETAS = (0.9, 0.999)
_EPS = 1e-8


def famo_weights(logits: Tensor, losses: Tensor) -> Tensor:
    """FAMO's loss weights ``c_t = (z_t / L_t) / sum_i (z_i / L_i)``, ``z = softmax(logits)``.

    >>> famo_weights(torch.zeros(2), torch.tensor([1.0, 3.0]))  # z = 1/2: c ~ 1/L
    tensor([0.7500, 0.2500])
    """
    ratio = torch.softmax(logits, dim=0) / losses
    return ratio / ratio.sum()


def famo_logit_gradient(logits: Tensor, old: Tensor, new: Tensor) -> Tensor:
    """The logits' gradient (without decay): ``z * (delta - z . delta)``,
    ``delta = log old - log new``.

    >>> famo_logit_gradient(torch.zeros(2), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 1.0]))
    tensor([ 0.1733, -0.1733])
    """
    delta = old.log() - new.log()
    weights = torch.softmax(logits, dim=0)
    return weights * (delta - (weights * delta).sum())


@register
class FAMO(Method):
    """FAMO: adaptive task weights that equalise the rate of decrease of the log losses.

    Args:
        tasks: the number of tasks or their names (required: the logits are per-task state).
        lr: the logits' learning rate (the paper's 0.025).
        gamma: the logits' L2 decay (the paper's 0.001).
        optimizer: ``"adam"`` (default) or ``"sgd"`` for the logits.
        update: ``"manual"`` (call :meth:`update` after each optimizer step) or
            ``"next_step"`` (automatic, with the next call's losses).

    Raises:
        InvalidLossError: on a loss <= 0 (the message names the task).

    >>> method = FAMO(tasks=2, optimizer="sgd", gamma=0.0, lr=1.0)
    >>> method.loss_weights(torch.tensor([1.0, 1.0]))[0]
    tensor([0.5000, 0.5000])
    >>> method.update(torch.tensor([0.5, 1.0]))  # task 0 improved: its logit goes down
    >>> method.logits
    tensor([-0.1733,  0.1733])
    """

    name = "famo"
    paper = "Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023"
    stateful = True

    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor
    pending: Tensor
    has_pending: Tensor

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        lr: float = 0.025,
        gamma: float = 0.001,
        optimizer: Literal["adam", "sgd"] = "adam",
        update: Literal["manual", "next_step"] = "manual",
    ) -> None:
        super().__init__(tasks=tasks)
        num_tasks = self.num_tasks
        assert num_tasks is not None
        if not lr > 0 or not gamma >= 0:
            raise ValueError(f"FAMO: need lr > 0 and gamma >= 0, got lr={lr}, gamma={gamma}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"FAMO: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if update not in ("manual", "next_step"):
            raise ValueError(f"FAMO: update must be 'manual' or 'next_step', got {update!r}")
        self.lr, self.gamma = float(lr), float(gamma)
        self.optimizer, self.update_rule = optimizer, update
        # Buffers, not parameters: the user's optimizer must not touch the logits.
        self.register_buffer("logits", torch.zeros(num_tasks))
        self.register_buffer("exp_avg", torch.zeros(num_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("pending", torch.ones(num_tasks, dtype=torch.float64))
        self.register_buffer("has_pending", torch.zeros((), dtype=torch.bool))
        self._warned = False

    @property
    def wants_new_losses(self) -> bool:
        """True with ``update="manual"``: call :meth:`update` after each optimizer step."""
        return self.update_rule == "manual"

    @property
    def weights(self) -> Tensor:
        """The task weights ``z = softmax(xi)``."""
        return torch.softmax(self.logits, dim=0)

    def loss_weights(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        """``c_t`` of :func:`famo_weights`; these losses become the ``old`` of the next update."""
        self.require_positive(losses, "FAMO takes log L")
        values = losses.detach().to(self.pending.device, torch.float64)
        if bool(self.has_pending):
            if self.update_rule == "next_step":
                self._step(values)
            elif not self._warned:
                self._warned = True
                warnings.warn(
                    "FAMO: update(new_losses) was not called after the previous step, so the "
                    "task weights do not adapt; call method.update(losses) after "
                    "optimizer.step(), or build FAMO(update='next_step')",
                    RuntimeWarning,
                    stacklevel=4,
                )
        self.pending.copy_(values)
        self.has_pending.fill_(True)
        weights = famo_weights(self.logits.to(torch.float64), values)
        return weights.to(device=losses.device, dtype=losses.dtype), None

    def update(self, new_losses: Mapping[str, Tensor | float] | Sequence[Tensor | float] | Tensor):
        """Update the logits from the losses at the new parameters (after ``optimizer.step()``).

        Args:
            new_losses: the T losses re-evaluated after the step (a dict by task name, a
                sequence, or a 1-D tensor); gradients are not needed.

        Raises:
            RuntimeError: no step is pending (``update`` twice, or before any ``backward``), or
                ``update="next_step"``, where the method updates itself.
            InvalidLossError: a loss <= 0 or a wrong number of losses.
        """
        if self.update_rule == "next_step":
            raise RuntimeError("FAMO(update='next_step') updates itself; do not call update()")
        if not bool(self.has_pending):
            raise RuntimeError(
                "FAMO.update() needs a preceding step: call method.backward(losses), then "
                "optimizer.step(), then method.update(new_losses), once per step"
            )
        values = self._as_vector(new_losses)
        self.require_positive(values, "FAMO takes log L")
        self._step(values.to(self.pending.device, torch.float64))

    def _as_vector(self, losses: Mapping[str, Tensor | float] | Sequence | Tensor) -> Tensor:
        if isinstance(losses, Mapping):
            names = self.task_names or tuple(losses)
            if set(names) != {str(k) for k in losses}:
                raise InvalidLossError(
                    f"FAMO.update: expected the tasks {list(names)}, got {list(losses)}"
                )
            items = [losses[name] for name in names]
        elif isinstance(losses, Tensor):
            items = list(losses.detach().reshape(-1))
        else:
            items = list(losses)
        values = torch.stack([torch.as_tensor(v).detach().reshape(()).double() for v in items])
        if values.numel() != self.num_tasks:
            raise InvalidLossError(
                f"FAMO.update: expected {self.num_tasks} losses, got {len(items)}"
            )
        if not torch.isfinite(values).all():
            raise InvalidLossError(f"FAMO.update: non-finite losses {values.tolist()}")
        return values

    def _step(self, new: Tensor) -> None:
        grad = famo_logit_gradient(self.logits.to(torch.float64), self.pending, new)
        grad = grad.to(self.logits.dtype) + self.gamma * self.logits
        if self.optimizer == "sgd":
            self.logits -= self.lr * grad
        else:
            self.steps += 1
            step = int(self.steps)
            self.exp_avg.mul_(_BETAS[0]).add_(grad, alpha=1 - _BETAS[0])
            self.exp_avg_sq.mul_(_BETAS[1]).addcmul_(grad, grad, value=1 - _BETAS[1])
            corrected = self.exp_avg / (1 - _BETAS[0] ** step)
            denominator = (self.exp_avg_sq / (1 - _BETAS[1] ** step)).sqrt() + _EPS
            self.logits -= self.lr * corrected / denominator
        self.has_pending.fill_(False)

    def extra_repr(self) -> str:
        parts = [
            super().extra_repr(),
            f"lr={self.lr}",
            f"gamma={self.gamma}",
            f"optimizer={self.optimizer!r}",
            f"update={self.update_rule!r}",
        ]
        return ", ".join(filter(None, parts))
