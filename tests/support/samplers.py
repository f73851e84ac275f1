"""Jacobian samplers: families of T x n matrices that stress a method in different ways.

Each sampler is deterministic in ``seed`` and returns a float64 matrix, so that properties can
be checked to near machine precision.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_jacobian(num_tasks: int, dim: int, seed: int) -> Tensor:
    """Gaussian rows: generic, full rank when ``num_tasks <= dim``."""
    return torch.randn(num_tasks, dim, generator=_generator(seed), dtype=torch.float64)


def scaled_rows(num_tasks: int, dim: int, seed: int) -> Tensor:
    """Gaussian rows multiplied by scales spread over six orders of magnitude."""
    gen = _generator(seed)
    scales = 10.0 ** torch.empty(num_tasks, 1, dtype=torch.float64).uniform_(-3, 3, generator=gen)
    return scales * torch.randn(num_tasks, dim, generator=gen, dtype=torch.float64)


def near_collinear(num_tasks: int, dim: int, seed: int) -> Tensor:
    """Rows that are one common direction plus 1 % noise and different lengths."""
    gen = _generator(seed)
    common = torch.randn(1, dim, generator=gen, dtype=torch.float64)
    noise = 0.01 * torch.randn(num_tasks, dim, generator=gen, dtype=torch.float64)
    lengths = torch.empty(num_tasks, 1, dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
    return lengths * (common + noise)


def conflicting(num_tasks: int, dim: int, seed: int) -> Tensor:
    """Rows with negative pairwise cosines on average (a shared direction is subtracted)."""
    gen = _generator(seed)
    rows = torch.randn(num_tasks, dim, generator=gen, dtype=torch.float64)
    return rows - 0.9 * rows.mean(dim=0, keepdim=True)


GENERIC_SAMPLERS = [random_jacobian, scaled_rows, near_collinear, conflicting]


def unit_rows(matrix: Tensor) -> Tensor:
    """Each row divided by its norm."""
    return matrix / matrix.norm(dim=1, keepdim=True)


# -- degenerate families (appended for the gradient-baseline property suites) -------------------


def rank_deficient(num_tasks: int, dim: int, seed: int) -> Tensor:
    """Rows spanning only a ``max(1, num_tasks // 2)``-dimensional subspace."""
    gen = _generator(seed)
    rank = max(1, num_tasks // 2)
    mixing = torch.randn(num_tasks, rank, generator=gen, dtype=torch.float64)
    return mixing @ torch.randn(rank, dim, generator=gen, dtype=torch.float64)


def zero_matrix(num_tasks: int, dim: int, seed: int) -> Tensor:
    """Every task gradient is zero (``seed`` is ignored)."""
    return torch.zeros(num_tasks, dim, dtype=torch.float64)


def identical_rows(num_tasks: int, dim: int, seed: int) -> Tensor:
    """The same gradient for every task."""
    return torch.randn(1, dim, generator=_generator(seed), dtype=torch.float64).repeat(num_tasks, 1)


def collinear_rows(num_tasks: int, dim: int, seed: int) -> Tensor:
    """Exactly collinear rows with different positive lengths (no conflict, rank one)."""
    gen = _generator(seed)
    common = torch.randn(1, dim, generator=gen, dtype=torch.float64)
    lengths = torch.empty(num_tasks, 1, dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
    return lengths * common


DEGENERATE_SAMPLERS = [rank_deficient, zero_matrix, identical_rows, collinear_rows]
