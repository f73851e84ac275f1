"""CAGrad: conflict-averse gradient descent (Liu et al., "Conflict-Averse Gradient Descent for
Multi-task Learning", NeurIPS 2021, Algorithm 1).

The update maximises the worst task's improvement in a ball around the mean gradient ``g_0``:

    d = argmax_{||d - g_0|| <= c ||g_0||} min_t g_t . d.

Its dual is a problem over the simplex, on the Gramian only:

    w = argmin_{w in simplex} g_w . g_0 + c ||g_0|| ||g_w||,   g_w = sum_t w_t g_t,
    d = g_0 + (c ||g_0|| / ||g_w||) g_w,

i.e. weights ``a = 1/T + (c ||g_0|| / ||g_w||) w`` on the original gradients, and the paper's
code then divides by ``1 + c^2`` (``rescale="1+c^2"``, the default here as there).

Solver (the paper uses scipy's SLSQP on the T weights, torchjd cvxpy): with
``F(w, s) = b^T w + r (w^T K w / (2 s) + s / 2)``, jointly convex and equal to the objective at
``s = ||g_w||``, the optimal ``s`` is the root of ``||g_{w(s)}|| = s`` where ``w(s)`` solves the
simplex QP ``min_w F(w, s)`` exactly (:func:`taskbalance.methods._simplex.active_set`); the
root is bracketed in ``[0, max_t ||g_t||]`` and found by the Illinois (regula falsi) method.
At the optimum, every task with ``w_t > 0`` has the smallest improvement ``g_t . d``. Up to
four tasks the dual is first solved in closed form on every face of the simplex at once
(:func:`_best_face`; the root search remains for singular or tied faces), and on an
accelerator always so (:mod:`taskbalance.methods._device_solvers`).

Degenerate cases: ``c = 0`` returns the mean, 1/T each, with no solve; when ``||g_w||``
vanishes (the tasks are Pareto-stationary: 0 lies in their convex hull) the weights fall back to
1/T (``d = g_0``). "Vanishes" means within the rounding of ``sqrt(w^T K w)``,
``sqrt(T eps) sum_t w_t ||g_t||`` with ``eps`` of the Gramian's dtype
(:func:`stationary_tolerance`): a minimum norm of 0 computes as about ``sqrt(eps)`` times the
combined gradients' size, and reading that noise as a direction gives weights that rounding
chose (with an exact-zero test, 144 of 400 random stationary 5-task Gramians got weights up to
0.49 where 0.16 is right).
Needs: the Gramian. Cost: per-task gradients + about 10 to 40 small QPs.
Default level: ``"parameter"`` (the paper's setting); ``c = 0.5`` by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from taskbalance.engine.placement import on_accelerator, to_host, to_tensor
from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods import _device_solvers
from taskbalance.methods._simplex import (
    active_set,
    check_gramian,
    diagonal_norms,
)
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register

Rescale = Literal["none", "1+c^2", "1+c"]
_RESCALES = ("none", "1+c^2", "1+c")


def stationary_tolerance(k: np.ndarray, w: np.ndarray, dtype: torch.dtype) -> float:
    """The ``||g_w||`` at or below which the combination ``g_w = sum_t w_t g_t`` of a Gramian
    ``k`` of ``dtype`` counts as zero: ``sqrt(T eps) sum_t w_t ||g_t||``, the size of the
    rounding in ``sqrt(w^T K w)`` (each entry ``K_ij`` carries an error of about
    ``eps ||g_i|| ||g_j||``). Scaled by the norms ``w`` combines, not the largest norm, so that
    tasks of very different gradient sizes are not read as stationary.

    >>> k = np.diag([4.0, 1.0])  # gradient norms 2 and 1
    >>> w = np.array([0.2, 0.8])  # combines 0.2 * 2 + 0.8 * 1 = 1.2
    >>> [f"{stationary_tolerance(k, w, dtype):.3g}" for dtype in (torch.float32, torch.float64)]
    ['0.000586', '2.53e-08']
    """
    return float(np.sqrt(k.shape[0] * torch.finfo(dtype).eps) * (w @ diagonal_norms(k)))


def cagrad_inner(gramian: Tensor, c: float, *, max_iter: int = 100) -> Tensor:
    """The dual weights ``w = argmin_{w in simplex} b^T w + r sqrt(w^T K w)`` (float64).

    ``b = K 1 / T`` and ``r = c sqrt(1^T K 1) / T = c ||g_0||``. See the module docstring for
    the method. ``c = 0`` returns MGDA's weights (the ``s -> 0`` limit).

    >>> import torch
    >>> cagrad_inner(torch.eye(2, dtype=torch.float64), c=0.5)
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    check_gramian(gramian)
    if _on_device(gramian):
        return _device_solvers.cagrad_inner(gramian, c, _device_tolerance(gramian))
    return to_tensor(_inner(to_host(gramian), c, gramian.dtype, max_iter), gramian)


