"""IMTL: the hybrid of IMTL-L and IMTL-G (Liu et al., ICLR 2021, Algorithm 1).

1. scaled losses ``L'_t = exp(s_t) L_t - s_t`` (IMTL-L);
2. ``a`` = IMTL-G weights from the gradients of ``exp(s_t) L_t`` w.r.t. z (feature level, the
   paper's default) or the shared parameters (exact);
3. the shared parameters receive the gradient of ``sum_t a_t L'_t``;
4. each head receives the gradient of its own ``L'_t``, not weighted by ``a``;
5. each ``s_t`` receives ``exp(s_t) L_t - 1``, not weighted by ``a``.

No hyperparameters. Cost at feature level: one backward where the heads are disjoint (the
rows at z read on the way), else T head-only backward passes + one backward; at parameter
level: T backward passes (batched) + one head-only backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from taskbalance.engine.placement import HostGramian
from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods.imtl_g import imtl_g_host, imtl_g_weights
from taskbalance.methods.imtl_l import IMTLL
from taskbalance.methods.registry import register


@register
class IMTL(IMTLL):
    """IMTL (hybrid): IMTL-L's loss scales plus IMTL-G's gradient weights on the shared part.

    Args:
        tasks: the number of tasks or their names (required: one scale per task).
        level: ``"feature"`` (default) or ``"parameter"``.

    >>> IMTL(tasks=["seg", "depth"]).task_names
    ('seg', 'depth')
    """

    name = "imtl"
    requires = Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "feature"

    def __init__(
        self, tasks: int | Sequence[str] | None = None, level: Level | None = None
    ) -> None:
        super().__init__(tasks=tasks)
        self.level = self._check_level(level)

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """IMTL-G weights of the gradients of ``exp(s_t) L_t``; see ``imtl_g_weights``."""
        return imtl_g_weights(gramian)

    def host_weights(self, losses: Tensor, gramian: HostGramian) -> np.ndarray:
        """The same on the host; see ``imtl_g_host``."""
        return imtl_g_host(gramian.cosines, 1.0 / gramian.norms, gramian.eps)
