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

All solve in float64 on the CPU-side dtype they are given (callers upcast), and return float64.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_TOL = 1e-12
"""Relative tolerance of the active-set method (the QPs are normalised to unit scale first)."""


def check_gramian(gramian: Tensor) -> None:
    """Raise a ``ValueError`` unless ``gramian`` is a square matrix.

    >>> check_gramian(torch.eye(2))
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(f"a Gramian must be a non-empty square matrix, got {tuple(gramian.shape)}")


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
    ordered, _ = torch.sort(vector, descending=True)
    cumulative = ordered.cumsum(0) - 1
    ranks = torch.arange(1, vector.numel() + 1, dtype=vector.dtype, device=vector.device)
    # The largest k with ordered[k-1] > (cumsum_k - 1) / k fixes the threshold.
    count = int((ordered * ranks > cumulative).nonzero().max()) + 1
    tau = cumulative[count - 1] / count
    return (vector - tau).clamp_min(0)


def _solve(matrix: Tensor, rhs: Tensor, face: Tensor) -> Tensor:
    """Solutions of a batch of symmetric systems: LU where well-posed, else the minimum-norm
    least-squares solution (pseudo-inverse).

    Each system is a face's own system (the rows and columns where ``face`` is true) padded
    with the identity elsewhere, so that every face of every problem is one fixed-size system.
    The well-posedness test and the pseudo-inverse use the face's own system, as if it had been
    cut out: the padding would otherwise move the pseudo-inverse's cut-off.
    """
    solution, info = torch.linalg.solve_ex(matrix, rhs)
    own = matrix.masked_fill(~(face[:, :, None] & face[:, None, :]), 0.0)
    residual = (matrix @ solution[..., None]).squeeze(-1) - rhs
    bound = 1e-10 * (rhs.norm(dim=1) + own.flatten(1).norm(dim=1) * solution.norm(dim=1))
    good = (info == 0) & torch.isfinite(solution).all(dim=1) & (residual.norm(dim=1) <= bound)
    if bool(good.all()):
        return solution
    solution = torch.where(good[:, None], solution, 0.0)
    for p in (~good).nonzero().flatten().tolist():  # rare: a singular face
        idx = face[p].nonzero().flatten()
        reduced = matrix[p][idx][:, idx]
        solution[p, idx] = torch.linalg.pinv(reduced, hermitian=True) @ rhs[p, idx]
    return solution


def _face_minimisers(q: Tensor, b: Tensor, weights: Tensor, free: Tensor, simplex: bool) -> Tensor:
    """For every problem, the minimiser of its objective on its free face (bound coordinates
    at zero; on the simplex, also ``weights^T y = 1``), as one batched solve.

    A single problem's face is cut out (a smaller system and fewer kernels); a batch's faces
    are padded with the identity on their bound coordinates, so that they share one size."""
    count, num = free.shape
    if count == 1:
        idx = free[0].nonzero().flatten()
        target = q.new_zeros(1, num)
        if idx.numel():
            face_q, rhs, every = q[idx][:, idx][None], -b[:, idx], free[:, idx]
            target[:, idx] = (
                _bordered(face_q, rhs, weights[idx][None], every)
                if simplex
                else _solve(face_q, rhs, every)
            )
        return target
    both = free[:, :, None] & free[:, None, :]
    bound = torch.diag_embed((~free).to(q.dtype))
    rhs = (-b).masked_fill(~free, 0.0)
    face_q = q.masked_fill(~both, 0.0) + bound
    if not simplex:
        return _solve(face_q, rhs, free)
    return _bordered(face_q, rhs, weights.masked_fill(~free, 0.0), free)


def _bordered(face_q: Tensor, rhs: Tensor, border: Tensor, face: Tensor) -> Tensor:
    """The face's minimiser under ``border^T y = 1``: its bordered (KKT) system."""
    count, num = rhs.shape
    matrix = face_q.new_zeros(count, num + 1, num + 1)
    matrix[:, :num, :num] = face_q
    matrix[:, :num, num] = border
    matrix[:, num, :num] = border
    full_rhs = torch.cat([rhs, rhs.new_ones(count, 1)], dim=1)
    return _solve(matrix, full_rhs, torch.cat([face, face.new_ones(count, 1)], dim=1))[:, :num]


