"""Aligned-MTL: independent component alignment (Senushkin et al., "Independent Component
Alignment for Multi-Task Learning", CVPR 2023).

Aligned-MTL replaces the task gradients by an aligned system with condition number 1: with the
eigendecomposition ``K = V L V^T`` restricted to the ``r`` non-zero eigenvalues (rank r), the
aligned gradients are ``G_hat = sqrt(l_min) V L^(-1/2) V^T G`` (the singular values of G all
set to the smallest non-zero one, ``sigma_min = sqrt(l_min)``), and the update is their sum.
As weights on the original gradients:

    a = B 1,    B = sqrt(l_min) V_r L_r^(-1/2) V_r^T.

Needs: the Gramian (one T x T eigendecomposition). Cost: per-task gradients + O(T^3).

Choices: the scale is the smallest NON-ZERO singular value (the paper's choice; eigenvalues
below ``max(l) * T * eps`` count as zero, torchjd's and LibMTL's cut-off), offered with
``scale="median"`` and ``scale="mean"`` (the mean eigenvalue, which torchjd calls "rmse");
the update is the SUM of the aligned gradients (task weights 1, as LibMTL; torchjd uses the
mean, 1/T). The zero Gramian gives weights 1 (the update is zero). The paper's "-UB" variant
is ``level="feature"``; the default is ``"parameter"``, the paper's main setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods._simplex import check_gramian
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register

Scale = Literal["min", "median", "mean"]


def aligned_mtl_weights(gramian: Tensor, scale: Scale = "min") -> Tensor:
    """Aligned-MTL weights ``a = B 1`` from the Gramian (see the module docstring).

    >>> aligned_mtl_weights(torch.diag(torch.tensor([1.0, 4.0])))  # sigma = 1 and 2 -> both 1
    tensor([1.0000, 0.5000])
    """
    check_gramian(gramian)
    if scale not in ("min", "median", "mean"):
        raise ValueError(f"Aligned-MTL: scale must be 'min', 'median' or 'mean', got {scale!r}")
    k = gramian.detach().to(torch.float64)
    num = k.shape[0]
    values, vectors = torch.linalg.eigh(k)
    cutoff = values.max() * num * torch.finfo(torch.float64).eps
    keep = values > cutoff
    if not keep.any():
        return torch.ones(num, dtype=gramian.dtype, device=gramian.device)
    values, vectors = values[keep], vectors[:, keep]
    chosen = {"min": values.min(), "median": values.median(), "mean": values.mean()}[scale]
    balance = chosen.sqrt() * (vectors / values.sqrt()) @ vectors.T
    return balance.sum(dim=1).to(gramian.dtype)


@register
class AlignedMTL(Method):
    """Aligned-MTL: align the task gradients to condition number 1, then sum them.

    Args:
        tasks: optional task count or names (Aligned-MTL keeps no state).
        level: ``"parameter"`` (default) or ``"feature"`` (the paper's Aligned-MTL-UB).
        scale: the common singular value: ``"min"`` (default, the paper), ``"median"`` or
            ``"mean"`` (the mean eigenvalue of K).

    >>> AlignedMTL().shared_weights(torch.ones(2), torch.eye(2))
    tensor([1., 1.])
    """

    name = "aligned_mtl"
    paper = "Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023"
    requires = Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "parameter"

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        level: Level | None = None,
        scale: Scale = "min",
    ) -> None:
        super().__init__(tasks=tasks, level=level)
        if scale not in ("min", "median", "mean"):
            raise ValueError(f"Aligned-MTL: scale must be 'min', 'median' or 'mean', got {scale!r}")
        self.scale = scale

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """See :func:`aligned_mtl_weights`."""
        return aligned_mtl_weights(gramian, self.scale)

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [super().extra_repr(), f"scale={self.scale!r}"]))
