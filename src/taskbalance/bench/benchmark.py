"""A whole benchmark: single-task baselines and every method, over seeds and a learning-rate grid.

:func:`run_benchmark` loads the dataset once, then for every learning rate of the grid and every
seed trains the single-task baselines (one model per task) and each method
(:class:`taskbalance.bench.runner.Runner`), with the same epochs, batch size, weight decay and
architecture for all. Then, for each method (and for each task's single-task baseline) it keeps
the learning rate with the lowest validation criterion averaged over seeds; the table reports the
test metrics of those runs only. Checkpoints live in ``<out>/checkpoints/``; with ``resume``,
finished runs are read back and interrupted ones continue.

Fixed choices (documented in docs/benchmarks.md): the data split uses ``data_seed`` (0) for
every seed, so seeds vary the initialisation, the mini-batch order and the methods' own
randomness, not the split; ``train_size`` keeps a seeded subset of the training split.

Under torch.distributed (e.g. ``torchrun``), every rank runs the same plan in the same order
(each run data-parallel, see :mod:`taskbalance.bench.parallel`); only rank 0 prints, shows
progress bars and writes the log, checkpoints and outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from taskbalance.bench.data import load_dataset
from taskbalance.bench.data.types import MultiTaskData, split_indices
from taskbalance.bench.parallel import current_world
from taskbalance.bench.report import Row, format_table, summarize, write_outputs
from taskbalance.bench.runner import (
    MethodSpec,
    RunConfig,
    Runner,
    RunResult,
    available_methods,
    time_steps,
)

#: The methods ``taskbalance bench`` runs by default, when they exist in the registry.
DEFAULT_METHODS: tuple[str, ...] = (
    "ew", "imtl_l", "imtl_g", "imtl", "emtl", "adatask",
    "uw", "dwa", "rlw", "mgda", "pcgrad", "cagrad", "famo", "nash_mtl",
)  # fmt: skip


def default_methods() -> list[MethodSpec]:
    """:data:`DEFAULT_METHODS` that are available now, as specs."""
    valid = set(available_methods())
    return [MethodSpec(m) for m in DEFAULT_METHODS if m in valid]


@dataclass
class BenchConfig:
    """What a benchmark runs (see :func:`run_benchmark`).

    >>> BenchConfig(dataset="rf1").lrs
    [0.001]
    """

    dataset: str = "qm9"
    methods: list[MethodSpec] = field(default_factory=default_methods)
    arch: str = "hps"
    model_options: dict[str, int] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 256
    seeds: list[int] = field(default_factory=lambda: [0])
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    weight_decay: float = 0.0
    device: str = "cpu"
    loss_scale: dict[str, float] = field(default_factory=dict)
    regression_loss: str = "mse"
    train_size: int | None = None
    data_seed: int = 0
    data_options: dict[str, Any] = field(default_factory=dict)
    single_task: bool = True
    out_dir: str = "taskbalance-bench"
    resume: bool = False
    timing_rounds: int = 5
    timing_steps: int = 10
    record_every: int = 20
    """Sample the diagnostics (weights, ``r_t`` spread, AU shares) every this many steps; 0:
    off."""


@dataclass
class BenchResult:
    """The outcome: the table rows, every run, the selected runs, and the files written."""

    data: MultiTaskData
    rows: list[Row]
    runs: list[RunResult]
    selected: list[RunResult]
    files: dict[str, Path]
    seconds: float
    table: str


def load_bench_data(config: BenchConfig) -> MultiTaskData:
    """Load ``config.dataset`` with ``data_seed`` and keep ``train_size`` training rows."""
    options = dict(config.data_options)
    options.setdefault("seed", config.data_seed)
    if config.train_size is not None and config.dataset.startswith("multi_"):
        # The image sets build pairs on demand: ask for train + val pairs directly (90 / 10).
        options.setdefault("size", (config.train_size * 10 + 8) // 9)
    data = load_dataset(config.dataset, **options)
    if config.train_size is not None and config.train_size < len(data.train):
        (keep,) = split_indices(len(data.train), (config.train_size,), config.data_seed)
        data = dataclasses.replace(data, train=data.train.subset(keep.sort().values))
    return data


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)


def plan(config: BenchConfig, data: MultiTaskData) -> list[RunConfig]:
    """Every run of the benchmark, in order: per lr, per seed, single-task runs then methods."""
    common = {
        "arch": config.arch,
        "model_options": dict(config.model_options),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "weight_decay": config.weight_decay,
        "device": config.device,
        "regression_loss": config.regression_loss,
    }
    runs = []
    for lr in config.lrs:
        for seed in config.seeds:
            if config.single_task:
                for task in data.task_names:
                    runs.append(RunConfig(tasks=(task,), lr=lr, seed=seed, **common))
            for spec in config.methods:
                runs.append(
                    RunConfig(
                        method=spec, lr=lr, seed=seed, loss_scale=dict(config.loss_scale), **common
                    )
                )
    return runs


def select(runs: Sequence[RunResult]) -> list[RunResult]:
    """Per label, the runs at the learning rate whose validation criterion (the selected epoch's
    mean validation loss), averaged over seeds, is lowest. Validation only: test values are
    never read. A diverged run counts as +inf.

    >>> def r(label, lr, crit):
    ...     h = [{"criterion": crit, "epoch": 1}]
    ...     return RunResult({"lr": lr, "seed": 0}, label, [], h, 1, {}, {}, {}, 1.0, "ok", None, 0)
    >>> [x.config["lr"] for x in select([r("ew", 1e-3, 0.5), r("ew", 1e-2, 0.4)])]
    [0.01]
    """
    by_label: dict[str, dict[float, list[RunResult]]] = {}
    for run in runs:
        by_label.setdefault(run.label, {}).setdefault(run.config["lr"], []).append(run)
    chosen: list[RunResult] = []
    for grid in by_label.values():
        best = min(grid, key=lambda lr: statistics.fmean(_criterion(r) for r in grid[lr]))
        chosen.extend(grid[best])
    return chosen


def _fields(stored: dict[str, Any]) -> dict[str, Any]:
    """A :class:`RunConfig`'s keyword arguments from its :meth:`RunConfig.to_dict` form."""
    out = dict(stored)
    out["method"] = MethodSpec(stored["method"]["name"], dict(stored["method"]["options"]))
    out["tasks"] = None if stored["tasks"] is None else tuple(stored["tasks"])
    return out