def _active_set(q: Tensor, b: Tensor, simplex: bool, max_iter: int | None) -> Tensor:
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
    exactly the steps it would take alone and stopping at its own optimum.
    """
    single = b.dim() == 1
    b = b.reshape(-1, q.shape[0])
    count, num = b.shape
    diagonal = q.diagonal().clamp_min(0)
    positive = diagonal > 0
    unit = diagonal[positive].max() if positive.any() else diagonal.new_ones(())
    scale = torch.where(positive, diagonal.clamp_min(1e-300).rsqrt(), unit.rsqrt())
    q = scale[:, None] * q * scale[None, :]
    b = scale * b
    weights = scale  # x = scale * y, so sum(x) = weights^T y
    if simplex:
        y = (weights / (weights @ weights)).expand(count, num).clone()  # x proportional to 1/D
        free = torch.ones(count, num, dtype=torch.bool, device=q.device)
    else:
        y = q.new_zeros(count, num)
        free = torch.zeros(count, num, dtype=torch.bool, device=q.device)
    running = torch.ones(count, dtype=torch.bool, device=q.device)
    columns = torch.arange(num, device=q.device)
    max_iter = 20 * num + 50 if max_iter is None else max_iter
    for _ in range(max_iter):
        # Only the problems still running are solved (UPGrad's finish at different times).
        live = running.nonzero().flatten()
        if live.numel() == 0:
            break
        if live.numel() == count:
            step = _face_minimisers(q, b, weights, free, simplex) - y
        else:
            step = torch.zeros_like(y)
            step[live] = _face_minimisers(q, b[live], weights, free[live], simplex) - y[live]
        moves = step.abs().amax(dim=1) > _TOL * (1 + y.abs().amax(dim=1))
        # At the face's minimum: free the most negative multiplier, or stop.
        curvature = y @ q
        grad = curvature + b
        multipliers = grad
        if simplex:
            # The multiplier of the sum constraint, by least squares over the free face.
            w_f = weights.masked_fill(~free, 0.0)
            level = -(grad * w_f).sum(dim=1) / (w_f * w_f).sum(dim=1).clamp_min(1e-300)
            multipliers = grad + level[:, None] * weights
        lowest, entering = multipliers.masked_fill(free, torch.inf).min(dim=1)
        size = (curvature * y).sum(dim=1).clamp_min(0).sqrt() + b.abs().amax(dim=1)
        negative = lowest < -1e3 * _TOL * size
        release = running & ~moves & negative
        free = free | (release[:, None] & (columns == entering[:, None]))
        running = running & (moves | negative)
        # Away from it: step towards the face's minimum until a free coordinate hits zero.
        stepping = running & moves
        shrinking = free & (step < 0)
        ratios = (y / (-step).clamp_min(1e-300)).masked_fill_(~shrinking, torch.inf)
        alpha, blocking = ratios.min(dim=1)
        alpha = alpha.clamp_max(1.0)
        y = torch.where(stepping[:, None], (y + alpha[:, None] * step).clamp_min(0), y)
        hit = (stepping & (alpha < 1.0))[:, None] & (columns == blocking[:, None])
        y = torch.where(hit, 0.0, y)
        free = free & ~hit
    x = scale * y
    if simplex:
        x = x / x.sum(dim=1, keepdim=True)
    return x[0] if single else x


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
    q = quadratic.detach().to(torch.float64)
    b = q.new_zeros(q.shape[0]) if linear is None else linear.detach().to(torch.float64)
    return _active_set(q, b, simplex=True, max_iter=max_iter)


def nonnegative_qp(quadratic: Tensor, linear: Tensor, max_iter: int | None = None) -> Tensor:
    """``argmin_{x >= 0} 1/2 x^T Q x + c^T x`` for a PSD ``Q`` and ``c`` in the range of ``Q``.

    Same active-set method as :func:`simplex_qp`, without the equality constraint. ``linear``
    may be a batch ``(P, T)`` of problems sharing ``Q``: they are solved together, one batched
    face solve per iteration, and the ``(P, T)`` solutions are returned.

    >>> nonnegative_qp(torch.eye(2, dtype=torch.float64), torch.tensor([-1.0, 2.0]))
    tensor([1., 0.], dtype=torch.float64)
    """
    q = quadratic.detach().to(torch.float64)
    return _active_set(q, linear.detach().to(q), simplex=False, max_iter=max_iter)


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
    k = gramian.detach().to(torch.float64)
    num = k.shape[0]
    kappa = k.diagonal().clamp_min(0).mean()
    if not kappa > 0:
        # The zero Gramian: every weight gives the zero update; return ones.
        return k.new_ones(num)
    rescale = kappa ** (-alpha / (alpha + 1))
    k = k / kappa
    start = None
    if init is not None and torch.isfinite(init).all() and (init > 0).all():
        start = init.detach().to(k) / rescale
    a, residual = _newton(k, alpha, start, max_iter, rtol)
    if not residual <= _ACCEPT:
        # No solution (or none reachable): regularise relative to each task's own diagonal
        # (1 for a zero gradient), so that tasks whose gradients are 1e6 times smaller than the
        # others' are not swamped by the ridge.
        diagonal = k.diagonal().clamp_min(0)
        k = k + torch.diag(ridge * torch.where(diagonal > 0, diagonal, 1.0))
        a, residual = _newton(k, alpha, None, max_iter, rtol)
        if residual == float("inf"):
            # Not even the ridge helped (e.g. exactly opposite gradients in one dimension):
            # equal weights, never a NaN.
            return k.new_ones(num)
    return a * rescale


_ACCEPT = 1e-9
"""Relative residual under which an unregularised Newton solve is accepted."""


def _newton(
    k: Tensor, alpha: float, start: Tensor | None, max_iter: int, rtol: float
) -> tuple[Tensor, float]:
    """Damped Newton on ``1/2 a^T K a - sum h(a_t)``; returns ``a`` and its relative residual."""
    num = k.shape[0]
    exponent = -1.0 / alpha
    if start is None:
        # Best multiple of the ones vector: t^(1 + 1/alpha) = T / (1^T K 1).
        start = (num / k.sum().clamp_min(1e-300)) ** (alpha / (alpha + 1)) * k.new_ones(num)
    a = start

    def objective(x: Tensor) -> Tensor:
        h = torch.log(x) if alpha == 1 else x ** (1 + exponent) / (1 + exponent)
        return 0.5 * x @ k @ x - h.sum()

    value = objective(a)
    relative = float("inf")
    for _ in range(max_iter):
        power = a**exponent
        residual = k @ a - power
        relative = float(residual.norm() / power.norm())
        if not relative > rtol:
            break
        hessian = k + torch.diag(power / (alpha * a))
        solution, info = torch.linalg.solve_ex(hessian, residual)
        if info.item() != 0 or not torch.isfinite(solution).all():
            break  # the iterates ran off to where the Hessian is singular: no solution here
        direction = -solution
        # Fraction to the boundary: stay strictly positive.
        shrinking = direction < 0
        step = 1.0
        if shrinking.any():
            step = min(1.0, 0.99 * float((a[shrinking] / -direction[shrinking]).min()))
        slope = float(residual @ direction)
        norm = residual.norm()
        while step > 1e-20:
            candidate = a + step * direction
            new_value = objective(candidate)
            if new_value <= value + 1e-4 * step * slope:
                break
            # Near the solution the objective's decrease drowns in rounding: accept a step that
            # still shrinks the residual (Newton's local quadratic convergence).
            if (k @ candidate - candidate**exponent).norm() < 0.5 * norm:
                break
            step *= 0.5
        else:
            break
        a, value = candidate, new_value
    power = a**exponent
    relative = float((k @ a - power).norm() / power.norm())
    if not (torch.isfinite(a).all() and (a > 0).all()):
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
