"""Small exact solvers on T x T problems, shared by the gradient-level methods.

Every method of the zoo that solves an optimisation problem does so on the T x T Gramian (T is
the number of tasks, rarely above a few dozen), so exact dense solvers are cheap and there is no
need for cvxpy or scipy at run time:

- :func:`project_simplex`: Euclidean projection onto the probability simplex (MoCo);
- :func:`simplex_qp`: ``min_{a in simplex} 1/2 a^T Q a + b^T a`` by a primal active-set method
  (MGDA, CAGrad's inner problem);
- :func:`nonnegative_qp`: ``min_{x >= 0} 1/2 x^T Q x + c^T x``, same method (UPGrad's dual-cone
  projections);
- :class:`Seeded`: the seeded ``torch.Generator`` of the stochastic methods (PCGrad, GradVac,
  GradDrop), saved with the method's ``state_dict``;
- :func:`power_equation`: the positive solution of ``K a = a^(-1/alpha)`` by damped Newton
  (Nash-MTL is ``alpha = 1``, FairGrad any ``alpha > 0``).

All of them solve in float64 numpy arrays on the host: a T x T problem costs a few dozen small
operations per iteration, and each torch operation on such a tensor costs several microseconds
of dispatch (a numpy one 0.5-3), which made the solves dominate cheap steps (CAGrad's 10-40
QPs took 6 ms at T = 3 in torch, a plain step of the benchmark MLP 7 ms). The tensor-facing
functions convert once on the way in and return float64 tensors on the input's device. A
Gramian on an accelerator (up to :data:`~taskbalance.methods._device_solvers.FACE_LIMIT` tasks;
:func:`power_equation` at any size) is solved there instead, by the same problems' batched torch
solvers in :mod:`taskbalance.methods._device_solvers`, so that nothing is read back.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

from taskbalance.engine.placement import on_accelerator, to_host, to_tensor
from taskbalance.methods import _device_solvers

_TOL = 1e-12
"""Relative tolerance of the active-set method (the QPs are normalised to unit scale first)."""


def check_gramian(gramian: Tensor) -> None:
    """Raise a ``ValueError`` unless ``gramian`` is a square matrix.

    >>> check_gramian(torch.eye(2))
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(f"a Gramian must be a non-empty square matrix, got {tuple(gramian.shape)}")


def _on_device(gramian: Tensor) -> bool:
    """Solve where the Gramian lives (:mod:`taskbalance.engine.placement`), for the problem
    sizes the device solvers take; larger ones come to the host."""
    return on_accelerator(gramian) and gramian.shape[0] <= _device_solvers.FACE_LIMIT


def diagonal_norms(gramian: np.ndarray) -> np.ndarray:
    """The gradient norms ``sqrt(diag K)`` of a Gramian (rounding below zero read as zero).

    >>> diagonal_norms(np.diag([4.0, -1e-20]))
    array([2., 0.])
    """
    return np.sqrt(np.maximum(np.diagonal(gramian), 0.0))


def symmetric_pinv(matrix: np.ndarray) -> np.ndarray:
    """The pseudo-inverse of a symmetric matrix, with ``torch.linalg.pinv(hermitian=True)``'s
    default cut-off: eigenvalues with ``|e| <= n eps max|e|`` count as zero.

    >>> symmetric_pinv(np.diag([2.0, 0.0]))
    array([[0.5, 0. ],
           [0. , 0. ]])
    """
    eigenvalues, vectors = np.linalg.eigh(matrix)
    return (vectors * inverse_eigenvalues(eigenvalues, matrix.shape[-1])) @ vectors.T


def inverse_eigenvalues(
    eigenvalues: np.ndarray, size: int, eps: float = float(np.finfo(np.float64).eps)
) -> np.ndarray:
    """``1 / e`` for the eigenvalues above the cut-off ``size * eps * max|e|``, else 0.

    >>> inverse_eigenvalues(np.array([1e-20, 2.0]), 2)
    array([0. , 0.5])
    """
    magnitude = np.abs(eigenvalues)
    kept = magnitude > size * eps * magnitude.max(initial=0.0)
    return np.where(kept, 1.0 / np.where(kept, eigenvalues, 1.0), 0.0)


