"""Methods by name: ``get_method("imtl", tasks=2)`` and the list of valid names."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from taskbalance.methods.base import Method

_METHODS: dict[str, type[Method]] = {}
M = TypeVar("M", bound="type[Method]")


def register(cls: M) -> M:
    """Class decorator: make a method available to :func:`get_method` under ``cls.name``."""
    taken = _METHODS.get(cls.name)
    # The same class imported a second time (e.g. by a doctest runner) may register again.
    if not cls.name or (taken is not None and taken.__qualname__ != cls.__qualname__):
        raise ValueError(f"{cls.__name__}: method name {cls.name!r} is empty or taken")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """The registry names of every method, sorted.

    >>> "imtl" in list_methods()
    True
    """
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``; an unknown name lists the valid ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; valid names: {', '.join(list_methods())}"
        ) from None


def hyperparameters(name: str) -> dict[str, Any]:
    """The constructor arguments of a method and their defaults (``inspect.Parameter.empty``
    where there is none).

    >>> hyperparameters("ew")
    {'tasks': None, 'reduction': 'sum'}
    """
    signature = inspect.signature(method_class(name).__init__)
    return {p.name: p.default for p in list(signature.parameters.values())[1:]}


def get_method(name: str, **options: Any) -> Method:
    """Build the method registered under ``name`` with the given hyperparameters.

    Raises:
        ValueError: an unknown name (the message lists the valid names).
        TypeError: an unknown hyperparameter (the message lists the valid ones).

    >>> get_method("imtl_g", level="parameter")
    IMTLG(level='parameter')
    """
    cls = method_class(name)
    valid = hyperparameters(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"method {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(valid) or 'none'}"
        )
    return cls(**options)
