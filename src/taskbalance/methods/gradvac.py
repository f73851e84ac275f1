"""GradVac: gradient vaccine (Wang et al., "Gradient Vaccine: Investigating and Improving
Multi-task Optimization in Massively Multilingual Models", ICLR 2021).

A generalisation of PCGrad that aims every pair of tasks at an adaptive target cosine instead
of mere non-conflict. For every task i, in a random order of the other tasks j, with
``phi = cos(g_i^PC, g_j)`` and the target ``phi^_ij`` (an exponential moving average of past
cosines, starting at 0):

    if phi < phi^_ij:
        g_i^PC <- g_i^PC + ||g_i^PC|| (phi^_ij sqrt(1 - phi^2) - phi sqrt(1 - phi^_ij^2))
                           / (||g_j|| sqrt(1 - phi^_ij^2)) g_j
    phi^_ij <- (1 - beta) phi^_ij + beta phi,

and the update is ``sum_i g_i^PC``. As for PCGrad, ``g_i^PC`` stays a linear combination of the
original gradients, so everything is computed from the Gramian. State: the T x T targets
``phi^`` (a buffer, saved in ``state_dict``) and the generator of the orders.
Cost: per-task gradients + O(T^3) scalar work.

Choices where the paper is silent or where implementations differ: the cosine in the EMA is the
one measured before the correction, between the running ``g_i^PC`` and the original ``g_j``
(as torchjd and LibMTL do); ``eps = 1e-8`` is added to the denominators; a zero gradient is
neither corrected nor used for corrections (its cosine counts as 0 in the EMA); one target per
ordered pair of tasks for the whole shared part (the paper also studies per-layer targets,
which this Gramian-level method does not offer); ``beta = 0.5`` by default, the value of
torchjd and LibMTL (the paper's own value was not available to us: tune it).
Default level: ``"parameter"`` (the paper's setting).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods._simplex import Seeded, check_gramian
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register


def gradvac_weights(
    gramian: Tensor,
    targets: Tensor,
    beta: float = 0.5,
    generator: torch.Generator | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """GradVac's update as weights on the original gradients; updates ``targets`` in place.

    For each i, one permutation of the T - 1 other tasks is drawn with
    ``torch.randperm(T - 1, generator=generator)`` (matching torchjd's ``GradVacWeighting``
    under the same seed).

    Args:
        gramian: ``K``, T x T.
        targets: the T x T EMA targets ``phi^`` (float64, modified in place).
        beta: EMA rate in [0, 1].
        generator: a CPU generator (default: torch's global one).
        eps: added to the denominators.

    >>> targets = torch.zeros(2, 2, dtype=torch.float64)  # target 0: a PCGrad projection
    >>> gradvac_weights(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), targets)
    tensor([1.5000, 1.5000])
    >>> round(float(targets[0, 1]), 4)  # (1 - beta) * 0 + beta * cos = 0.5 * -0.5
    -0.25
    """
    check_gramian(gramian)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"GradVac: beta must be in [0, 1], got {beta}")
    # Plain Python floats: T is small and the loop is sequential, so tensor ops would only add
    # dispatch overhead.
    k = gramian.detach().to(device="cpu", dtype=torch.float64).tolist()
    num = len(k)
    phi = targets.tolist()
    norms = [math.sqrt(max(k[j][j], 0.0)) for j in range(num)]
    rows = [[float(i == j) for j in range(num)] for i in range(num)]
    for i in range(num):
        row = rows[i]
        inner = list(k[i])  # g_i^PC . g_j for every j
        others = [j for j in range(num) if j != i]
        for position in torch.randperm(num - 1, generator=generator).tolist():
            j = others[position]
            norm_i = math.sqrt(max(sum(c * x for c, x in zip(row, inner, strict=True)), 0.0))
            cosine = inner[j] / (norm_i * norms[j] + eps)
            target = phi[i][j]
            if cosine < target and norms[j] > 0 and norm_i > 0:
                root = math.sqrt(max(1 - cosine**2, 0.0))
                target_root = math.sqrt(max(1 - target**2, 0.0))
                step = norm_i * (target * root - cosine * target_root)
                step = step / (norms[j] * target_root + eps)
                row[j] += step
                inner = [x + step * kj for x, kj in zip(inner, k[j], strict=True)]
            phi[i][j] = (1 - beta) * target + beta * cosine
    targets.copy_(torch.tensor(phi, dtype=targets.dtype))
    coefficients = torch.tensor(rows, dtype=torch.float64)
    return coefficients.sum(dim=0).to(device=gramian.device, dtype=gramian.dtype)


@register
class GradVac(Seeded, Method):
    """GradVac: raise every pairwise cosine to an adaptive (EMA) target.

    Args:
        tasks: the number of tasks or their names (required: the targets are per pair).
        level: ``"parameter"`` (default, the paper's setting) or ``"feature"``.
        beta: EMA rate of the targets, in [0, 1] (default 0.5).
        seed: seed of the task orders; the generator's state is saved in ``state_dict``.

    >>> method = GradVac(tasks=2)
    >>> method.targets.shape
    torch.Size([2, 2])
    """

    name = "gradvac"
    paper = "Wang et al., Gradient Vaccine, ICLR 2021"
    requires = Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "parameter"
    stateful = True

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        level: Level | None = None,
        beta: float = 0.5,
        seed: int | None = 0,
    ) -> None:
        super().__init__(tasks=tasks, level=level)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac: beta must be in [0, 1], got {beta}")
        self.beta = beta
        self._init_generator(seed)
        assert self.num_tasks is not None
        self.register_buffer(
            "targets", torch.zeros(self.num_tasks, self.num_tasks, dtype=torch.float64)
        )

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """See :func:`gradvac_weights`; the targets are updated."""
        targets = self.targets.detach().to(device="cpu", dtype=torch.float64)
        weights = gradvac_weights(gramian, targets, self.beta, self.generator)
        self.targets.copy_(targets)
        return weights

    def extra_repr(self) -> str:
        return ", ".join(
            filter(None, [super().extra_repr(), f"beta={self.beta}", f"seed={self.seed}"])
        )