def project_simplex(vector: Tensor) -> Tensor:
    """The Euclidean projection of ``vector`` onto ``{a : a >= 0, sum(a) = 1}``.

    Sort-based algorithm (Held et al. 1974; Duchi et al. 2008): ``a = max(v - tau, 0)`` with the
    threshold ``tau`` found from the sorted entries. Cost: one sort of T numbers.

    >>> project_simplex(torch.tensor([0.5, 2.0, -1.0]))
    tensor([0., 1., 0.])
    >>> project_simplex(torch.tensor([0.2, 0.4]))
    tensor([0.4000, 0.6000])
    """
    if vector.dim() != 1 or vector.numel() == 0:
        raise ValueError(
            f"project_simplex needs a non-empty vector, got shape {tuple(vector.shape)}"
        )
    v = to_host(vector)
    ordered = np.sort(v)[::-1]
    cumulative = np.cumsum(ordered) - 1
    # The largest k with ordered[k-1] > (cumsum_k - 1) / k fixes the threshold.
    count = int(np.flatnonzero(ordered * np.arange(1, v.size + 1) > cumulative).max()) + 1
    return to_tensor(np.maximum(v - cumulative[count - 1] / count, 0.0), vector, vector.dtype)


def _solve(matrix: np.ndarray, rhs: np.ndarray, face: np.ndarray) -> np.ndarray:
    """Solutions of a batch of symmetric systems: LU where well-posed, else the minimum-norm
    least-squares solution (pseudo-inverse).

    Each system is a face's own system (the rows and columns where ``face`` is true) padded
    with the identity elsewhere, so that every face of every problem is one fixed-size system.
    The well-posedness test and the pseudo-inverse use the face's own system, as if it had been
    cut out: the padding would otherwise move the pseudo-inverse's cut-off.
    """
    try:
        solution = np.linalg.solve(matrix, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:  # an exactly singular face somewhere: test each
        solution = np.full_like(rhs, np.nan)
        for p in range(rhs.shape[0]):
            with contextlib.suppress(np.linalg.LinAlgError):  # stays NaN: not well-posed
                solution[p] = np.linalg.solve(matrix[p], rhs[p])
    residual = np.einsum("pij,pj->pi", matrix, solution) - rhs
    # The face's own system is the matrix less its identity padding (ones on the diagonal
    # where the own system is zero), so its squared Frobenius norm is the matrix's less the
    # count of padded coordinates: no masked copy of the batch.
    own_squares = np.einsum("pij,pij->p", matrix, matrix) - (~face).sum(axis=1)
    size = np.sqrt(np.maximum(own_squares, 0.0)) * _row_norms(solution)
    bound = 1e-10 * (_row_norms(rhs) + size)
    good = np.isfinite(solution).all(axis=1) & (_row_norms(residual) <= bound)
    if good.all():
        return solution
    solution = np.where(good[:, None], solution, 0.0)
    for p in np.flatnonzero(~good):  # rare: a singular face
        idx = np.flatnonzero(face[p])
        solution[p, idx] = symmetric_pinv(matrix[p][np.ix_(idx, idx)]) @ rhs[p, idx]
    return solution


def _row_norms(rows: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("pi,pi->p", rows, rows))


def _face_minimisers(
    q: np.ndarray, b: np.ndarray, weights: np.ndarray, free: np.ndarray, simplex: bool
) -> np.ndarray:
    """For every problem, the minimiser of its objective on its free face (bound coordinates
    at zero; on the simplex, also ``weights^T y = 1``), as one batched solve.

    A single problem's face is cut out (a smaller system); a batch's faces are padded with the
    identity on their bound coordinates, so that they share one size."""
    count, num = free.shape
    if count == 1:
        idx = np.flatnonzero(free[0])
        target = np.zeros((1, num))
        if idx.size:
            face_q, rhs, every = q[np.ix_(idx, idx)][None], -b[:, idx], free[:, idx]
            target[:, idx] = (
                _bordered(face_q, rhs, weights[idx][None], every)
                if simplex
                else _solve(face_q, rhs, every)
            )
        return target
    face_q = np.where(free[:, :, None] & free[:, None, :], q, 0.0)
    diagonal = np.arange(num)
    face_q[:, diagonal, diagonal] += ~free
    rhs = np.where(free, -b, 0.0)
    if not simplex:
        return _solve(face_q, rhs, free)
    return _bordered(face_q, rhs, np.where(free, weights, 0.0), free)


def _bordered(
    face_q: np.ndarray, rhs: np.ndarray, border: np.ndarray, face: np.ndarray
) -> np.ndarray:
    """The face's minimiser under ``border^T y = 1``: its bordered (KKT) system."""
    count, num = rhs.shape
    matrix = np.zeros((count, num + 1, num + 1))
    matrix[:, :num, :num] = face_q
    matrix[:, :num, num] = border
    matrix[:, num, :num] = border
    full_rhs = np.concatenate([rhs, np.ones((count, 1))], axis=1)
    full_face = np.concatenate([face, np.ones((count, 1), dtype=bool)], axis=1)
    return _solve(matrix, full_rhs, full_face)[:, :num]


def active_set(
    q: np.ndarray, b: np.ndarray, simplex: bool, max_iter: int | None = None
) -> np.ndarray:
    """``min 1/2 x^T Q x + b^T x`` over ``x >= 0`` (and ``sum(x) = 1`` when ``simplex``).

    Primal active-set method (Nocedal & Wright, Algorithm 16.3): keep a feasible iterate and a
    set of free coordinates; minimise exactly on the free face (a small symmetric solve); step
    towards that minimiser until a free coordinate hits zero (fix it), or, at the face's minimum,
    free the bound coordinate whose Lagrange multiplier is most negative. Finite for convex
    problems whose face problems are bounded, which holds for every caller here (``b`` lies in
    the range of ``Q``, plus a multiple of the ones vector on the simplex).

    Solved in Jacobi-scaled variables ``y = D^(1/2) x`` (``D = diag Q``, 1 where zero): task
    gradients whose norms differ by 1e6 give Gramian entries 1e12 apart, and in the scaled
    variables every task's optimality test is a cosine-like quantity of the same size. The sum
    constraint becomes ``w^T y = 1`` with ``w = D^(-1/2) 1``.

    ``b`` may be a batch ``(P, T)`` of linear terms sharing ``Q`` (UPGrad's T projections): the
    P problems are solved together, one batched face solve per iteration, each problem taking
    exactly the steps it would take alone and stopping at its own optimum. Arrays are float64.

    Without the sum constraint the start is ``x = 0``, where every bound holds whatever the free
    set, so the free set is a guess: the coordinates with a negative multiplier there
    (``b_j < 0``), shrunk at once to the face minimiser's positive coordinates while the iterate
    has not left 0. The loop then frees or fixes one coordinate at a time as usual, and stops only
    on the same optimality test (a face minimiser with no negative bound multiplier), so the
    result is the same minimiser; only the path is shorter. UPGrad's 32 problems at T = 32 took
    16 batched face solves from the empty free set, 4-5 from the guess.

    >>> active_set(np.diag([1.0, 4.0]), np.zeros(2), simplex=True)
    array([0.8, 0.2])
    """
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return _active_set(q, b, simplex, max_iter)


def _active_set(q: np.ndarray, b: np.ndarray, simplex: bool, max_iter: int | None) -> np.ndarray:
    single = b.ndim == 1
    b = b.reshape(-1, q.shape[0])
    count, num = b.shape
    diagonal = np.maximum(np.diagonal(q), 0.0)
    positive = diagonal > 0
    unit = diagonal[positive].max() if positive.any() else 1.0
    scale = np.where(positive, 1.0 / np.sqrt(np.maximum(diagonal, 1e-300)), 1.0 / np.sqrt(unit))
    q = scale[:, None] * q * scale[None, :]
    b = scale * b
    weights = scale  # x = scale * y, so sum(x) = weights^T y
    if simplex and count == 1 and num <= _EVERY_FACE_UP_TO:
        best = _best_face(q, b[0], weights)
        if best is not None:
            x = scale * best
            x = x / x.sum()
            return x if single else x[None]
    if simplex:
        y = np.tile(weights / (weights @ weights), (count, 1))  # x proportional to 1/D
        free = np.ones((count, num), dtype=bool)
        origin = np.zeros(count, dtype=bool)
    else:
        # Warm start: at x = 0 every bound holds, so any free set is a valid working set; start
        # from the coordinates whose multiplier is negative there (``b_j < 0``, the tasks that
        # conflict with UPGrad's i-th), those the loop would otherwise free one at a time.
        y = np.zeros((count, num))
        free = b < -1e3 * _TOL * np.abs(b).max(axis=1, keepdims=True)
        origin = free.any(axis=1)
    """Per problem: still at x = 0, where the free set is only a guess (see ``drop``)."""
    running = np.ones(count, dtype=bool)
    rows = np.arange(count)
    b_size = np.abs(b).max(axis=1)
    max_iter = 20 * num + 50 if max_iter is None else max_iter
    for _ in range(max_iter):
        if not running.any():
            break
        # Only the problems still running (UPGrad's finish at different times) are solved.
        if running.all():
            step = _face_minimisers(q, b, weights, free, simplex) - y
        else:
            step = np.zeros_like(y)
            face_minima = _face_minimisers(q, b[running], weights, free[running], simplex)
            step[running] = face_minima - y[running]
        moves = running & (np.abs(step).max(axis=1) > _TOL * (1 + np.abs(y).max(axis=1)))
        shrinking = free & (step < 0)
        stepping = moves
        if origin.any():
            # At x = 0 a step towards a face minimiser with negative coordinates has length
            # zero (its ratio test fixes one of them and re-solves): fix them all at once
            # instead, still at x = 0, where any free set is feasible. Strictly fewer free
            # coordinates each time, so this ends; from then on the method is the textbook one.
            drop = origin & moves & shrinking.any(axis=1)
            free &= ~(drop[:, None] & shrinking)
            shrinking &= ~drop[:, None]
            stepping = moves & ~drop
            origin &= ~stepping
        # Step towards the face's minimum until a free coordinate hits zero (fix it).
        ratios = np.where(shrinking, y / np.maximum(-step, 1e-300), np.inf)
        blocking = ratios.argmin(axis=1)
        alpha = np.minimum(ratios[rows, blocking], 1.0)
        y = np.where(stepping[:, None], np.maximum(y + alpha[:, None] * step, 0.0), y)
        blocked = np.flatnonzero(stepping & (alpha < 1.0))
        y[blocked, blocking[blocked]] = 0.0
        free[blocked, blocking[blocked]] = False
        # At the face's minimum (reached by this step, or already there): free the bound
        # coordinate with the most negative multiplier, or stop (the KKT conditions hold). Done
        # in the same iteration as the step that reached it, whose re-solve would be a zero step.
        at_minimum = (running & ~moves) | (stepping & (alpha >= 1.0))
        curvature = y @ q
        multipliers = curvature + b
        if simplex:
            # The multiplier of the sum constraint, by least squares over the free face.
            w_f = np.where(free, weights, 0.0)
            level = -(multipliers * w_f).sum(axis=1) / np.maximum((w_f * w_f).sum(axis=1), 1e-300)
            multipliers = multipliers + level[:, None] * weights
        bound_multipliers = np.where(free, np.inf, multipliers)
        entering = bound_multipliers.argmin(axis=1)
        lowest = bound_multipliers[rows, entering]
        size = np.sqrt(np.maximum((curvature * y).sum(axis=1), 0.0)) + b_size
        negative = lowest < -1e3 * _TOL * size
        released = np.flatnonzero(at_minimum & negative)
        free[released, entering[released]] = True
        running &= ~(at_minimum & ~negative)
    x = scale * y
    if simplex:
        x = x / x.sum(axis=1, keepdims=True)
    return x[0] if single else x


_EVERY_FACE_UP_TO = 4
"""A single simplex problem of at most this many coordinates first tries every face at once:
``2^T - 1`` small bordered solves in one batch, instead of the active-set loop, whose
per-iteration numpy bookkeeping dominates at small T. Measured on CAGrad's weights at T = 3 (six
such problems per step), side by side with the loop: 1.18-1.33 ms against 1.73-1.83 ms on a
busy 2-core machine."""


def _best_face(q: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
    """The simplex QP's minimiser in scaled variables, from the minimisers of every face at
    once: the best feasible one, accepted only if it passes the optimality (KKT) test, so that
    a singular face whose minimum-norm minimiser is infeasible sends the problem back to the
    active-set loop (``None``)."""
    num = b.shape[0]
    faces = ((np.arange(1, 2**num)[:, None] >> np.arange(num)) & 1).astype(bool)
    candidates = _face_minimisers(q, np.tile(b, (len(faces), 1)), weights, faces, True)
    candidates = np.where(faces, candidates, 0.0)
    scale = 1.0 + np.abs(candidates).max(axis=1)
    feasible = (candidates >= -_TOL * scale[:, None]).all(axis=1) & np.isfinite(scale)
    if not feasible.any():
        return None
    values = np.where(
        feasible, 0.5 * np.einsum("fi,ij,fj->f", candidates, q, candidates) + candidates @ b, np.inf
    )
    # Ties (a singular Q: every point of a face, or of the whole simplex, may be optimal) go to
    # the largest face, whose minimum-norm minimiser is where the active-set loop, starting
    # from the full face, would stop: e.g. equal weights for a zero Gramian.
    lowest = values.min()
    tied = values <= lowest + 1e3 * _TOL * (abs(lowest) + np.abs(q).max() + np.abs(b).max())
    best = np.maximum(candidates[np.where(tied, faces.sum(axis=1), -1).argmax()], 0.0)
    # KKT on the simplex: grad + level * weights >= 0, and zero on the support.
    curvature = q @ best
    gradient = curvature + b
    support = best > 0
    w_s = np.where(support, weights, 0.0)
    level = -(gradient * w_s).sum() / max((w_s * w_s).sum(), 1e-300)
    multipliers = gradient + level * weights
    size = np.sqrt(max(curvature @ best, 0.0)) + np.abs(b).max()
    if (multipliers[~support] < -1e3 * _TOL * size).any():
        return None
    return best


def simplex_qp(
    quadratic: Tensor, linear: Tensor | None = None, max_iter: int | None = None
) -> Tensor:
    """``argmin_{a in simplex} 1/2 a^T Q a + b^T a`` for a positive semi-definite ``Q``.

    Exact up to rounding (active-set method, typically a handful of T x T solves). With
    ``linear=None`` this is MGDA's min-norm point of the convex hull of the gradients when
    ``Q`` is their Gramian. Solved in float64.

    Args:
        quadratic: ``Q``, a symmetric PSD T x T matrix.
        linear: ``b`` (default zero); it must lie in the range of ``Q`` plus a multiple of the
            ones vector, so that the problem restricted to every face is bounded.
        max_iter: cap on active-set iterations (default ``20 T + 50``).

    >>> simplex_qp(torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    tensor([0.8000, 0.2000], dtype=torch.float64)
    """
    if _on_device(quadratic):
        return _device_solvers.simplex_qp(quadratic, linear)
    q = to_host(quadratic)
    b = np.zeros(q.shape[0]) if linear is None else to_host(linear)
    return to_tensor(active_set(q, b, simplex=True, max_iter=max_iter), quadratic)


def nonnegative_qp(quadratic: Tensor, linear: Tensor, max_iter: int | None = None) -> Tensor:
    """``argmin_{x >= 0} 1/2 x^T Q x + c^T x`` for a PSD ``Q`` and ``c`` in the range of ``Q``.

    Same active-set method as :func:`simplex_qp`, without the equality constraint. ``linear``
    may be a batch ``(P, T)`` of problems sharing ``Q``: they are solved together, one batched
    face solve per iteration, and the ``(P, T)`` solutions are returned.

    >>> nonnegative_qp(torch.eye(2, dtype=torch.float64), torch.tensor([-1.0, 2.0]))
    tensor([1., 0.], dtype=torch.float64)
    """
    if _on_device(quadratic):
        return _device_solvers.nonnegative_qp(quadratic, linear)
    solution = active_set(to_host(quadratic), to_host(linear), simplex=False, max_iter=max_iter)
    return to_tensor(solution, quadratic)


def power_equation(
    gramian: Tensor,
    alpha: float = 1.0,
    init: Tensor | None = None,
    *,
    ridge: float = 1e-10,
    max_iter: int = 100,
    rtol: float = 1e-12,
) -> Tensor:
    """The positive solution ``a`` of ``K a = a^(-1/alpha)`` (elementwise power).

    It is the unique minimiser over ``a > 0`` of the strictly convex

        phi(a) = 1/2 a^T K a - sum_t h(a_t),   h'(a) = a^(-1/alpha)
        (h = log for alpha = 1, h(a) = a^(1 - 1/alpha) / (1 - 1/alpha) otherwise),

    found by Newton's method with a backtracking line search that keeps ``a > 0`` (Hessian
    ``K + diag(a^(-1/alpha - 1) / alpha)``, always positive definite). Nash-MTL is ``alpha = 1``
    (``K a = 1/a``), FairGrad any ``alpha > 0``.

    The problem is solved on ``K / kappa`` (``kappa`` = mean diagonal of K) and rescaled back,
    ``a = a~ kappa^(-alpha / (alpha + 1))``, so the gradients' overall scale does not matter.
    A solution exists iff no non-zero ``v >= 0`` has ``K v = 0`` (no task gradient is zero and
    0 is not in the convex hull of a subset of them). When Newton does not reach a relative
    residual of 1e-9, the problem is solved again with ``ridge`` times each diagonal entry
    added to the diagonal (``ridge`` for a zero gradient, after normalisation): the weights along
    the offending direction become large but finite, and contribute (almost) nothing to
    ``G^T a``. The zero Gramian gives ones, and so does a problem that not even the ridge makes
    solvable (exactly opposite gradients in one dimension, found by the property tests).

    Args:
        gramian: ``K``, T x T, symmetric PSD.
        alpha: the fairness exponent, > 0.
        init: a warm start (positive); default ``t * 1`` with the best ``t``.
        ridge: relative diagonal regulariser (default ``1e-10``).
        max_iter: Newton iterations (quadratic convergence: 10 to 20 typically suffice).
        rtol: stop when ``||K a - a^(-1/alpha)|| <= rtol * ||a^(-1/alpha)||``.

    Returns:
        ``a`` in float64, shape ``(T,)``.

    >>> a = power_equation(torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    >>> a  # 4 a_1 = 1/a_1 and a_2 = 1/a_2
    tensor([0.5000, 1.0000], dtype=torch.float64)
    """
    if alpha <= 0:
        raise ValueError(f"power_equation needs alpha > 0, got {alpha}")
    if on_accelerator(gramian):
        return _device_solvers.power_equation(gramian, alpha, init, ridge)
    k = to_host(gramian)
    start = None if init is None else to_host(init)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        solution = _power_equation(k, alpha, start, ridge, max_iter, rtol)
    return to_tensor(solution, gramian)


def _power_equation(
    k: np.ndarray,
    alpha: float,
    init: np.ndarray | None,
    ridge: float,
    max_iter: int,
    rtol: float,
) -> np.ndarray:
    num = k.shape[0]
    kappa = np.maximum(np.diagonal(k), 0.0).mean()
    if not kappa > 0:
        # The zero Gramian: every weight gives the zero update; return ones.
        return np.ones(num)
    rescale = kappa ** (-alpha / (alpha + 1))
    k = k / kappa
    start = None
    if init is not None and np.isfinite(init).all() and (init > 0).all():
        start = init / rescale
    a, residual = _newton(k, alpha, start, max_iter, rtol)
    if not residual <= _ACCEPT:
        # No solution (or none reachable): regularise relative to each task's own diagonal
        # (1 for a zero gradient), so that tasks whose gradients are 1e6 times smaller than the
        # others' are not swamped by the ridge.
        diagonal = np.maximum(np.diagonal(k), 0.0)
        k = k + np.diag(ridge * np.where(diagonal > 0, diagonal, 1.0))
        a, residual = _newton(k, alpha, None, max_iter, rtol)
        if residual == float("inf"):
            # Not even the ridge helped (e.g. exactly opposite gradients in one dimension):
            # equal weights, never a NaN.
            return np.ones(num)
    return a * rescale


_ACCEPT = 1e-9
"""Relative residual under which an unregularised Newton solve is accepted."""


def _newton(
    k: np.ndarray, alpha: float, start: np.ndarray | None, max_iter: int, rtol: float
) -> tuple[np.ndarray, float]:
    """Damped Newton on ``1/2 a^T K a - sum h(a_t)``; returns ``a`` and its relative residual."""
    num = k.shape[0]
    exponent = -1.0 / alpha
    norm = np.linalg.norm
    if start is None:
        # Best multiple of the ones vector: t^(1 + 1/alpha) = T / (1^T K 1).
        start = (num / max(k.sum(), 1e-300)) ** (alpha / (alpha + 1)) * np.ones(num)
    a = start

    def objective(x: np.ndarray) -> float:
        h = np.log(x) if alpha == 1 else x ** (1 + exponent) / (1 + exponent)
        return float(0.5 * x @ k @ x - h.sum())

    value = objective(a)
    for _ in range(max_iter):
        power = a**exponent
        residual = k @ a - power
        if not norm(residual) / norm(power) > rtol:
            break
        try:
            solution = np.linalg.solve(k + np.diag(power / (alpha * a)), residual)
        except np.linalg.LinAlgError:
            break  # the iterates ran off to where the Hessian is singular: no solution here
        if not np.isfinite(solution).all():
            break
        direction = -solution
        # Fraction to the boundary: stay strictly positive.
        shrinking = direction < 0
        step = 1.0
        if shrinking.any():
            step = min(1.0, 0.99 * float((a[shrinking] / -direction[shrinking]).min()))
        slope = float(residual @ direction)
        size = norm(residual)
        while step > 1e-20:
            candidate = a + step * direction
            new_value = objective(candidate)
            if new_value <= value + 1e-4 * step * slope:
                break
            # Near the solution the objective's decrease drowns in rounding: accept a step that
            # still shrinks the residual (Newton's local quadratic convergence).
            if norm(k @ candidate - candidate**exponent) < 0.5 * size:
                break
            step *= 0.5
        else:
            break
        a, value = candidate, new_value
    power = a**exponent
    relative = float(norm(k @ a - power) / norm(power))
    if not (np.isfinite(a).all() and (a > 0).all()):
        relative = float("inf")
    return a, relative


class Seeded:
    """Mixin for stochastic methods: a CPU ``torch.Generator`` seeded by ``seed``.

    The generator's state travels in ``state_dict`` (extra state), so a resumed run draws the
    same numbers as an uninterrupted one. Random numbers are drawn on the CPU and moved to the
    gradients' device, so the stream does not depend on the device. Under DDP, give every rank
    the same seed so that all ranks apply the same update.
    """

    generator: torch.Generator
    seed: int | None

    def _init_generator(self, seed: int | None) -> None:
        self.seed = seed
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def get_extra_state(self) -> dict[str, Any]:
        """The parent's extra state plus the generator's state."""
        state = super().get_extra_state()  # type: ignore[misc]
        state["generator"] = self.generator.get_state()
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the parent's extra state and the generator's state."""
        super().set_extra_state(state)  # type: ignore[misc]
        if "generator" in state:
            self.generator.set_state(state["generator"])
