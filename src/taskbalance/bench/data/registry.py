"""Look up a dataset loader by name: ``load_dataset("qm9")``.

Every loader returns a :class:`~taskbalance.bench.data.types.MultiTaskData` and accepts
``seed=``, ``root=`` (a folder with the raw files, instead of fetching) and ``cache_dir=``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .census import load_census_income
from .movielens import load_movielens
from .multimnist import load_multi_fashion, load_multi_fashion_mnist, load_multi_mnist
from .qm9 import load_qm9
from .rf1 import load_rf1
from .types import MultiTaskData

_LOADERS: dict[str, Callable[..., MultiTaskData]] = {
    "multi_mnist": load_multi_mnist,
    "multi_fashion": load_multi_fashion,
    "multi_fashion_mnist": load_multi_fashion_mnist,
    "census_income": load_census_income,
    "qm9": load_qm9,
    "movielens": load_movielens,
    "rf1": load_rf1,
}

#: The names :func:`load_dataset` accepts.
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(name: str, **options: Any) -> MultiTaskData:
    """Load the dataset ``name`` (one of ``DATASETS``), passing ``options`` to its loader.

    Returns the loader's :class:`MultiTaskData`. Raises ``ValueError`` listing the valid names
    when ``name`` is unknown.

    Example:
        >>> data = load_dataset("multi_mnist", size=20_000, seed=0)  # doctest: +SKIP
        >>> data.task_names  # doctest: +SKIP
        ('left', 'right')
    """
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; valid names are: {', '.join(DATASETS)}"
        ) from None
    return loader(**options)
