"""IMTL-G: impartial gradient balance (Liu et al., "Towards Impartial Multi-task Learning",
ICLR 2021, Sec. 3.2).

Finds weights ``a`` with ``sum(a) = 1`` such that the combined gradient ``g = sum_t a_t g_t`` has
the same projection on every unit task gradient ``u_t = g_t / ||g_t||``. The paper's closed form
``a_{2:T} = g_1 U^T (D U^T)^-1`` is equivalent to the order-free Gramian form used here:

    a = K^+ d / (1^T K^+ d),    K = G G^T,   d = sqrt(diag K).

Needs: the Gramian, at feature level (the paper's default: gradients w.r.t. the shared
representation z, the batch axis flattened with the rest) or parameter level (exact).
Cost: one T x T eigendecomposition in float64 on the host, on top of the engine's per-task
gradients; for a Gramian on an accelerator (T <= 12), Jacobi rotations on the device instead,
nothing read back (:func:`taskbalance.methods._device_solvers.symmetric_eigh`).
The weights are constants: no gradient flows through them, and they are not clamped to be >= 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from taskbalance.engine.placement import HostGramian, on_accelerator, to_host, to_tensor
from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods import _device_solvers
from taskbalance.methods._device_solvers import FACE_LIMIT
from taskbalance.methods._simplex import diagonal_norms, inverse_eigenvalues
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
    if on_accelerator(gramian) and gramian.shape[0] <= FACE_LIMIT:
        return _device_solvers.imtl_g_weights(gramian, _DEGENERATE)
    k = to_host(gramian)
    norms = diagonal_norms(k)
    alive = norms > 0
    # A zero gradient's row and column of C are set to zero instead of being cut out: the
    # pseudo-inverse of the padded matrix is that of the live block padded with zeros, so b is
    # the same.
    inverse_norms = np.where(alive, 1.0 / np.where(alive, norms, 1.0), 0.0)
    cosines = k * np.outer(inverse_norms, inverse_norms)
    weights = imtl_g_host(cosines, inverse_norms, torch.finfo(gramian.dtype).eps)
    return to_tensor(weights, gramian, gramian.dtype)


def imtl_g_host(cosines: np.ndarray, inverse_norms: np.ndarray, eps: float) -> np.ndarray:
    """:func:`imtl_g_weights` from float64 host arrays: the cosine matrix ``C`` and the
    inverse gradient norms ``1 / ||g_t||`` (zero rows, columns and entries for a zero
    gradient); ``eps``: the machine epsilon of the dtype the Gramian was computed in, which
    sets the pseudo-inverse's cut-off.

    >>> imtl_g_host(np.eye(2), np.array([1.0, 0.5]), 1e-7)
    array([0.66666667, 0.33333333])
    """
    num_tasks = cosines.shape[0]
    # pinv(C) @ 1 = V (e^+ * V^T 1), without forming the pseudo-inverse.
    eigenvalues, vectors = np.linalg.eigh(cosines)
    b = vectors @ (inverse_eigenvalues(eigenvalues, num_tasks, eps) * vectors.sum(axis=0))
    x = b * inverse_norms
    total = x.sum()
    if not (np.abs(b).sum() > _DEGENERATE and abs(total) > _DEGENERATE * np.abs(x).sum()):
        alive = inverse_norms > 0
        count = alive.sum()
        return alive / count if count > 0 else np.full(num_tasks, 1.0 / num_tasks)
    return x / total


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

    def host_weights(self, losses: Tensor, gramian: HostGramian) -> np.ndarray:
        """See :func:`imtl_g_host`."""
        return imtl_g_host(gramian.cosines, 1.0 / gramian.norms, gramian.eps)
