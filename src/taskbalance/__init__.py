"""taskbalance: multi-task optimisation for PyTorch.

The seed methods IMTL (``IMTLL``, ``IMTLG``, ``IMTL``), AdaTask (``AdaTaskAdam`` and
siblings) and EMTL, every baseline by name (``get_method``, ``list_methods``), and the
diagnostics ``Recorder``. Replace ``sum(losses).backward()`` by one call::

    method = taskbalance.IMTL(tasks=["seg", "depth"])
    optimizer = torch.optim.Adam([*model.parameters(), *method.parameters()])
    ...
    info = method.backward(losses, features=z)   # z: the trunk's output the heads read
    optimizer.step()
"""

from taskbalance.apply import StepInfo, backward, gradients, task_gradients
from taskbalance.diagnostics import Recorder
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
from taskbalance.methods.emtl import EMTL, emtl_weights
from taskbalance.optim import AdaTaskAdagrad, AdaTaskAdam, AdaTaskRMSprop

# The one place the version is set: pyproject.toml (dynamic) and docs/conf.py read it.
__version__ = "0.1.0"

__all__ = [
    "EMTL",
    "EW",
    "IMTL",
    "IMTLG",
    "IMTLL",
    "AdaTaskAdagrad",
    "AdaTaskAdam",
    "AdaTaskRMSprop",
    "InvalidLossError",
    "Level",
    "Method",
    "NonFiniteLossError",
    "Recorder",
    "Requirement",
    "StepInfo",
    "backward",
    "emtl_weights",
    "get_method",
    "gradients",
    "hyperparameters",
    "imtl_g_weights",
    "list_methods",
    "task_gradients",
]
