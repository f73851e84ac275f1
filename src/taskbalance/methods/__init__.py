"""The balancing methods, one per module, each registered under its snake-case name.

Every module of this package is imported here, so that its ``@register`` runs and
:func:`get_method` knows every method without a hand-kept list.
"""

import importlib
import pkgutil

from taskbalance.methods.base import Method
from taskbalance.methods.ew import EW
from taskbalance.methods.imtl import IMTL
from taskbalance.methods.imtl_g import IMTLG, imtl_g_weights
from taskbalance.methods.imtl_l import IMTLL
from taskbalance.methods.registry import get_method, hyperparameters, list_methods

__all__ = [
    "EW",
    "IMTL",
    "IMTLG",
    "IMTLL",
    "Method",
    "get_method",
    "hyperparameters",
    "imtl_g_weights",
    "list_methods",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
