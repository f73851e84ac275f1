"""EMTL: equitable multi-task learning (Yuan and Zhang, "Equitable Multi-task Learning",
arXiv 2306.09373), as this project reads its abstract.

Only the abstract is public. It fixes the quantity, task t's *relative contribution* to the
update of the shared parameters, ``r_t = L_t / ||g_t||`` (the loss over its raw gradient norm:
the length of task t's Polyak step, invariant to scaling ``L_t``), and says that a variance
regulariser making the ``r_t`` closer is added "efficiently". This project's formulation: with
the norms and the mean held constant (the efficient part), descend on the shared parameters

    J = sum_t r_t + lam * Var_t(r) / mean_t(r),

whose gradient is a weighted sum of the unit task gradients ``u_t = g_t / ||g_t||``:

    grad J = sum_t c_t u_t,    c_t = 1 + (2 lam / T) (r_t / mean(r) - 1),    clamped c_t >= 0,

applied as weights on the raw gradients, ``a_t = c_t * gbar / ||g_t||`` with ``gbar`` the mean
gradient norm (a constant), so that the update has the scale of an average task gradient.
``lam = 0`` is pure gradient-norm equalisation; ``lam = T/2`` gives ``c_t = r_t / mean(r)``
(weights proportional to each task's own Polyak step); a larger ``lam`` favours lagging tasks
(large ``r_t``) more, and clamps the leading ones to zero. No clamp ever binds while
``lam <= T/2``, since ``c_t >= 1 - 2 lam / T``.

``base="sum"`` keeps the plain sum of the losses and adds the same regulariser,
``J = sum_t L_t + lam * gbar * Var_t(r) / mean_t(r)``, i.e. ``a_t = 1 + (2 lam / T)
(r_t / mean(r) - 1) gbar / ||g_t||`` clamped at 0: the regulariser's part of the update is
exactly the one of the default base, only the base term differs.

Needs: the Gramian's diagonal (the per-task gradient norms), at parameter level (exact, the
default) or at feature level (norms of the gradients w.r.t. the shared representation z: T
head-only passes, cheap). Cost: O(T) on top of the engine's per-task gradients. The heads
receive their own loss's gradient, unweighted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from taskbalance.engine.placement import on_accelerator
from taskbalance.engine.requirement import Level, Requirement
from taskbalance.errors import InvalidLossError, NonFiniteLossError
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register

Base = Literal["relative", "sum"]

DEFAULT_LAM = 1.0
"""The largest ``T``-independent ``lam`` for which the clamp ``c_t >= 0`` never binds for any
``T >= 2`` (``c_t >= 1 - 2 lam / T >= 0``), so the update is always the exact gradient of ``J``;
at ``T = 2`` it equals the Polyak-proportional weighting ``lam = T / 2``. A validation run on
QM9 (docs/methods.md: lam in {0, 0.5, 1, 2, 5.5, 11}, one seed) found it best on validation
Delta m; one seed is a weak basis, see the caveats there."""


def relative_contributions(losses: Tensor, norms: Tensor) -> Tensor:
    """EMTL's ``r_t = L_t / ||g_t||``; ``inf`` where the gradient is zero (and ``L_t > 0``),
    ``0`` where both are zero.

    Invariant to a positive scaling of a loss: ``(c L) / ||c g|| = L / ||g||``.

    >>> relative_contributions(torch.tensor([2.0, 3.0, 0.0]), torch.tensor([4.0, 0.0, 0.0]))
    tensor([0.5000,    inf, 0.0000])
    """
    ratio = losses / norms
    return torch.where((losses == 0) & (norms == 0), torch.zeros_like(ratio), ratio)


def emtl_weights(
    losses: Tensor,
    norms: Tensor,
    lam: float = DEFAULT_LAM,
    base: Base = "relative",
    task_names: Sequence[str] | None = None,
) -> Tensor:
    """EMTL's weights ``a_t`` of the raw task gradients (see the module docstring).

    Args:
        losses: the task losses ``L_t`` (``>= 0``), shape ``(T,)``.
        norms: the gradient norms ``||g_t||`` of those losses, shape ``(T,)``.
        lam: the variance regulariser's strength (``>= 0``).
        base: ``"relative"`` (``sum_t r_t``, the method) or ``"sum"`` (``sum_t L_t``).
        task_names: names for error messages.

    Degenerate cases (documented fallbacks, finite output):

    - a task whose gradient is numerically zero (``||g_t|| <= max_s ||g_s|| * eps^2`` of the
      dtype, so that ``gbar / ||g_t||`` stays representable) has ``r_t = inf`` and no direction:
      it gets weight 0 (``1`` under ``base="sum"``, where its zero gradient adds nothing) and
      is left out of ``T``, ``mean(r)`` and ``gbar``, which are taken over the other tasks;
    - all gradients zero: weights ``0`` (``1`` under ``base="sum"``); the update is zero anyway;
    - ``mean(r) = 0`` (every live task has zero loss, i.e. is done): no task lags, the
      regulariser is dropped (``c_t = 1``).

    Raises:
        InvalidLossError: a negative loss (``r_t`` is a distance to zero loss and needs
            ``L_t >= 0``), or a negative ``lam``.
        NonFiniteLossError: a NaN or infinite loss or norm, naming the task.

    The two value checks are not made for tensors on an accelerator, where they would read the
    losses back every step (:mod:`taskbalance.engine.placement`).

    >>> emtl_weights(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 4.0]), lam=0.0)
    tensor([2.5000, 0.6250])
    >>> emtl_weights(torch.tensor([4.0, 1.0]), torch.tensor([1.0, 1.0]), lam=1.0)  # c = r / mean r
    tensor([1.6000, 0.4000])
    """
    if losses.shape != norms.shape or losses.dim() != 1:
        raise ValueError(
            f"losses and norms must be two vectors of the same length, got shapes "
            f"{tuple(losses.shape)} and {tuple(norms.shape)}"
        )
    if lam < 0:
        raise InvalidLossError(f"EMTL: lam must be >= 0, got {lam}")
    if base not in ("relative", "sum"):
        raise ValueError(f"EMTL: base must be 'relative' or 'sum', got {base!r}")

    def label(i: int) -> str:
        return task_names[i] if task_names is not None else str(i)

    if not on_accelerator(losses):
        _check_values(losses, norms, label)
    dtype = losses.dtype
    loss64, norm64 = losses.detach().to(torch.float64), norms.detach().to(torch.float64)
    # "Zero" is relative to the largest norm: below it, gbar / ||g_t|| would overflow the
    # dtype that the weights are applied in.
    alive = norm64 > norm64.max() * torch.finfo(dtype).eps ** 2
    fallback = 0.0 if base == "relative" else 1.0
    # Masked over the live tasks rather than indexed by them: no count or branch is read back
    # from the device.
    count = alive.sum()
    live_norms = torch.where(alive, norm64, 1.0)
    r = torch.where(alive, loss64 / live_norms, 0.0)
    mean_r = r.sum() / count.clamp_min(1)
    # mean(r) = 0: every live task is done, none lags; the regulariser is dropped.
    lagging = mean_r > 0
    ratio = r / torch.where(lagging, mean_r, 1.0)
    spread = torch.where(lagging, (2.0 * lam / count.clamp_min(1)) * (ratio - 1.0), 0.0)
    gbar = torch.where(alive, norm64, 0.0).sum() / count.clamp_min(1)
    if base == "relative":
        live = (1.0 + spread).clamp_min(0.0) * gbar / live_norms
    else:
        live = (1.0 + spread * gbar / live_norms).clamp_min(0.0)
    return torch.where(alive, live, fallback).to(dtype)


def _check_values(losses: Tensor, norms: Tensor, label: Callable[[int], str]) -> None:
    """EMTL's input checks, on the host: finite losses and norms, and no negative loss."""
    bad = ~(torch.isfinite(losses) & torch.isfinite(norms))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise NonFiniteLossError(
            f"EMTL: task '{label(i)}' has loss {losses[i].item()} and gradient norm "
            f"{norms[i].item()}; both must be finite",
            task=label(i),
        )
    _check_signs(losses, label)


