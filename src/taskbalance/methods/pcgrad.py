"""PCGrad: projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020, Algorithm 1).

For every task i, in a random order of the other tasks j, the running copy ``g_i^PC`` (starting
at ``g_i``) loses its component along ``g_j`` when the two conflict:

    if g_i^PC . g_j < 0:   g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j,

and the update is ``sum_i g_i^PC``. Every ``g_i^PC`` stays a linear combination of the original
gradients, and each projection needs only inner products, so PCGrad is computed here from the
Gramian alone: ``g_i^PC = sum_k C_ik g_k`` with ``C`` starting at the identity, and the update's
weights are the column sums of ``C``. Needs: the Gramian (never the Jacobian).
Cost: per-task gradients + O(T^3) scalar work.

Choices: the projections use the ORIGINAL ``g_j`` (as in Algorithm 1); a new random order of the
other tasks is drawn for every i (as the official code, which shuffles inside the loop over
tasks); a task with a zero gradient projects nothing and is projected on by nothing; the update
is the sum (not the mean) of the projected gradients. Default level: ``"parameter"`` (the
paper's setting: gradients of the shared parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods._simplex import Seeded, check_gramian
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register


def pcgrad_projections(gramian: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The T x T coefficients ``C`` of the projected gradients: ``g_i^PC = sum_k C_ik g_k``.

    For each i, in order, one permutation of all T tasks is drawn with
    ``torch.randperm(T, generator=generator)`` and visited skipping i (so the draws match
    torchjd's ``PCGradWeighting`` under the same seed). Computed in float64 on the CPU.

    >>> pcgrad_projections(torch.tensor([[1.0, -1.0], [-1.0, 4.0]]))
    tensor([[1.0000, 0.2500],
            [1.0000, 1.0000]], dtype=torch.float64)
    """
    check_gramian(gramian)
    # Plain Python floats: T is small and the loop is sequential, so tensor ops would only add
    # dispatch overhead.
    k = gramian.detach().to(device="cpu", dtype=torch.float64).tolist()
    num = len(k)
    rows = [[float(i == j) for j in range(num)] for i in range(num)]
    for i in range(num):
        row = rows[i]
        for j in torch.randperm(num, generator=generator).tolist():
            if j == i or not k[j][j] > 0:
                continue
            inner = sum(c * kj for c, kj in zip(row, k[j], strict=True))  # g_i^PC . g_j
            if inner < 0:
                row[j] -= inner / k[j][j]
    coefficients = torch.tensor(rows, dtype=torch.float64)
    return coefficients


def pcgrad_weights(gramian: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad's update ``sum_i g_i^PC`` as weights on the original gradients: the column sums
    of :func:`pcgrad_projections`.

    Args:
        gramian: ``K = G G^T``, T x T.
        generator: a CPU generator (default: torch's global one).

    >>> k = torch.tensor([[1.0, -1.0], [-1.0, 4.0]])  # g_1 . g_2 < 0: both get projected
    >>> pcgrad_weights(k)
    tensor([2.0000, 1.2500])
    """
    weights = pcgrad_projections(gramian, generator).sum(dim=0)
    return weights.to(device=gramian.device, dtype=gramian.dtype)


@register
class PCGrad(Seeded, Method):
    """PCGrad: project away the conflicting components, task by task, in a random order.

    Args:
        tasks: optional task count or names.
        level: ``"parameter"`` (default, the paper's setting) or ``"feature"``.
        seed: seed of the task orders (``None``: a non-deterministic seed). The generator's
            state is saved in ``state_dict``.

    >>> PCGrad(seed=0).shared_weights(torch.ones(2), torch.tensor([[1.0, -1.0], [-1.0, 4.0]]))
    tensor([2.0000, 1.2500])
    """

    name = "pcgrad"
    paper = "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020"
    requires = Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "parameter"

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        level: Level | None = None,
        seed: int | None = 0,
    ) -> None:
        super().__init__(tasks=tasks, level=level)
        self._init_generator(seed)

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """See :func:`pcgrad_weights`."""
        return pcgrad_weights(gramian, self.generator)

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [super().extra_repr(), f"seed={self.seed}"]))
