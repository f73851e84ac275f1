"""taskbalance: multi-task optimisation for PyTorch.

Replace ``sum(losses).backward()`` by one call::

    method = taskbalance.IMTL(tasks=["seg", "depth"])
    optimizer = torch.optim.Adam([*model.parameters(), *method.parameters()])
    ...
    info = method.backward(losses, features=z)   # z: the trunk's output the heads read
    optimizer.step()
"""

from taskbalance.apply import StepInfo, backward, gradients, task_gradients
from taskbalance.engine.requirement import Level, Requirement
from taskbalance.errors import InvalidLossError, NonFiniteLossError
from taskbalance.methods import (
    EW,
    IMTL,
    IMTLG,
    IMTLL,
    Method,
    get_method,
    hyperparameters,
    imtl_g_weights,
    list_methods,
)

__version__ = "0.1.0"

__all__ = [
    "EW",
    "IMTL",
    "IMTLG",
    "IMTLL",
    "InvalidLossError",
    "Level",
    "Method",
    "NonFiniteLossError",
    "Requirement",
    "StepInfo",
    "backward",
    "get_method",
    "gradients",
    "hyperparameters",
    "imtl_g_weights",
    "list_methods",
    "task_gradients",
]
