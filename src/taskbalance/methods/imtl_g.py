"""IMTL-G: impartial gradient balance (Liu et al., "Towards Impartial Multi-task Learning",
ICLR 2021, Sec. 3.2).

Finds weights ``a`` with ``sum(a) = 1`` such that the combined gradient ``g = sum_t a_t g_t`` has
the same projection on every unit task gradient ``u_t = g_t / ||g_t||``. The paper's closed form
``a_{2:T} = g_1 U^T (D U^T)^-1`` is equivalent to the order-free Gramian form used here:

    a = K^+ d / (1^T K^+ d),    K = G G^T,   d = sqrt(diag K).

Needs: the Gramian, at feature level (the paper's default: gradients w.r.t. the shared
representation z, the batch axis flattened with the rest) or parameter level (exact).
Cost: one T x T pseudo-inverse in float64, on top of the engine's per-task gradients.
The weights are constants: no gradient flows through them, and they are not clamped to be >= 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register

_DEGENERATE = 1e-9
"""Below this (relative to the solution's size), no impartial combination exists."""


def imtl_g_weights(gramian: Tensor) -> Tensor:
    """IMTL-G weights from a T x T Gramian of per-task gradients.

    Solved on the cosine matrix ``C = D^-1 K D^-1`` (``D = diag(d)``): with ``b = C^+ 1`` the
    weights are ``a = D^-1 b / sum(D^-1 b)``, which equals ``K^+ d / (1^T K^+ d)`` whenever every
    gradient is non-zero, but does not square the spread of the gradient norms into the
    conditioning (task gradients 1e6 apart in norm are common). Solved in float64.

    Degenerate cases (documented fallbacks, never NaN):

    - a task with a zero gradient has no direction to be impartial to: it gets weight 0 and the
      others are balanced among themselves;
    - identical or collinear gradients make ``C`` singular: the pseudo-inverse (cut-off
      ``T * eps`` of the Gramian's dtype, as ``torch.linalg.pinv``'s default) picks the
      minimum-norm solution, e.g. equal weights for identical gradients;
    - when no combination with equal projections and ``sum(a) = 1`` exists (all gradients zero,
      or exactly opposite gradients, where ``1`` is orthogonal to the range of ``C``), the
      weights are equal over the tasks with a non-zero gradient (over all tasks if none has).

    >>> imtl_g_weights(torch.eye(2))
    tensor([0.5000, 0.5000])
    >>> imtl_g_weights(torch.diag(torch.tensor([1.0, 4.0])))  # unit projections equal: a ~ 1/||g||
    tensor([0.6667, 0.3333])
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"a Gramian must be square, got shape {tuple(gramian.shape)}")
    k = gramian.detach().to(torch.float64)
    num_tasks = k.shape[0]
    norms = k.diagonal().clamp_min(0).sqrt()
    alive = norms > 0
    # A zero gradient's row and column of C are set to zero instead of being cut out: the
    # pseudo-inverse of the padded matrix is that of the live block padded with zeros, so
    # b is the same, and the step needs no boolean indexing (a device round trip each).
    inverse_norms = torch.where(alive, 1.0 / torch.where(alive, norms, 1.0), 0.0)
    cosines = k * inverse_norms[:, None] * inverse_norms[None, :]
    rtol = num_tasks * torch.finfo(gramian.dtype).eps
    b = _pinv_row_sums(cosines, rtol)
    x = b * inverse_norms
    total = x.sum()
    if not bool((b.abs().sum() > _DEGENERATE) & (total.abs() > _DEGENERATE * x.abs().sum())):
        count = alive.sum()
        equal = alive / count if bool(count > 0) else torch.full_like(norms, 1.0 / num_tasks)
        return equal.to(gramian.dtype)
    return (x / total).to(gramian.dtype)


def _pinv_row_sums(matrix: Tensor, rtol: float) -> Tensor:
    """``pinv(matrix) @ 1`` for a symmetric matrix, as ``torch.linalg.pinv(matrix, rtol=rtol,
    hermitian=True).sum(dim=1)`` computes it (eigenvalues with ``|e| <= rtol max|e|`` are cut),
    without forming the pseudo-inverse: ``V (w * V^T 1)``, a third of pinv's time at T = 3."""
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    magnitude = eigenvalues.abs()
    kept = magnitude > rtol * magnitude.max()
    inverse = torch.where(kept, 1.0 / torch.where(kept, eigenvalues, 1.0), 0.0)
    return vectors @ (inverse * vectors.sum(dim=0))


@register
class IMTLG(Method):
    """IMTL-G: the combined gradient projects equally on every task's unit gradient.

    Args:
        tasks: optional task count or names (IMTL-G keeps no state).
        level: ``"feature"`` (default, the paper's choice: gradients w.r.t. the shared
            representation z) or ``"parameter"`` (exact: w.r.t. the shared parameters).

    >>> IMTLG(level="parameter").level
    'parameter'
    """

    name = "imtl_g"
    paper = "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021"
    requires = Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "feature"

    def __init__(self, tasks: int | list[str] | None = None, level: Level | None = None) -> None:
        super().__init__(tasks=tasks, level=level)

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """See :func:`imtl_g_weights`."""
        return imtl_g_weights(gramian)