def _on_device(gramian: Tensor) -> bool:
    """Solved where the Gramian lives, every face at once, up to the device solvers' size."""
    return on_accelerator(gramian) and gramian.shape[0] <= _device_solvers.FACE_LIMIT


def _device_tolerance(gramian: Tensor) -> Callable[[Tensor], Tensor]:
    """:func:`stationary_tolerance` as a function of ``w``, in torch ops on the device."""
    k = gramian.detach().to(torch.float64)
    factor = (k.shape[0] * torch.finfo(gramian.dtype).eps) ** 0.5
    norms = k.diagonal().clamp_min(0).sqrt()
    return lambda w: factor * (w @ norms)


def _inner(k: np.ndarray, c: float, dtype: torch.dtype, max_iter: int = 100) -> np.ndarray:
    """:func:`cagrad_inner` on a float64 array: every QP of the root search stays on the host.
    When MGDA's minimum norm is within the rounding of a ``dtype`` Gramian
    (:func:`stationary_tolerance`), MGDA's weights are the answer."""
    num = k.shape[0]
    b = k.sum(axis=1) / num
    radius = c * np.sqrt(max(k.sum(), 0.0)) / num
    mgda = active_set(k, np.zeros(num), simplex=True)
    high = diagonal_norms(k).max()

    def norm(w: np.ndarray) -> float:
        return float(np.sqrt(max(w @ k @ w, 0.0)))

    def gap(s: float) -> tuple[float, np.ndarray]:
        w = active_set(radius / s * k, b, simplex=True)
        return norm(w) - s, w

    low_gap = norm(mgda)
    if not (radius > 0 and high > 0 and low_gap > stationary_tolerance(k, mgda, dtype)):
        return mgda
    face = _best_face(k, b, radius) if num <= _EVERY_FACE_UP_TO else None
    if face is not None:
        return face
    lo, hi, f_lo = 0.0, float(high), low_gap
    f_hi, w_hi = gap(hi)
    if f_hi >= 0:
        return w_hi
    best = w_hi
    side = 0
    for _ in range(max_iter):
        s = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        f_s, best = gap(s)
        if abs(f_s) <= 1e-12 * high or hi - lo <= 1e-14 * high:
            break
        if f_s > 0:
            lo, f_lo = s, f_s
            if side == 1:
                f_hi = f_hi / 2  # Illinois: halve the stale end to avoid one-sided stalls
            side = 1
        else:
            hi, f_hi = s, f_s
            if side == -1:
                f_lo = f_lo / 2
            side = -1
    return best


_EVERY_FACE_UP_TO = 4
"""Up to this many tasks the host first solves every face at once in closed form
(:func:`_best_face`) instead of the root search's chain of QPs: about seven QPs at T = 3."""


