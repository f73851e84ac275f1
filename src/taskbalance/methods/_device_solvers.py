"""The T x T solvers of the Gramian methods in batched torch ops, for an accelerator.

Same problems and same answers as the host solvers of :mod:`taskbalance.methods._simplex` and
the methods' closed forms, but with a fixed amount of work and no data-dependent Python branch:
nothing is read back to the host, so the step's kernels queue behind the backward passes while
the host goes on (:mod:`taskbalance.engine.placement`). Every branch of a host solver becomes a
``torch.where`` between candidates that are all computed. All in float64.

- :func:`symmetric_eigh`: the eigendecomposition by cyclic Jacobi rotations, a fixed number
  of sweeps; IMTL-G's pseudo-inverse then takes the host's cut-off exactly (``T eps max|e|``
  of the Gramian's dtype, as ``torch.linalg.pinv``).
- :func:`simplex_qp` and :func:`nonnegative_qp`: every face of the feasible set at once: the
  minimum-norm minimiser of each face (a batch of small symmetric systems, solved by the
  pseudo-inverse from :func:`symmetric_eigh`), the best feasible one kept, ties going to the
  largest face as on the host. Exact for a convex QP, as the optimum is the minimiser of its
  own face. ``2^T`` faces: up to
  :data:`FACE_LIMIT` tasks. MGDA, UPGrad, CAGrad's MGDA check.
- :func:`cagrad_inner`: CAGrad's dual ``min_{w in simplex} b^T w + r ||w||_K`` has a closed form
  on each face (a quadratic in the face's multiplier), so every face is solved at once too.
- :func:`power_equation`: Nash-MTL's ``K a = 1/a`` by a fixed number of damped Newton steps, the
  backtracking line search evaluated at every step size at once.

``torch.linalg.eigh`` and ``torch.linalg.solve`` would do the linear algebra, but on CUDA their
error checks read a status back to the host; ``torch.linalg.solve_ex`` without the check does
not, and serves Newton's positive definite systems.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

FACE_LIMIT = 12
"""The most tasks the face-enumerating solvers take (4095 faces of 13 x 13 systems); above it
the methods solve on the host, one synchronisation per step (said in their docs)."""

_QUARTER_TURN = math.pi / 2

_EPS = torch.finfo(torch.float64).eps

_FACE_CUTOFF = 1e-9
"""Relative eigenvalue below which a face system (Jacobi-scaled: unit diagonal) counts as
singular. Far above the rounding of a float64 Gramian, whose noise eigenvalues would otherwise
be inverted into huge candidates that a slightly negative curvature makes look optimal; the
price: gradients collinear to within 1e-9 are treated as exactly collinear."""

_JACOBI_SWEEPS = 8
"""Sweeps of :func:`symmetric_eigh`."""

_NEWTON_STEPS = 40
"""Damped Newton steps of :func:`power_equation`: the host solver's cold starts take 10-20."""

_BACKTRACKS = 40
"""Step sizes ``2^-j`` tried at once by the line search of :func:`power_equation`."""

_faces: dict[tuple[int, bool, str], Tensor] = {}
"""Face masks by (size, with the empty face, device): made once, not every step."""

_pairs: dict[tuple[int, str], Tensor] = {}
"""Jacobi's round-robin pairings by (size, device)."""


def face_masks(num: int, empty: bool, device: torch.device) -> Tensor:
    """Every face of ``{x >= 0}`` in ``num`` coordinates as a boolean ``(faces, num)`` mask: the
    coordinates free to be positive. ``empty``: include the face ``x = 0``.

    >>> face_masks(2, False, torch.device("cpu")).int()
    tensor([[1, 0],
            [0, 1],
            [1, 1]], dtype=torch.int32)
    """
    key = (num, empty, str(device))
    if key not in _faces:
        codes = torch.arange(0 if empty else 1, 2**num)
        masks = (codes[:, None] >> torch.arange(num)) & 1
        _faces[key] = masks.bool().to(device)
    return _faces[key]


def _check_size(num: int, what: str) -> None:
    if num > FACE_LIMIT:
        raise ValueError(
            f"{what} on an accelerator solves every face at once, up to {FACE_LIMIT} tasks; "
            f"got {num}"
        )


