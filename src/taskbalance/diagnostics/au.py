"""AU: which task dominates which layer of an adaptive optimizer (AdaTask's analysis tool,
Yang et al., AAAI 2023).

The paper's exact formula was not available; this is the project's definition. The update of a
shared parameter ``p`` (a "layer") at step ``s`` is split into per-task parts that sum to it:

- AdaTask: task k's own term, ``d_k = lr * m^_k / (sqrt(v^_k) + eps)`` (for the RMSprop and
  Adagrad variants, ``lr * g_k / (sqrt(G_k) + eps)``);
- plain Adam: task k's gradient through the JOINT preconditioner,
  ``d_k = lr * m^_k / (sqrt(v^) + eps)``, where ``m_k`` is an exponential average of task k's
  gradients with Adam's ``beta1`` (so that ``sum_k m_k = m``, Adam's first moment) and ``v^`` is
  Adam's own bias-corrected second moment. ``sum_k d_k`` is then Adam's update exactly (without
  the L2 decay's part, which belongs to no task).

Every sampled step (every ``every`` steps) the squared norm of each part is averaged
exponentially, per layer and task, with bias correction:

    AU_k(p) <- beta * AU_k(p) + (1 - beta) * ||d_k(p)||^2,     reported as AU_k / (1 - beta^n)
    share_k(p) = AU_k(p) / sum_j AU_j(p)                        (1/T where every AU is 0)

after ``n`` samples. A share near 1 means task k's gradients drive that layer's update; equal
shares mean no task dominates. The shares of all layers together use the AU summed over layers.

Cost: for AdaTask, one pass over the T per-task directions on sampled steps only (the optimizer
has them); for plain Adam, one exponential average of the T per-task gradients per step (T
buffers per shared parameter) plus one pass on sampled steps; the per-task gradients themselves
come from :func:`taskbalance.task_gradients` (T backward passes instead of one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class AUTracker:
    """Exponential averages of each task's squared update, per layer (see the module doc).

    Args:
        beta: the average's decay per sample (0.9: a horizon of about 10 samples).
        every: sample every ``every`` steps (1: every step).

    >>> tracker = AUTracker(beta=0.5)
    >>> tracker.tick()
    True
    >>> tracker.update("trunk.weight", torch.tensor([9.0, 1.0]))
    >>> tracker.shares()["trunk.weight"]
    tensor([0.9000, 0.1000], dtype=torch.float64)
    """

    def __init__(self, beta: float = 0.9, every: int = 1) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"AUTracker: beta must be in [0, 1), got {beta}")
        if every < 1:
            raise ValueError(f"AUTracker: every must be >= 1, got {every}")
        self.beta = beta
        self.every = every
        self.steps = 0
        """Steps seen (calls to :meth:`tick`)."""
        self.sampling = False
        """Whether the current step is sampled."""
        self._averages: dict[str, Tensor] = {}
        self._samples: dict[str, int] = {}

    def tick(self) -> bool:
        """Count one step; return whether it is sampled (the caller then calls
        :meth:`update` for each layer)."""
        self.steps += 1
        self.sampling = (self.steps - 1) % self.every == 0
        return self.sampling

    def update(self, layer: str, squares: Tensor) -> None:
        """Fold in one sample of a layer's per-task squared update norms, shape ``(T,)``."""
        squares = squares.detach().to(torch.float64).cpu()
        if squares.dim() != 1:
            raise ValueError(f"AU of layer '{layer}': expected a (T,) vector, got {squares.shape}")
        if not torch.isfinite(squares).all():
            raise ValueError(f"AU of layer '{layer}': non-finite squared updates {squares}")
        held = self._averages.get(layer)
        if held is not None and held.shape != squares.shape:
            raise ValueError(
                f"AU of layer '{layer}': {squares.numel()} tasks, earlier {held.numel()}"
            )
        if held is None:
            held = torch.zeros_like(squares)
        self._averages[layer] = held.mul(self.beta).add_(squares, alpha=1.0 - self.beta)
        self._samples[layer] = self._samples.get(layer, 0) + 1

    @property
    def layers(self) -> list[str]:
        """The layers seen so far, in first-seen order."""
        return list(self._averages)

    def values(self) -> dict[str, Tensor]:
        """The bias-corrected AU per layer, ``(T,)`` each."""
        return {
            layer: held / (1.0 - self.beta ** self._samples[layer])
            for layer, held in self._averages.items()
        }

    def shares(self) -> dict[str, Tensor]:
        """Each task's share of each layer's AU (sums to 1 per layer)."""
        return {layer: _shares(value) for layer, value in self.values().items()}

    def total_shares(self) -> Tensor | None:
        """Each task's share of the AU summed over all layers (``None`` before any sample)."""
        values = list(self.values().values())
        return _shares(torch.stack(values).sum(dim=0)) if values else None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after a checkpoint."""
        return {
            "beta": self.beta,
            "every": self.every,
            "steps": self.steps,
            "averages": {k: v.clone() for k, v in self._averages.items()},
            "samples": dict(self._samples),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.beta, self.every, self.steps = state["beta"], state["every"], state["steps"]
        self._averages = {k: v.clone() for k, v in state["averages"].items()}
        self._samples = dict(state["samples"])


def _shares(values: Tensor) -> Tensor:
    total = values.sum()
    if total <= 0:
        return torch.full_like(values, 1.0 / values.numel())
    return values / total


class AdamAU:
    """The AU diagnostic for a plain ``torch.optim.Adam`` / ``AdamW`` (see the module doc).

    Call :meth:`observe` after every ``optimizer.step()`` with the per-task gradients of the
    shared parameters whose sum the optimizer stepped on (from
    :func:`taskbalance.task_gradients`); start it with the optimizer, so that its per-task
    first moments sum to Adam's.

    Args:
        optimizer: the Adam optimizer (read only: its ``exp_avg_sq``, ``step``, ``lr``, ...).
        shared: the shared parameters, in the order of the blocks given to :meth:`observe`.
        names: one name per shared parameter (default ``"shared.<i>"``).
        beta, every: as :class:`AUTracker`.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> adam = torch.optim.Adam([w], lr=0.1)
    >>> au = AdamAU(adam, [w])
    >>> blocks = [torch.tensor([[1.0, 1.0], [100.0, 100.0]])]
    >>> w.grad = blocks[0].sum(0); adam.step(); au.observe(blocks)
    >>> au.tracker.shares()["shared.0"]  # the large task drives the update
    tensor([9.9990e-05, 9.9990e-01], dtype=torch.float64)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        shared: Sequence[Tensor],
        names: Sequence[str] | None = None,
        beta: float = 0.9,
        every: int = 1,
    ) -> None:
        self.optimizer = optimizer
        self.shared = list(shared)
        self.names = (
            list(names) if names is not None else [f"shared.{i}" for i in range(len(shared))]
        )
        if len(self.names) != len(self.shared):
            raise ValueError(f"AdamAU: {len(self.names)} names for {len(self.shared)} parameters")
        self.tracker = AUTracker(beta=beta, every=every)
        self._groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for name, param in zip(self.names, self.shared, strict=True):
            if id(param) not in self._groups:
                raise ValueError(f"AdamAU: shared parameter '{name}' is not in the optimizer")
        self.means: dict[int, Tensor] = {}

    @torch.no_grad()
    def observe(self, blocks: Sequence[Tensor | None]) -> None:
        """Fold in one step's per-task gradients (``(T, *shape)`` per shared parameter, or
        ``None`` for one no task reaches); sample the AU when due."""
        if len(blocks) != len(self.shared):
            raise ValueError(f"AdamAU: {len(blocks)} blocks for {len(self.shared)} parameters")
        sampling = self.tracker.tick()
        for name, param, block in zip(self.names, self.shared, blocks, strict=True):
            if block is None:
                continue
            group = self._groups[id(param)]
            beta1, beta2 = group["betas"]
            mean = self.means.get(id(param))
            if mean is None:
                mean = self.means[id(param)] = torch.zeros_like(block)
            elif mean.shape != block.shape:
                raise ValueError(
                    f"AdamAU: parameter '{name}' got blocks of shape {tuple(block.shape)}, "
                    f"earlier {tuple(mean.shape)}"
                )
            mean.lerp_(block, 1.0 - beta1)
            if not sampling:
                continue
            state = self.optimizer.state[param]
            if "exp_avg_sq" not in state:
                raise RuntimeError(
                    f"AdamAU: parameter '{name}' has no Adam state; call observe after step()"
                )
            step = float(state["step"])
            second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            denominator = second.sqrt() / math.sqrt(1.0 - beta2**step) + group["eps"]
            factor = group["lr"] / (1.0 - beta1**step)
            parts = mean / denominator
            squares = parts.reshape(parts.shape[0], -1).square().sum(dim=1) * factor**2
            self.tracker.update(name, squares)

    def state_dict(self) -> dict[str, Any]:
        """The tracker's state and the per-task first moments (by parameter index)."""
        return {
            "tracker": self.tracker.state_dict(),
            "means": {
                i: self.means[id(p)].clone()
                for i, p in enumerate(self.shared)
                if id(p) in self.means
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.tracker.load_state_dict(state["tracker"])
        self.means = {id(self.shared[i]): m.clone() for i, m in state["means"].items()}
