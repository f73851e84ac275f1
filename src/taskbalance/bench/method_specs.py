"""The methods a benchmark compares, as specs: a name and its hyperparameters.

A spec names a registry method (:mod:`taskbalance.methods.registry`) or a pseudo-method, a
method paired with an optimizer: ``adatask`` is a loss-level method (EW by default, option
``base=``) with :class:`taskbalance.optim.AdaTaskAdam`. :func:`parse_method_spec` reads the
command line's ``NAME:key=value,...`` and checks every value against the method before anything
loads; :func:`build_method` and :func:`build_optimizer` make a run's method and optimizer from a
spec (a stochastic method gets the run's seed unless its spec gives one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from taskbalance.bench.problem import parse_value
from taskbalance.engine.requirement import Requirement
from taskbalance.methods.base import Method
from taskbalance.methods.registry import get_method, hyperparameters, list_methods

#: Pseudo-methods: names that are not registry methods but a method + optimizer pairing.
PSEUDO_METHODS: dict[str, str] = {
    "adatask": "EW (or base=NAME, a loss-level method) with the AdaTask Adam optimizer "
    "(Yang et al., AAAI 2023)",
}


def available_methods() -> list[str]:
    """Registry names plus the pseudo-methods available now (``adatask`` if its optimizer is
    importable).

    >>> "ew" in available_methods()
    True
    """
    names = list_methods()
    try:
        import taskbalance.optim  # noqa: F401
    except ImportError:
        return names
    return sorted([*names, *PSEUDO_METHODS])


@dataclass(frozen=True)
class MethodSpec:
    """A method to benchmark: its name, hyperparameters and the label it gets in tables.

    >>> parse_method_spec("imtl_g:level=parameter").options
    {'level': 'parameter'}
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``name`` or ``name:key=value,...``: how the method appears in tables and files."""
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options.items())


def parse_method_spec(text: str) -> MethodSpec:
    """Parse ``name`` or ``name:key=value,key=value`` and check it against the registry.

    Values are read as int, float, true/false, none, or left as strings.

    Raises:
        ValueError: an unknown method (the message lists the valid names), an unknown
            hyperparameter (lists the method's valid ones), a value the method refuses (names
            the hyperparameter, the value and what is valid) or a malformed spec.

    >>> parse_method_spec("cagrad:c=0.4,level=feature")
    MethodSpec(name='cagrad', options={'c': 0.4, 'level': 'feature'})
    >>> parse_method_spec("cagrad:c=abc")
    Traceback (most recent call last):
    ...
    ValueError: cagrad:c=abc: c must be a number (default 0.5)
    """
    name, _, rest = text.partition(":")
    name = name.strip()
    valid = available_methods()
    if name not in valid:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(valid)}")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method spec {text!r}: expected key=value, got {item!r}")
        options[key.strip()] = parse_value(value.strip())
    allowed = ["base"] if name == "adatask" else [k for k in hyperparameters(name) if k != "tasks"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"method {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(allowed) or 'none'}"
        )
    if name == "adatask":
        base = options.get("base", "ew")
        loss_level = [m for m in list_methods() if _is_loss_level(m)]
        if base not in loss_level:
            raise ValueError(
                f"adatask:base={base}: base must be a loss-level method; valid: "
                f"{', '.join(loss_level)}"
            )
    else:
        _check_values(name, options)
    return MethodSpec(name, options)


def _check_values(name: str, options: Mapping[str, Any]) -> None:
    """Refuse a value of the wrong kind (a number's default given a word) and any value the
    method's own constructor refuses, with a message naming the method, the hyperparameter,
    the value and what is valid: before any data is loaded or any run starts."""
    defaults = hyperparameters(name)
    for key, value in options.items():
        default = defaults[key]
        kinds = {bool: "true or false", int: "an integer", float: "a number"}
        kind = type(default)
        if kind in kinds and default is not None:
            fits = isinstance(value, bool) if kind is bool else (
                isinstance(value, int | float) and not isinstance(value, bool)
                and (kind is float or isinstance(value, int))
            )  # fmt: skip
            if not fits:
                raise ValueError(
                    f"{name}:{key}={value}: {key} must be {kinds[kind]} (default {default!r})"
                )
    try:
        get_method(name, tasks=2, **options)
    except (TypeError, ValueError) as error:
        shown = ",".join(f"{k}={v}" for k, v in options.items())
        raise ValueError(f"{name}:{shown}: {error}") from None


def _is_loss_level(name: str) -> bool:
    from taskbalance.methods.registry import method_class

    return method_class(name).requires is Requirement.LOSSES


def build_method(spec: MethodSpec, tasks: Sequence[str], seed: int) -> Method:
    """The method ``spec`` names for ``tasks`` (``adatask``: its loss-level ``base``); a method
    with a ``seed`` hyperparameter gets ``seed`` unless ``spec`` gives one.

    >>> build_method(MethodSpec("rlw"), ["a", "b"], seed=3).seed
    3
    """
    name, options = spec.name, dict(spec.options)
    if name == "adatask":
        name = options.pop("base", "ew")
    if "seed" in hyperparameters(name) and "seed" not in options:
        options["seed"] = seed
    return get_method(name, tasks=list(tasks), **options)


def build_optimizer(
    spec: MethodSpec,
    model: nn.Module,
    method: Method,
    tasks: Sequence[str],
    lr: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """The optimizer of a run of ``spec`` on ``model`` (its ``trunk`` holds the shared
    parameters) and ``method``'s own parameters (their group from ``method.param_group()``):
    Adam with L2 ``weight_decay``, or for ``adatask`` on several ``tasks``
    :class:`taskbalance.optim.AdaTaskAdam` (per-task moments on the shared parameters, the
    parameters named so that its AU diagnostic can name the layers)."""
    shared = list(model.trunk.parameters())
    ids = {id(p) for p in shared}
    others = [p for p in model.parameters() if id(p) not in ids]
    method_group = method.param_group() if list(method.parameters()) else None
    if spec.name == "adatask" and len(tasks) > 1:
        from taskbalance.optim import AdaTaskAdam

        # Named parameters (torch wants every group named, or none): the AU diagnostic reports
        # its shares per shared layer by these names.
        named = dict(model.named_parameters())
        names = {id(p): name for name, p in named.items()}
        groups = [
            {"params": shared, "shared": True, "param_names": [names[id(p)] for p in shared]},
            {"params": others, "param_names": [names[id(p)] for p in others]},
        ]
        if method_group:
            method_names = [f"method.{name}" for name, _ in method.named_parameters()]
            groups.append({**method_group, "param_names": method_names})
        return AdaTaskAdam(
            groups,
            lr=lr,
            weight_decay=weight_decay,
            decoupled_weight_decay=False,
        )
    groups = [{"params": [*shared, *others]}] + ([method_group] if method_group else [])
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