def _pairings(size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Round-robin pairings of ``size`` (even) indices: ``size - 1`` rounds of ``size / 2``
    disjoint pairs ``(p, q)``, ``p < q``, every pair once per sweep."""
    key = (size, str(device))
    if key not in _pairs:
        ring = list(range(1, size))
        rounds = []
        for _ in range(size - 1):
            order = [0, *ring]
            rounds.append([sorted((order[i], order[size - 1 - i])) for i in range(size // 2)])
            ring = ring[-1:] + ring[:-1]
        _pairs[key] = torch.tensor(rounds, device=device)
    pairs = _pairs[key]
    return pairs[..., 0], pairs[..., 1]


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of a symmetric matrix by the cyclic Jacobi method, every
    rotation of a round of disjoint pairs applied at once, :data:`_JACOBI_SWEEPS` sweeps
    (Jacobi converges quadratically: a T <= 12 matrix is diagonal to rounding after 6-8).
    ``torch.linalg.eigh`` would do, but on CUDA its error check reads a value back.

    >>> values, _ = symmetric_eigh(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    >>> values.sort().values.round(decimals=12)
    tensor([1., 3.], dtype=torch.float64)
    """
    num = matrix.shape[-1]
    size = num + num % 2  # an odd size gets an isolated zero row to pair with
    batch = matrix.shape[:-2]
    a = matrix.new_zeros(*batch, size, size, dtype=torch.float64)
    a[..., :num, :num] = matrix
    vectors = torch.eye(size, dtype=torch.float64, device=matrix.device).expand_as(a)
    firsts, seconds = _pairings(size, matrix.device)
    for _ in range(_JACOBI_SWEEPS):
        for p, q in zip(firsts, seconds, strict=True):
            # The angle that zeroes a[p, q], tan(2 theta) = 2 a_pq / (a_qq - a_pp), taken in
            # [-pi/4, pi/4]: the smallest rotation, and none when a_pq is already zero (the
            # padding row would otherwise swap places with a real one).
            theta = 0.5 * torch.atan2(2 * a[..., p, q], a[..., q, q] - a[..., p, p])
            theta = theta - _QUARTER_TURN * torch.round(theta / _QUARTER_TURN)
            cos, sin = theta.cos(), theta.sin()
            rotation = torch.zeros_like(a)
            rotation[..., p, p] = cos
            rotation[..., q, q] = cos
            rotation[..., p, q] = sin
            rotation[..., q, p] = -sin
            a = rotation.transpose(-1, -2) @ a @ rotation
            vectors = vectors @ rotation
    return a.diagonal(dim1=-2, dim2=-1)[..., :num], vectors[..., :num, :num]


def pinv_solve(matrix: Tensor, rhs: Tensor, cutoff: float | None = None) -> Tensor:
    """``pinv(matrix) @ rhs`` for a batch of symmetric matrices: the minimum-norm solution of a
    singular system, the ordinary one otherwise. Eigenvalues with ``|e| <= cutoff max|e|``
    count as zero (default ``n eps``, ``torch.linalg.pinv``'s).

    >>> pinv_solve(torch.diag(torch.tensor([2.0, 0.0])).double(), torch.ones(2, 1).double())
    tensor([[0.5000],
            [0.0000]], dtype=torch.float64)
    """
    values, vectors = symmetric_eigh(matrix)
    cut = matrix.shape[-1] * _EPS if cutoff is None else cutoff
    magnitude = values.abs()
    kept = magnitude > cut * magnitude.amax(dim=-1, keepdim=True)
    inverse = torch.where(kept, 1.0 / torch.where(kept, values, 1.0), 0.0)
    return vectors @ (inverse[..., None] * (vectors.transpose(-1, -2) @ rhs))


def _jacobi(q: Tensor) -> Tensor:
    """``s`` with ``diag(s) Q diag(s)`` of unit diagonal (zero rows scaled like the largest)."""
    diagonal = q.diagonal().clamp_min(0)
    largest = diagonal.max()
    unit = torch.where(largest > 0, largest, 1.0)
    return torch.where(diagonal > 0, diagonal.clamp_min(1e-300), unit).rsqrt()


def _face_systems(q: Tensor, masks: Tensor) -> Tensor:
    """Per face, ``Q`` restricted to the face and the identity off it: ``(F, T, T)``."""
    both = masks[:, :, None] & masks[:, None, :]
    return torch.where(both, q, torch.diag_embed((~masks).to(q.dtype)))


def _best(
    values: Tensor, candidates: Tensor, feasible: Tensor, masks: Tensor, scale: Tensor
) -> Tensor:
    """The candidate of lowest value among the feasible ones, along the first axis. Ties (a
    singular ``Q``: a whole face may be optimal) go to the largest face, whose minimum-norm
    minimiser is the host solvers' answer, e.g. equal weights for identical gradients."""
    values = torch.where(feasible, values, math.inf)
    lowest = values.amin(dim=0, keepdim=True)
    tied = values <= lowest + 1e-9 * (lowest.abs() + scale)
    size = masks.sum(dim=1).reshape(-1, *[1] * (values.dim() - 1))
    index = torch.where(tied, size, -1).argmax(dim=0)
    picked = candidates.gather(
        0, index.reshape(1, *index.shape, 1).expand(1, *candidates.shape[1:])
    )
    return picked[0]


def _settled(y: Tensor) -> Tensor:
    """``y`` with its entries within the feasibility tolerance of zero set to zero (they are
    zero up to rounding, and a later test may ask whether a weight is zero)."""
    size = 1.0 + y.abs().amax(dim=-1, keepdim=True)
    return torch.where(y > 1e-12 * size, y, 0.0)


def _nonnegative(candidates: Tensor) -> Tensor:
    """Feasible for ``x >= 0`` up to rounding (and finite), along the last axis."""
    size = 1.0 + candidates.abs().amax(dim=-1)
    return (candidates >= -1e-12 * size[..., None]).all(dim=-1) & torch.isfinite(size)


def simplex_qp(quadratic: Tensor, linear: Tensor | None = None) -> Tensor:
    """``argmin_{a in simplex} 1/2 a^T Q a + b^T a`` (``b`` zero by default), every face at once.

    >>> simplex_qp(torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    tensor([0.8000, 0.2000], dtype=torch.float64)
    """
    q = quadratic.to(torch.float64)
    num = q.shape[0]
    _check_size(num, "the simplex QP")
    b = torch.zeros_like(q[0]) if linear is None else linear.to(q)
    s = _jacobi(q)
    q, b = s[:, None] * q * s[None, :], s * b  # a = s * y: the sum constraint is s^T y = 1
    masks = face_masks(num, False, q.device)
    count = masks.shape[0]
    border = torch.where(masks, s, 0.0)
    system = q.new_zeros(count, num + 1, num + 1)
    system[:, :num, :num] = _face_systems(q, masks)
    system[:, :num, num] = border
    system[:, num, :num] = border
    rhs = torch.cat([torch.where(masks, -b, 0.0), q.new_ones(count, 1)], dim=1)
    y = pinv_solve(system, rhs[:, :, None], _FACE_CUTOFF)[:, :num, 0]
    values = 0.5 * torch.einsum("fi,ij,fj->f", y, q, y) + y @ b
    scale = q.abs().max() + b.abs().max()
    best = _settled(_best(values, y, _nonnegative(y), masks, scale)) * s
    return best / best.sum()


def nonnegative_qp(quadratic: Tensor, linear: Tensor) -> Tensor:
    """``argmin_{x >= 0} 1/2 x^T Q x + c^T x`` for each row ``c`` of ``linear`` (``(P, T)`` or
    ``(T,)``), every face at once.

    >>> nonnegative_qp(torch.eye(2, dtype=torch.float64), torch.tensor([-1.0, 2.0]))
    tensor([1., 0.], dtype=torch.float64)
    """
    q = quadratic.to(torch.float64)
    num = q.shape[0]
    _check_size(num, "the non-negative QP")
    c = linear.to(q).reshape(-1, num)
    s = _jacobi(q)
    q, c = s[:, None] * q * s[None, :], c * s
    masks = face_masks(num, True, q.device)
    rhs = torch.where(masks[:, :, None], -c.T[None], 0.0)  # (F, T, P)
    y = pinv_solve(_face_systems(q, masks), rhs, _FACE_CUTOFF).transpose(1, 2)  # (F, P, T)
    values = 0.5 * torch.einsum("fpi,ij,fpj->fp", y, q, y) + (y * c).sum(dim=-1)
    scale = q.abs().max() + c.abs().amax(dim=1)
    best = _settled(_best(values, y, _nonnegative(y), masks, scale)) * s
    return best.reshape(linear.shape)


def imtl_g_weights(gramian: Tensor, degenerate: float) -> Tensor:
    """IMTL-G's weights (:func:`taskbalance.methods.imtl_g.imtl_g_weights`) on the device."""
    k = gramian.detach().to(torch.float64)
    num = k.shape[0]
    norms = k.diagonal().clamp_min(0).sqrt()
    alive = norms > 0
    inverse = torch.where(alive, 1.0 / torch.where(alive, norms, 1.0), 0.0)
    cosines = k * inverse[:, None] * inverse[None, :]
    _check_size(num, "IMTL-G")
    # pinv(C) 1 = V (e^+ * V^T 1), the host's cut-off: |e| <= T eps max|e| counts as zero.
    ones = torch.ones_like(norms)[:, None]
    b = pinv_solve(cosines, ones, num * torch.finfo(gramian.dtype).eps)[:, 0]
    x = b * inverse
    total = x.sum()
    solvable = (b.abs().sum() > degenerate) & (total.abs() > degenerate * x.abs().sum())
    count = alive.sum()
    equal = torch.where(count > 0, alive / count.clamp_min(1), torch.full_like(x, 1.0 / num))
    return torch.where(solvable, x / torch.where(solvable, total, 1.0), equal).to(gramian.dtype)


def cagrad_inner(gramian: Tensor, c: float, tolerance: Callable[[Tensor], Tensor]) -> Tensor:
    """CAGrad's dual weights (:func:`taskbalance.methods.cagrad.cagrad_inner`) on the device:
    MGDA's weights where MGDA's minimum norm is within ``tolerance(mgda)`` of zero, else the
    best face's closed form.

    On a face, stationarity reads ``b + r K w / ||w||_K = mu s`` (Jacobi-scaled), so
    ``w`` is proportional to ``u = mu p - q`` with ``K p = s``, ``K q = b``; ``||u||_K = r``
    is a quadratic in ``mu`` whose larger root makes ``s^T w = 1`` with a positive scale.
    """
    k = gramian.detach().to(torch.float64)
    num = k.shape[0]
    _check_size(num, "CAGrad")
    radius = c * k.sum().clamp_min(0).sqrt() / num
    mgda = simplex_qp(k)
    s = _jacobi(k)
    q, b = s[:, None] * k * s[None, :], s * (k.sum(dim=1) / num)
    masks = face_masks(num, False, k.device)
    rhs = torch.stack([torch.where(masks, s, 0.0), torch.where(masks, b, 0.0)], dim=2)
    solved = pinv_solve(_face_systems(q, masks), rhs, _FACE_CUTOFF)
    y, solvable = cagrad_face_minimisers(solved[..., 0], solved[..., 1], s, b, radius, torch.sqrt)
    values = y @ b + radius * torch.einsum("fi,ij,fj->f", y, q, y).clamp_min(0).sqrt()
    feasible = _nonnegative(y) & solvable
    face = _best(values, y, feasible, masks, b.abs().max() + radius).clamp_min(0) * s
    face = face / face.sum()
    mgda_norm = (mgda @ k @ mgda).clamp_min(0).sqrt()
    stationary = ~((radius > 0) & (k.diagonal().max() > 0) & (mgda_norm > tolerance(mgda)))
    return torch.where(stationary | ~torch.isfinite(face).all(), mgda, face)


def cagrad_face_minimisers(p: Any, r: Any, s: Any, b: Any, radius: Any, sqrt: Any) -> tuple:
    """The stationary point of CAGrad's dual on each face, from ``p = K_F^+ s`` and
    ``r = K_F^+ b`` per face (rows), and where it exists; written once for numpy arrays and
    torch tensors alike (``sqrt`` of the array library).

    ``||mu p - r||_K = radius`` is ``a mu^2 - 2 bb mu + cc - radius^2 = 0`` with ``a = s^T p``,
    ``bb = s^T r``, ``cc = b^T r``; the larger root makes the weights ``(mu p - r) / sqrt(disc)``
    sum (``s^T y``) to one with a positive scale.
    """
    a, bb, cc = (p * s).sum(-1), (r * s).sum(-1), (r * b).sum(-1)
    disc = bb**2 - a * (cc - radius**2)
    root = sqrt(disc * (disc > 0))
    mu = (bb + root) / a
    y = (mu[:, None] * p - r) / root[:, None]
    return y, (disc > 0) & (a > 0)


def power_equation(gramian: Tensor, alpha: float, init: Tensor | None, ridge: float) -> Tensor:
    """Nash-MTL's and FairGrad's ``K a = a^(-1/alpha)``
    (:func:`taskbalance.methods._simplex.power_equation`) on the device: the problem and its
    ridged twin solved side by side, the twin's answer taken where the first has none."""
    k = gramian.detach().to(torch.float64)
    num = k.shape[0]
    diagonal = k.diagonal().clamp_min(0)
    kappa = diagonal.mean()
    scale = torch.where(kappa > 0, kappa, 1.0)
    rescale = scale ** (-alpha / (alpha + 1))
    k = k / scale
    diagonal = diagonal / scale
    ridged = k + torch.diag(ridge * torch.where(diagonal > 0, diagonal, 1.0))
    pair = torch.stack([k, ridged])
    cold = (num / pair.sum(dim=(1, 2)).clamp_min(1e-300)) ** (alpha / (alpha + 1))
    a = cold[:, None].expand(2, num).clone()
    if init is not None:
        warm = init.detach().to(a) / rescale
        usable = torch.isfinite(warm).all() & (warm > 0).all()
        a[0] = torch.where(usable, warm, a[0])
    exponent = -1.0 / alpha
    for _ in range(_NEWTON_STEPS):
        a = _newton_step(pair, a, alpha, exponent)
    power = a**exponent
    relative = (torch.linalg.vector_norm(pair @ a[..., None] - power[..., None], dim=(1, 2))) / (
        torch.linalg.vector_norm(power, dim=1)
    )
    valid = torch.isfinite(a).all(dim=1) & (a > 0).all(dim=1) & torch.isfinite(relative)
    first = valid[0] & (relative[0] <= 1e-9)
    chosen = torch.where(first, a[0], torch.where(valid[1], a[1], torch.ones_like(a[1])))
    return torch.where(kappa > 0, chosen * rescale, torch.ones_like(chosen))


def _objective(k: Tensor, a: Tensor, alpha: float, exponent: float) -> Tensor:
    """``1/2 a^T K a - sum h(a)`` over the last axis (NaN where ``a`` leaves ``a > 0``)."""
    h = a.log() if alpha == 1 else a ** (1 + exponent) / (1 + exponent)
    quadratic = torch.einsum("p...i,pij,p...j->p...", a, k, a)
    return 0.5 * quadratic - h.sum(dim=-1)


def _newton_step(k: Tensor, a: Tensor, alpha: float, exponent: float) -> Tensor:
    """One damped Newton step of each problem of the batch, every step size tried at once; a
    problem already solved (or with no descent step) stays where it is."""
    power = a**exponent
    residual = (k @ a[..., None])[..., 0] - power
    hessian = k + torch.diag_embed(power / (alpha * a))
    direction = -torch.linalg.solve_ex(hessian, residual[..., None])[0][..., 0]
    shrinking = direction < 0
    boundary = torch.where(shrinking, a / (-direction).clamp_min(1e-300), math.inf).amin(dim=1)
    longest = (0.99 * boundary).clamp_max(1.0)
    sizes = longest[:, None] * 0.5 ** torch.arange(_BACKTRACKS, dtype=a.dtype, device=a.device)
    candidates = a[:, None, :] + sizes[..., None] * direction[:, None, :]
    value = _objective(k, a, alpha, exponent)
    values = _objective(k, candidates, alpha, exponent)
    slope = (residual * direction).sum(dim=1)
    armijo = values <= value[:, None] + 1e-4 * sizes * slope[:, None]
    # Near the solution the decrease drowns in rounding: a step that halves the residual is
    # taken too (Newton's local quadratic convergence), as on the host.
    new_residual = (k[:, None] @ candidates[..., None])[..., 0] - candidates**exponent
    shrinks = (
        torch.linalg.vector_norm(new_residual, dim=2)
        < 0.5 * torch.linalg.vector_norm(residual, dim=1)[:, None]
    )
    accepted = (armijo | shrinks) & torch.isfinite(candidates).all(dim=2)
    accepted &= (candidates > 0).all(dim=2)
    first = accepted.to(torch.int8).argmax(dim=1)
    step = candidates[torch.arange(a.shape[0], device=a.device), first]
    return torch.where(accepted.any(dim=1)[:, None], step, a)