def _criterion(run: RunResult) -> float:
    if run.best_epoch == 0:
        return float("inf")
    return run.history[run.best_epoch - 1]["criterion"]


def run_benchmark(
    config: BenchConfig,
    *,
    data: MultiTaskData | None = None,
    command: str = "taskbalance bench",
    progress: bool = True,
    echo: Callable[[str], None] = print,
    verbose: bool = False,
    notes: Sequence[str] = (),
) -> BenchResult:
    """Run the benchmark ``config`` and write its outputs to ``config.out_dir``.

    ``data`` replaces loading (tests pass a tiny dataset). ``echo`` prints status lines;
    per-epoch log lines go to ``<out>/train.log`` (and to ``echo`` when ``verbose``).
    Under several ranks only rank 0 echoes, shows progress and writes; the others return the
    same rows with no files.
    """
    began = time.perf_counter()
    world = current_world()
    if not world.main:
        echo, progress, verbose = (lambda _line: None), False, False
    out = Path(config.out_dir)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    if data is None:
        echo(f"loading {config.dataset} ...")
        data = load_bench_data(config)
    echo(f"{data.name}: {len(data.train)} / {len(data.val)} / {len(data.test)} train / val / "
         f"test, tasks {', '.join(data.task_names)}")  # fmt: skip
    configs = plan(config, data)
    log_path = out / "train.log"
    results: list[RunResult] = []
    opened = (
        open(log_path, "a" if config.resume else "w", encoding="utf-8")  # noqa: SIM115
        if world.main
        else contextlib.nullcontext(None)
    )
    with opened as log_file:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(configs), desc="runs", unit="run", dynamic_ncols=True)

        def log(line: str) -> None:
            if log_file is None:
                return
            log_file.write(line + "\n")
            log_file.flush()
            if verbose:
                (bar.write if bar is not None else echo)(line)

        try:
            for run_config in configs:
                name = f"{_file_label(run_config.label)}-lr{run_config.lr:g}-seed{run_config.seed}"
                if bar is not None:
                    bar.set_postfix_str(name)
                runner = Runner(
                    data, run_config, checkpoint=out / "checkpoints" / f"{name}.pt",
                    resume=config.resume, progress=progress, log=log,
                    record_every=config.record_every,
                )  # fmt: skip
                result = runner.run()
                results.append(result)
                summary = (
                    f"{name}: best epoch {result.best_epoch}, {result.step_ms:.2f} ms/step, "
                    f"{result.status}"
                )
                log(summary)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    selected = select(results)
    timing: dict[str, float] = {}
    timed_note = "step times: medians of each run's own training steps (no interleaved timing)"
    if config.timing_rounds > 0 and config.timing_steps > 0:
        first = min(config.seeds)
        timed = [RunConfig(**{**_fields(r.config), "epochs": 0}) for r in selected
                 if r.config["seed"] == first]  # fmt: skip
        echo(f"timing {len(timed)} configurations, interleaved ...")
        timing = time_steps(data, timed, config.timing_rounds, config.timing_steps)
        timed_note = (
            f"step times: {config.timing_rounds} interleaved rounds of {config.timing_steps} "
            f"steps per method on one batch of {config.batch_size}, after training (median)"
        )
    rows = summarize(data, selected, timing=timing)
    seconds = time.perf_counter() - began
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU(s) visible, torch {torch.__version__} "
        f"with {torch.get_num_threads()} thread(s), device {config.device}"
    )
    if world.distributed:
        machine += (
            f", {world.size} data-parallel ranks (DistributedDataParallel; each rank trains on "
            f"{config.batch_size // world.size} rows of every global batch of "
            f"{config.batch_size}; ms/step is rank 0's)"
        )
    all_notes = [
        f"wall time {seconds:.0f} s on {machine}",
        f"{len(config.seeds)} seed(s) {config.seeds}; epochs {config.epochs}; batch "
        f"{config.batch_size}; weight decay {config.weight_decay:g}; learning-rate grid "
        f"{config.lrs} (chosen per method on validation)",
        f"architecture {config.arch} {config.model_options or ''}; regression loss "
        f"{config.regression_loss}; loss scale {config.loss_scale or 'none'}",
        timed_note,
        *notes,
    ]
    if config.record_every > 0:
        all_notes.append(
            f"diagnostics sampled every {config.record_every} steps (diagnostics.csv): weights, "
            "EMTL's r_t where the step forms per-task gradient norms (not loss-level methods), "
            "AdaTask's AU shares"
        )
    files: dict[str, Path] = {}
    if world.main:
        files = write_outputs(out, data, rows, results, selected, command=command, notes=all_notes)
        files["log"] = log_path
    table = format_table(data, rows)
    return BenchResult(data, rows, results, selected, files, seconds, table)
