"""ExcessMTL: robust multi-task learning with excess risks (He et al., ICML 2024).

Tasks are weighted by how far each is from its own optimum (its excess risk), not by its raw
loss, so that a task with a high irreducible (noise) loss does not dominate. Per step, with
the task gradients ``g_t`` and an AdaGrad-like diagonal curvature estimate accumulated from
their squares,

    S_t <- S_t + g_t^2                    (elementwise, a T x n state)
    e_t = sum_j g_tj^2 / sqrt(S_tj + eps)  (the second-order excess-risk estimate g^T H^-1 g)
    e_t <- e_t / e_t^(0)                   (scaled by the first step's estimate, or the mean over
                                            ``warmup_steps`` steps of uniform weights)
    w <- softmax(log w + eta e)            (exponentiated gradient on the simplex, eta =
                                            ``robust_step_size``)
    update = sum_t w_t g_t.

Needs: the Jacobian (the squares of every coordinate of every task gradient) and a T x n
state, i.e. T times the memory of the shared gradient: at parameter level, T copies of the
shared parameters. Cost: per-task gradients + O(T n).

Choices, following torchjd's reading of the paper and its official code (the weights start at
1/T, on the simplex; the update is in log space so a huge excess risk saturates instead of
overflowing; ``eps = 1e-7``; with ``warmup_steps = 0`` the first step's estimate is the
baseline and is used unscaled at that step). ``robust_step_size = 1.0`` by default (torchjd's
default; the paper tunes it). Default level: ``"parameter"``: at feature level the state's size
includes the batch axis, so the batch size must not change between steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods._coordinate_state import CoordinateState
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register

_EPS = 1e-7
_BLOCK_ELEMENTS = 1 << 17
"""Entries of S and g per column block on CPU (512 KiB each in float32): a block's
elementwise passes then run in the core's cache instead of streaming T x n matrices from
memory once per operation."""


def accumulate_excess_risks(squares: Tensor, gradients: Tensor, work: Tensor) -> Tensor:
    """Add ``g^2`` to ``squares`` (S) in place; return ``e_t = sum_j g_tj^2 / sqrt(S_tj + eps)``.

    ``work``: a T x c scratch matrix (c >= 1) whose width is the column block: each block of
    ``squares`` is updated and reduced while it is in cache, before the next is read. The
    per-block sums are added in float64 and ``e`` is float64.

    >>> squares, g = torch.zeros(2, 3), torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 1.0]])
    >>> accumulate_excess_risks(squares, g, torch.empty(2, 2))  # ~ sum_j |g_tj| at first
    tensor([7., 1.], dtype=torch.float64)
    >>> squares
    tensor([[ 9.,  0., 16.],
            [ 0.,  0.,  1.]])
    """
    block = work.shape[1]
    sums = gradients.new_empty(-(-gradients.shape[1] // block), gradients.shape[0])
    blocks = (gradients.split(block, dim=1), squares.split(block, dim=1), sums.unbind(0))
    for g, s, total in zip(*blocks, strict=True):
        w = work if g.shape[1] == block else work[:, : g.shape[1]]
        s.addcmul_(g, g)
        torch.div(g, torch.add(s, _EPS, out=w).sqrt_(), out=w).mul_(g)
        torch.sum(w, dim=1, out=total)
    return sums.to(torch.float64).sum(dim=0)


@register
class ExcessMTL(CoordinateState, Method):
    """ExcessMTL: exponentiated-gradient task weights driven by excess-risk estimates.

    Args:
        tasks: the number of tasks or their names (required).
        level: ``"parameter"`` (default) or ``"feature"`` (fixed batch size only).
        robust_step_size: ``eta`` of the exponentiated update, > 0 (default 1.0).
        warmup_steps: steps with uniform weights that collect the baseline (default 0).

    >>> method = ExcessMTL(tasks=2)
    >>> method.aggregate(torch.ones(2), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # e = [1, 2]
    tensor([0.2689, 1.4621])
    """

    name = "excess_mtl"
    paper = "He et al., Robust Multi-Task Learning with Excess Risks, ICML 2024"
    requires = Requirement.JACOBIAN
    levels = ("feature", "parameter")
    default_level = "parameter"
    stateful = True
    coordinate_buffer = "squares"

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        level: Level | None = None,
        robust_step_size: float = 1.0,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(tasks=tasks, level=level)
        if robust_step_size <= 0:
            raise ValueError(f"ExcessMTL: robust_step_size must be > 0, got {robust_step_size}")
        if warmup_steps < 0:
            raise ValueError(f"ExcessMTL: warmup_steps must be >= 0, got {warmup_steps}")
        self.robust_step_size = float(robust_step_size)
        self.warmup_steps = int(warmup_steps)
        num = self.num_tasks
        assert num is not None
        self.register_buffer("weights", torch.full((num,), 1.0 / num, dtype=torch.float64))
        self.register_buffer("squares", torch.zeros(num, 0, dtype=torch.float64))
        self.register_buffer("baseline", torch.zeros(num, dtype=torch.float64))
        self.register_buffer("warmup_sum", torch.zeros(num, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._work: Tensor | None = None  # reused scratch of the excess risks, not state

    def aggregate(self, losses: Tensor, jacobian: Tensor) -> Tensor:
        """Update the excess-risk estimates and the weights; return ``sum_t w_t g_t``."""
        # Elementwise work stays in the Jacobian's dtype: a float64 copy of a T x n matrix
        # measured ~100x a plain step at T = 32 (benchmarks/step_time.py); only the T-vector
        # of excess risks is handled in float64. It runs in place and in a reused scratch
        # block: each fresh temporary costs page faults on CPU.
        g = jacobian.detach()
        squares = self.coordinate_state(g, lambda g: g.new_zeros(g.shape))
        g = g.to(squares)  # a no-op unless the state was given another dtype (e.g. .double())
        num, width = g.shape
        # Column blocks on CPU (see _BLOCK_ELEMENTS); one block, i.e. a handful of kernels,
        # on an accelerator, where each launch costs more than a pass over memory.
        block = max(1, min(width, _BLOCK_ELEMENTS // num) if g.device.type == "cpu" else width)
        work, wanted = self._work, ((num, block), g.dtype, g.device)
        if work is None or (work.shape, work.dtype, work.device) != wanted:
            work = self._work = g.new_empty(num, block)
        excess = accumulate_excess_risks(squares, g, work)
        step = int(self.step)
        self.step += 1
        if step < self.warmup_steps:
            self.warmup_sum += excess
            return (self.weights.to(g) @ g).to(jacobian.dtype)
        if step == self.warmup_steps:
            if self.warmup_steps > 0:
                self.baseline.copy_(self.warmup_sum / self.warmup_steps)
                excess = excess / (self.baseline + _EPS)
            else:
                self.baseline.copy_(excess)
        else:
            excess = excess / (self.baseline + _EPS)
        logits = self.weights.log() + self.robust_step_size * excess
        self.weights.copy_(torch.softmax(logits, dim=0))
        return (self.weights.to(g) @ g).to(jacobian.dtype)

    def extra_repr(self) -> str:
        return ", ".join(
            filter(
                None,
                [
                    super().extra_repr(),
                    f"robust_step_size={self.robust_step_size}",
                    f"warmup_steps={self.warmup_steps}",
                ],
            )
        )
