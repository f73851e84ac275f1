"""The per-step quantities the seed papers argue with, as pure functions of what the engine
already computed (the losses, the weights and the T x T Gramian, or the norms and cosines that
:class:`taskbalance.StepInfo` carries): no backward pass.

- relative contributions (EMTL): ``r_t = L_t / ||g_t||``;
- pairwise cosines ``K_ts / sqrt(K_tt K_ss)`` and the share of conflicting pairs (cosine < 0);
- the projection of the shared update ``d = sum_s a_s g_s`` on each unit task gradient
  (IMTL's equal-projection check): ``d . u_t = (K a)_t / sqrt(K_tt)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gramian_from(norms: Tensor, cosines: Tensor) -> Tensor:
    """``K = diag(n) C diag(n)`` from the norms and cosines a :class:`~taskbalance.StepInfo`
    carries (exact where a norm is zero: that row and column are zero).

    >>> gramian_from(torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
    tensor([[1., 1.],
            [1., 4.]])
    """
    return norms[:, None] * cosines * norms[None, :]


def cosines_from(gramian: Tensor) -> Tensor:
    """Pairwise cosines from a Gramian; 0 where a gradient is zero (it has no direction).

    >>> cosines_from(torch.tensor([[4.0, -2.0], [-2.0, 1.0]]))
    tensor([[ 1., -1.],
            [-1.,  1.]])
    """
    norms = gramian.diagonal().clamp_min(0).sqrt()
    outer = norms[:, None] * norms[None, :]
    return torch.where(outer > 0, gramian / outer.clamp_min(torch.finfo(gramian.dtype).tiny), 0.0)


def conflict_rate(cosines: Tensor) -> float:
    """The share of task pairs ``t < s`` whose gradients conflict (cosine < 0); 0 for T = 1.

    >>> conflict_rate(torch.tensor([[1.0, -0.2, 0.3], [-0.2, 1.0, 0.1], [0.3, 0.1, 1.0]]))
    0.3333333333333333
    """
    num_tasks = cosines.shape[0]
    if num_tasks < 2:
        return 0.0
    upper = torch.triu_indices(num_tasks, num_tasks, offset=1)
    return float((cosines[upper[0], upper[1]] < 0).double().mean())


def projections(gramian: Tensor, weights: Tensor) -> Tensor:
    """The projection of ``d = sum_s a_s g_s`` on each unit task gradient,
    ``(K a)_t / sqrt(K_tt)``; 0 for a task with a zero gradient (no direction).

    Equal entries are IMTL-G's defining property.

    >>> projections(torch.diag(torch.tensor([1.0, 4.0])), torch.tensor([2.0, 1.0]))
    tensor([2., 2.])
    """
    norms = gramian.diagonal().clamp_min(0).sqrt()
    product = gramian @ weights.to(gramian.dtype)
    return torch.where(norms > 0, product / norms.clamp_min(torch.finfo(gramian.dtype).tiny), 0.0)


def relative_contributions(losses: Tensor, norms: Tensor) -> Tensor:
    """EMTL's ``r_t = L_t / ||g_t||``: ``inf`` for a zero gradient with a non-zero loss, 0 when
    both are zero. See :func:`taskbalance.methods.emtl.relative_contributions`.

    >>> relative_contributions(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0]))
    tensor([0.5000,    inf])
    """
    from taskbalance.methods.emtl import relative_contributions as emtl_r

    return emtl_r(losses, norms)


def spread(values: Tensor) -> float:
    """The coefficient of variation ``std / mean`` (population std) of the finite values; 0
    when fewer than two are finite or the mean is 0. Scale-free: 0 means all equal.

    >>> spread(torch.tensor([1.0, 1.0, float("inf")]))
    0.0
    >>> round(spread(torch.tensor([1.0, 3.0])), 6)
    0.5
    """
    finite = values[torch.isfinite(values)].to(torch.float64)
    if finite.numel() < 2 or finite.mean() == 0:
        return 0.0
    return float(finite.std(correction=0) / finite.mean().abs())