def _check_signs(losses: Tensor, label: Callable[[int], str]) -> None:
    negative = (losses < 0).nonzero().flatten().tolist()
    if negative:
        listed = ", ".join(f"'{label(i)}' = {losses[i].item():.4g}" for i in negative)
        raise InvalidLossError(
            f"EMTL needs losses >= 0 (r_t = L_t / ||g_t|| is a distance to zero loss), got "
            f"{listed}; shift such a loss by a constant",
            task=label(negative[0]),
        )


@register
class EMTL(Method):
    """EMTL: make the tasks' relative contributions ``r_t = L_t / ||g_t||`` equal.

    Default ``lam = 1.0``: the largest ``T``-independent value for which the clamp never binds
    (so the update is the exact gradient of ``J``), equal to the Polyak-proportional
    ``lam = T/2`` at ``T = 2``, and the best of {0, 0.5, 1, 2, 5.5, 11} on validation Delta m in
    a one-seed QM9 run (docs/methods.md gives the command, the table and its caveats).

    Args:
        tasks: optional task count or names (EMTL keeps no state).
        lam: the variance regulariser's strength, ``>= 0``.
        level: ``"parameter"`` (default, exact: norms of the gradients w.r.t. the shared
            parameters, the Gramian's diagonal) or ``"feature"`` (w.r.t. the shared
            representation z).
        base: ``"relative"`` (default: ``sum_t r_t``, norm-equalised) or ``"sum"`` (the plain
            sum of the losses plus the same regulariser).

    The losses must be ``>= 0``; composing EMTL with a loss-level method is not part of it
    (its own loss weights are ones: the heads get the plain sum of the losses).

    >>> method = EMTL(lam=0.0)
    >>> method.shared_weights(torch.tensor([1.0, 1.0]), torch.diag(torch.tensor([1.0, 16.0])))
    tensor([2.5000, 0.6250])
    """

    name = "emtl"
    paper = "Yuan and Zhang, Equitable Multi-task Learning, arXiv 2306.09373 (abstract reading)"
    requires = Requirement.GRAMIAN
    levels = ("parameter", "feature")
    default_level = "parameter"

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        lam: float = DEFAULT_LAM,
        level: Level | None = None,
        base: Base = "relative",
    ) -> None:
        super().__init__(tasks=tasks, level=level)
        if lam < 0:
            raise ValueError(f"EMTL: lam must be >= 0, got {lam}")
        if base not in ("relative", "sum"):
            raise ValueError(f"EMTL: base must be 'relative' or 'sum', got {base!r}")
        self.lam = float(lam)
        self.base: Base = base

    def check_losses(self, losses: Tensor) -> None:
        """No negative loss (before anything is back-propagated)."""
        _check_signs(losses, self.task_label)

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """:func:`emtl_weights` with the norms from the Gramian's diagonal."""
        norms = gramian.diagonal().clamp_min(0).sqrt()
        names = [self.task_label(i) for i in range(losses.numel())]
        return emtl_weights(losses, norms.to(losses.dtype), self.lam, self.base, names)

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"lam={self.lam}"]
        if self.base != "relative":
            parts.append(f"base={self.base!r}")
        return ", ".join(filter(None, parts))
