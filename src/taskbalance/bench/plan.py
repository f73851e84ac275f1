"""The plan of a benchmark: which runs train, and which of them the table keeps.

A benchmark trains in two stages (:mod:`taskbalance.bench.benchmark` runs them): the
single-task baselines (:func:`baseline_plan`), then the methods (:func:`method_plan`), each on
the learning-rate grid for the grid seeds and at each label's chosen rate
(:func:`choose_lrs`, on validation only) for the later seeds. :func:`select` keeps, per label,
the runs at the chosen rate, and :func:`references` turns the selected baselines into the
validation reference of the methods' Delta m. Every function here is pure: configs and results
in, configs and results out.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from taskbalance.bench.method_specs import MethodSpec, available_methods
from taskbalance.bench.protocols import PAPER_METHODS
from taskbalance.bench.run_config import RunConfig, RunResult

if TYPE_CHECKING:
    from taskbalance.bench.benchmark import BenchConfig
    from taskbalance.bench.problem import Problem

#: The methods ``taskbalance bench`` runs by default, when they exist in the registry.
DEFAULT_METHODS: tuple[str, ...] = (
    "ew", "imtl_l", "imtl_g", "imtl", "emtl", "adatask",
    "uw", "dwa", "rlw", "mgda", "pcgrad", "cagrad", "famo", "nash_mtl",
)  # fmt: skip


def default_methods() -> list[MethodSpec]:
    """:data:`DEFAULT_METHODS` that are available now, as specs."""
    valid = set(available_methods())
    return [MethodSpec(m) for m in DEFAULT_METHODS if m in valid]


def all_methods() -> list[MethodSpec]:
    """Every available method as a spec (the full protocol's list): :data:`DEFAULT_METHODS`
    first, then the rest of the registry in alphabetical order.

    >>> [m.name for m in all_methods()][:3], len(all_methods()) == len(available_methods())
    (['ew', 'imtl_l', 'imtl_g'], True)
    """
    valid = available_methods()
    first = [m for m in DEFAULT_METHODS if m in valid]
    return [MethodSpec(m) for m in [*first, *sorted(set(valid) - set(first))]]


def paper_methods() -> list[MethodSpec]:
    """The paper-scale protocol's methods
    (:data:`taskbalance.bench.protocols.PAPER_METHODS`) that are available now, as specs.

    >>> [m.name for m in paper_methods()][:4]
    ['ew', 'imtl_l', 'imtl_g', 'imtl']
    """
    valid = set(available_methods())
    return [MethodSpec(m) for m in PAPER_METHODS if m in valid]


def run_name(config: RunConfig) -> str:
    """A run's name in the log and its checkpoint's file name: ``<label>-lr<lr>-seed<seed>``
    (characters other than letters, digits and ``_.=-`` in the label become ``_``).

    >>> run_name(RunConfig(tasks=("mu",), lr=3e-3, seed=1))
    'stl_mu-lr0.003-seed1'
    """
    label = re.sub(r"[^A-Za-z0-9_.=-]+", "_", config.label)
    return f"{label}-lr{config.lr:g}-seed{config.seed}"


def _common(config: BenchConfig) -> dict[str, Any]:
    return {
        "arch": config.arch,
        "model_options": dict(config.model_options),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "weight_decay": config.weight_decay,
        "device": config.device,
        "regression_loss": config.regression_loss,
    }


def _by_lr_then_seed(runs: list[RunConfig], lrs: Sequence[float]) -> list[RunConfig]:
    # Stable: within one (lr, seed), tasks or methods keep the order they were listed in.
    return sorted(runs, key=lambda r: (lrs.index(r.lr), r.seed))


def baseline_plan(
    config: BenchConfig,
    data: Problem,
    seeds: Sequence[int],
    lrs: Callable[[str], Sequence[float]],
) -> list[RunConfig]:
    """The single-task runs for ``seeds``, per lr (``lrs(label)``), per seed, per task."""
    runs = []
    for task in data.task_names:
        for lr in lrs(f"stl:{task}"):
            for seed in seeds:
                runs.append(RunConfig(tasks=(task,), lr=lr, seed=seed, **_common(config)))
    return _by_lr_then_seed(runs, config.lrs)


def method_plan(
    config: BenchConfig,
    seeds: Sequence[int],
    lrs: Callable[[str], Sequence[float]],
    references: Mapping[int, dict[str, float] | None],
) -> list[RunConfig]:
    """The method runs for ``seeds``, per lr (``lrs(label)``), per seed, in method order; each
    seed's runs select their epochs against ``references[seed]`` (see
    :attr:`RunConfig.reference`)."""
    runs = []
    for spec in config.methods:
        for lr in lrs(spec.label):
            for seed in seeds:
                runs.append(
                    RunConfig(
                        method=spec,
                        lr=lr,
                        seed=seed,
                        loss_scale=dict(config.loss_scale),
                        reference=references.get(seed),
                        **_common(config),
                    )
                )
    return _by_lr_then_seed(runs, config.lrs)


def choose_lrs(runs: Sequence[RunResult], seeds: Sequence[int] | None = None) -> dict[str, float]:
    """Per label, the learning rate whose validation criterion (at the selected epoch),
    averaged over the runs of ``seeds`` (default: every run), is lowest. Validation only: test
    values are never read. A diverged run counts as +inf.

    >>> def r(label, lr, crit, seed=0):
    ...     h = [{"criterion": crit, "epoch": 1}]
    ...     return RunResult({"lr": lr, "seed": seed}, label, [], h, 1, {}, {}, {}, 1.0, "ok",
    ...                      None, 0)
    >>> choose_lrs([r("ew", 1e-3, 0.5), r("ew", 1e-2, 0.4), r("ew", 1e-3, 0.1, seed=1)], [0])
    {'ew': 0.01}
    """
    by_label: dict[str, dict[float, list[RunResult]]] = {}
    for run in runs:
        if seeds is None or run.config["seed"] in seeds:
            by_label.setdefault(run.label, {}).setdefault(run.config["lr"], []).append(run)
    return {
        label: min(grid, key=lambda lr: statistics.fmean(_criterion(r) for r in grid[lr]))
        for label, grid in by_label.items()
    }


def select(runs: Sequence[RunResult], seeds: Sequence[int] | None = None) -> list[RunResult]:
    """Per label, every run at the learning rate :func:`choose_lrs` picks on ``seeds``.

    >>> def r(label, lr, crit):
    ...     h = [{"criterion": crit, "epoch": 1}]
    ...     return RunResult({"lr": lr, "seed": 0}, label, [], h, 1, {}, {}, {}, 1.0, "ok", None, 0)
    >>> [x.config["lr"] for x in select([r("ew", 1e-3, 0.5), r("ew", 1e-2, 0.4)])]
    [0.01]
    """
    chosen = choose_lrs(runs, seeds)
    return [run for run in runs if run.config["lr"] == chosen[run.label]]


def in_table_order(runs: Sequence[RunResult], methods: Sequence[MethodSpec]) -> list[RunResult]:
    """``runs`` ordered as the table lists them: single-task baselines first, then the methods
    in the order given (not the order they ran in, which follows the chosen learning rates),
    each by seed.

    >>> def r(label, seed):
    ...     return RunResult({"lr": 1e-3, "seed": seed}, label, [], [], 1, {}, {}, {}, 1.0, "ok",
    ...                      None, 0)
    >>> runs = [r("imtl", 0), r("ew", 1), r("stl:a", 0), r("ew", 0)]
    >>> [(x.label, x.config["seed"]) for x in in_table_order(runs, [MethodSpec("ew"),
    ...                                                              MethodSpec("imtl")])]
    [('stl:a', 0), ('ew', 0), ('ew', 1), ('imtl', 0)]
    """
    rank = {spec.label: i for i, spec in enumerate(methods)}
    return sorted(runs, key=lambda r: (rank.get(r.label, -1), r.config["seed"]))


def references(baselines: Sequence[RunResult]) -> dict[int, dict[str, float] | None]:
    """Per seed, the selected single-task runs' validation metrics ``{metric key: value}``: the
    reference of the methods' validation Delta m. ``None`` for a seed where a baseline has no
    selected epoch (it diverged): that seed's methods fall back to the mean validation loss."""
    out: dict[int, dict[str, float] | None] = {}
    for run in baselines:
        seed = run.config["seed"]
        if seed in out and out[seed] is None:
            continue
        out[seed] = None if not run.val_metrics else {**(out.get(seed) or {}), **run.val_metrics}
    return out


def config_from_dict(stored: dict[str, Any]) -> dict[str, Any]:
    """A :class:`RunConfig`'s keyword arguments from its :meth:`RunConfig.to_dict` form."""
    out = dict(stored)
    out["method"] = MethodSpec(stored["method"]["name"], dict(stored["method"]["options"]))
    out["tasks"] = None if stored["tasks"] is None else tuple(stored["tasks"])
    return out


def _criterion(run: RunResult) -> float:
    if run.best_epoch == 0:
        return float("inf")
    return run.history[run.best_epoch - 1]["criterion"]