def _best_face(k: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray | None:
    """The dual's minimiser from every face's closed form at once
    (:func:`taskbalance.methods._device_solvers.cagrad_face_minimisers`), in Jacobi-scaled
    variables; ``None`` (the root search then runs) when a face system is singular or the best
    face is not unique."""
    num = k.shape[0]
    diagonal = np.maximum(np.diagonal(k), 0.0)
    if not (diagonal > 0).all():
        return None
    s = 1.0 / np.sqrt(diagonal)
    q, bs = s[:, None] * k * s[None, :], s * b
    faces = ((np.arange(1, 2**num)[:, None] >> np.arange(num)) & 1).astype(bool)
    systems = np.where(faces[:, :, None] & faces[:, None, :], q, 0.0)
    systems[:, np.arange(num), np.arange(num)] += ~faces
    rhs = np.stack([np.where(faces, s, 0.0), np.where(faces, bs, 0.0)], axis=2)
    try:
        solved = np.linalg.solve(systems, rhs)
    except np.linalg.LinAlgError:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        y, solvable = _device_solvers.cagrad_face_minimisers(
            solved[..., 0], solved[..., 1], s, bs, radius, np.sqrt
        )
        curvature = np.einsum("fi,ij,fj->f", y, q, y)
        size = 1.0 + np.abs(y).max(axis=1)
        feasible = solvable & np.isfinite(size) & (y >= -1e-12 * size[:, None]).all(axis=1)
        objective = y @ bs + radius * np.sqrt(np.maximum(curvature, 0.0))
    values = np.where(feasible, objective, np.inf)
    lowest = values.min()
    if not np.isfinite(lowest) or (values <= lowest + 1e-9 * (abs(lowest) + 1.0)).sum() > 1:
        return None
    w = np.maximum(y[values.argmin()], 0.0) * s
    return w / w.sum()


def cagrad_weights(gramian: Tensor, c: float = 0.5, rescale: Rescale = "1+c^2") -> Tensor:
    """CAGrad weights ``a = (1/T + (c ||g_0|| / ||g_w||) w) / rescale``.

    >>> import torch
    >>> cagrad_weights(torch.eye(2), c=0.0)
    tensor([0.5000, 0.5000])
    >>> cagrad_weights(torch.tensor([[1.0, 0.0], [0.0, 4.0]]), c=0.5, rescale="none")
    tensor([1.0590, 0.5000])
    """
    check_gramian(gramian)
    if c < 0:
        raise ValueError(f"CAGrad: c must be >= 0, got {c}")
    if rescale not in _RESCALES:
        raise ValueError(f"CAGrad: rescale must be one of {_RESCALES}, got {rescale!r}")
    divisor = {"none": 1.0, "1+c^2": 1.0 + c**2, "1+c": 1.0 + c}[rescale]
    if _on_device(gramian):
        return (_device_weights(gramian, c) / divisor).to(gramian.dtype)
    k = to_host(gramian)
    num = k.shape[0]
    weights = np.full(num, 1.0 / num)
    radius = c * np.sqrt(max(k.sum(), 0.0)) / num
    if radius > 0:
        w = _inner(k, c, gramian.dtype)
        norm = np.sqrt(max(w @ k @ w, 0.0))
        if norm > stationary_tolerance(k, w, gramian.dtype):
            weights = weights + radius / norm * w
    return to_tensor(weights / divisor, gramian, gramian.dtype)


def _device_weights(gramian: Tensor, c: float) -> Tensor:
    """CAGrad's weights before the rescaling, on the device (no branch reads a value)."""
    k = gramian.detach().to(torch.float64)
    num = k.shape[0]
    tolerance = _device_tolerance(gramian)
    radius = c * k.sum().clamp_min(0).sqrt() / num
    w = _device_solvers.cagrad_inner(gramian, c, tolerance)
    norm = (w @ k @ w).clamp_min(0).sqrt()
    moves = (radius > 0) & (norm > tolerance(w))
    return 1.0 / num + torch.where(moves, radius / torch.where(moves, norm, 1.0), 0.0) * w


@register
class CAGrad(Method):
    """CAGrad: the best worst-case improvement within ``c ||g_0||`` of the mean gradient.

    Args:
        tasks: optional task count or names (CAGrad keeps no state).
        level: ``"parameter"`` (default, the paper's setting) or ``"feature"``.
        c: the radius factor, >= 0 (default 0.5; 0 is the mean gradient).
        rescale: divide the update by ``1 + c^2`` (default, the paper's code), ``1 + c``, or
            not at all (``"none"``, the paper's Algorithm 1).

    >>> import torch
    >>> CAGrad(c=0.0).shared_weights(torch.ones(2), torch.eye(2))
    tensor([0.5000, 0.5000])
    """

    name = "cagrad"
    paper = "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021"
    requires = Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "parameter"

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        level: Level | None = None,
        c: float = 0.5,
        rescale: Rescale = "1+c^2",
    ) -> None:
        super().__init__(tasks=tasks, level=level)
        if c < 0:
            raise ValueError(f"CAGrad: c must be >= 0, got {c}")
        if rescale not in _RESCALES:
            raise ValueError(f"CAGrad: rescale must be one of {_RESCALES}, got {rescale!r}")
        self.c = float(c)
        self.rescale = rescale

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """See :func:`cagrad_weights`."""
        return cagrad_weights(gramian, self.c, self.rescale)

    def extra_repr(self) -> str:
        return ", ".join(
            filter(None, [super().extra_repr(), f"c={self.c}", f"rescale={self.rescale!r}"])
        )
