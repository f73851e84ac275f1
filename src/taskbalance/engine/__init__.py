"""The gradient engine: the only code in taskbalance that calls autograd.

From T task losses it computes exactly what a method declares it needs: nothing beyond the
losses, the Gramian ``K = G G^T`` of the per-task gradients, or the Jacobian ``G`` itself, with
``G`` taken w.r.t. the shared parameters (parameter level) or the shared representation z
(feature level). The parameter-level Gramian may also be formed layer by layer without the
Jacobian (:mod:`taskbalance.engine.gramian_path`).
"""

from taskbalance.engine.gramian_path import (
    GramianPath,
    LayerwiseGramian,
    UncoveredLayerError,
    plan_layers,
)
from taskbalance.engine.graph import inputs_reached, leaf_tensors, reaches
from taskbalance.engine.jacobian import (
    JacobianMode,
    SparseGradientError,
    Workspace,
    combine,
    from_matrix,
    gramian,
    task_jacobian,
    to_matrix,
)
from taskbalance.engine.losses import (
    TaskLosses,
    check_finite_losses,
    collect_losses,
    unique_tensors,
)
from taskbalance.engine.requirement import Level, Requirement

__all__ = [
    "GramianPath",
    "JacobianMode",
    "LayerwiseGramian",
    "Level",
    "Requirement",
    "SparseGradientError",
    "TaskLosses",
    "UncoveredLayerError",
    "Workspace",
    "check_finite_losses",
    "collect_losses",
    "combine",
    "from_matrix",
    "gramian",
    "inputs_reached",
    "leaf_tensors",
    "plan_layers",
    "reaches",
    "task_jacobian",
    "to_matrix",
    "unique_tensors",
]
