"""GradDrop: gradient sign dropout (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask
Models with Gradient Sign Dropout", NeurIPS 2020, Algorithm 1).

For every coordinate of the shared gradient, the positive sign purity

    P = 1/2 (1 + sum_t g_t / sum_t |g_t|)      (in [0, 1])

is compared with a uniform draw U: if ``P > U`` only the positive task gradients pass at that
coordinate, if ``P < U`` only the negative ones; with a leak ``l_t`` each task also passes a
fraction ``l_t`` of its gradient unconditionally:

    update = sum_t (l_t + (1 - l_t) M_t) g_t,   M_t = [P > U][g_t > 0] + [P < U][g_t < 0].

Needs: the Jacobian (elementwise signs cannot be had from the Gramian). Cost: per-task
gradients + O(T n). The paper places GradDrop on the activations (the gradients w.r.t. the
shared representation z): ``level="feature"``, the default here; ``"parameter"`` applies it to
the shared parameters' gradients.

Choices: the purity function is the identity (as torchjd); a coordinate where every
task gradient is zero has P = 1/2 (nothing to pass anyway); at feature level the mask is drawn
per element of z, batch axis included (the whole tensor is flattened, as the engine does for
every method); U is drawn on the CPU in the Jacobian's dtype from the method's generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods._simplex import Seeded
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register


def graddrop_update(
    jacobian: Tensor,
    leak: float | Sequence[float] | Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """GradDrop's combined gradient from the ``(T, n)`` Jacobian.

    Args:
        jacobian: the task gradients, one per row.
        leak: one leak for all tasks or one per task, each in [0, 1] (default 0).
        generator: a CPU generator for U (default: torch's global one).

    >>> jacobian = torch.tensor([[1.0, -1.0], [1.0, 2.0]])  # column 0 is pure: P = 1
    >>> graddrop_update(jacobian, generator=torch.Generator().manual_seed(0))[0]
    tensor(2.)
    """
    if jacobian.dim() != 2:
        raise ValueError(f"a Jacobian must be a (T, n) matrix, got {tuple(jacobian.shape)}")
    num, dim = jacobian.shape
    leaks = torch.as_tensor(leak, dtype=jacobian.dtype).to(jacobian.device).reshape(-1)
    if leaks.numel() == 1:
        leaks = leaks.expand(num)
    if leaks.numel() != num or (leaks < 0).any() or (leaks > 1).any():
        raise ValueError(f"GradDrop: leak must be one number or {num}, each in [0, 1]")
    total = jacobian.sum(dim=0)
    absolute = jacobian.abs().sum(dim=0)
    purity = torch.where(absolute > 0, 0.5 * (1 + total / absolute.clamp_min(1e-300)), 0.5)
    draw = torch.rand(dim, generator=generator, dtype=jacobian.dtype).to(jacobian.device)
    mask = ((purity > draw) & (jacobian > 0)) | ((purity < draw) & (jacobian < 0))
    factors = leaks[:, None] + (1 - leaks[:, None]) * mask.to(jacobian.dtype)
    return (factors * jacobian).sum(dim=0)


@register
class GradDrop(Seeded, Method):
    """GradDrop: keep, per coordinate, only the gradients of one randomly chosen sign.

    Args:
        tasks: optional task count or names (GradDrop keeps no per-task state).
        level: ``"feature"`` (default, the paper's setting) or ``"parameter"``.
        leak: one leak for all tasks or one per task, in [0, 1] (default 0).
        seed: seed of the uniform draws; the generator's state is saved in ``state_dict``.

    >>> GradDrop(leak=1.0).aggregate(torch.ones(2), torch.tensor([[1.0, -1.0], [1.0, 2.0]]))
    tensor([2., 1.])
    """

    name = "graddrop"
    paper = "Chen et al., Just Pick a Sign: Gradient Sign Dropout, NeurIPS 2020"
    requires = Requirement.JACOBIAN
    levels = ("feature", "parameter")
    default_level = "feature"

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        level: Level | None = None,
        leak: float | Sequence[float] = 0.0,
        seed: int | None = 0,
    ) -> None:
        super().__init__(tasks=tasks, level=level)
        values = [float(leak)] if isinstance(leak, int | float) else [float(x) for x in leak]
        if any(not 0.0 <= x <= 1.0 for x in values):
            raise ValueError(f"GradDrop: every leak must be in [0, 1], got {leak}")
        if len(values) > 1 and self.num_tasks is not None and len(values) != self.num_tasks:
            raise ValueError(f"GradDrop: {len(values)} leaks for {self.num_tasks} tasks")
        self.leak = values[0] if len(values) == 1 else values
        self._init_generator(seed)

    def aggregate(self, losses: Tensor, jacobian: Tensor) -> Tensor:
        """See :func:`graddrop_update`."""
        return graddrop_update(jacobian, self.leak, self.generator)

    def extra_repr(self) -> str:
        return ", ".join(
            filter(None, [super().extra_repr(), f"leak={self.leak}", f"seed={self.seed}"])
        )
