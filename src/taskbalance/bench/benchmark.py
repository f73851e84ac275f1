"""A whole benchmark: single-task baselines and every method, over seeds and a learning-rate grid.

:func:`run_benchmark` loads the dataset once and trains (:class:`taskbalance.bench.runner.Runner`)
with the same epochs, batch size, weight decay and architecture for all, in two stages:

1. the single-task baselines (one model per task): every learning rate of the grid on the grid
   seeds (``grid_seeds``: the first seeds, or all); per task, the rate with the lowest validation
   criterion averaged over those seeds is kept, and the remaining seeds train at that rate only;
2. each method, the same way. With ``selection="delta_m"`` every method run selects its epoch by
   the validation Delta m % against the selected baselines of its seed (their validation
   metrics at their selected epochs), so epochs and rates are chosen on the quantity the table
   reports; with ``"loss"``, by the mean validation loss.

The table reports the test metrics of the selected runs only. Checkpoints live in
``<out>/checkpoints/``; with ``resume``, finished runs are read back and interrupted ones
continue.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from taskbalance import __version__
from taskbalance.bench.data import load_dataset
from taskbalance.bench.data.types import MultiTaskData, split_indices
from taskbalance.bench.parallel import current_world
from taskbalance.bench.pool import train_in_workers
from taskbalance.bench.protocols import PAPER_METHODS
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


#: The epoch-selection rules of :attr:`BenchConfig.selection`.
SELECTIONS: tuple[str, ...] = ("delta_m", "loss")


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
    selection: str = "delta_m"
    """How each run picks its epoch: ``"delta_m"`` (the validation Delta m % against the
    single-task baselines of the same seed; the mean validation loss when there are none) or
    ``"loss"`` (the mean unscaled validation loss)."""
    grid_seeds: int | None = None
    """Run the learning-rate grid on the first this many seeds only and train the other seeds
    at each method's chosen rate (``None``: the grid on every seed)."""
    jobs: int = 1
    """Train this many runs of a stage at a time, in worker processes
    (:mod:`taskbalance.bench.pool`); the numbers are those of a serial run. Not under
    torch.distributed, where every rank must run the same plan in step."""
    keep_checkpoints: bool = False
    """Keep every finished run's model, optimizer and method state in its checkpoint; by
    default a finished run's checkpoint keeps only its result (enough for ``resume``)."""
    protocol: str = "custom"
    """The named protocol these settings came from (:mod:`taskbalance.bench.protocols`), for
    the report; ``"custom"`` when built by hand."""

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {self.jobs}")
        if self.grid_seeds is not None and self.grid_seeds < 1:
            raise ValueError(f"grid_seeds must be at least 1, got {self.grid_seeds}")


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
        data = dataclasses.replace(
            data,
            train=data.train.subset(keep.sort().values),
            description=f"{data.description} Trained on a seeded subset of "
            f"{config.train_size} of these {len(data.train)} training rows (data seed "
            f"{config.data_seed}).",
        )
    return data


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
    data: MultiTaskData,
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
    """Per seed, the selected single-task runs' validation metrics ``{task: value}``: the
    reference of the methods' validation Delta m. ``None`` for a seed where a baseline has no
    selected epoch (it diverged): that seed's methods fall back to the mean validation loss."""
    out: dict[int, dict[str, float] | None] = {}
    for run in baselines:
        seed = run.config["seed"]
        if seed in out and out[seed] is None:
            continue
        out[seed] = None if not run.val_metrics else {**(out.get(seed) or {}), **run.val_metrics}
    return out


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


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says.

    >>> isinstance(cpu_model(), str)
    True
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def setup_fields(
    config: BenchConfig, data: MultiTaskData, grid_seeds: Sequence[int], seconds: float
) -> dict[str, str]:
    """What produced a benchmark's numbers, as ``{field: text}`` in report order: the protocol,
    the split sizes actually trained and evaluated on, epochs, seeds, the lr grid, selection,
    model, the library, torch, machine, threads and the wall time. Fields with nothing to say
    (no loss scale, no model options, one process) are left out, never printed empty."""
    world = current_world()
    grid = ", ".join(f"{lr:g}" for lr in config.lrs)
    if len(config.lrs) > 1:
        grid += f" on seed(s) {list(grid_seeds)}, chosen per method on validation"
    fields = {
        "protocol": config.protocol,
        "data": data.name,
        "rows (train / val / test)": f"{len(data.train)} / {len(data.val)} / {len(data.test)}",
        "epochs": str(config.epochs),
        "batch size": str(config.batch_size),
        "seeds": ", ".join(map(str, config.seeds)),
        "learning rates": grid,
        "selection": (
            "validation Delta m % against the same seed's single-task baselines (which select "
            "by their validation loss)"
            if config.selection == "delta_m" and config.single_task
            else "mean validation loss over tasks"
        ),
        "weight decay": f"{config.weight_decay:g}",
        "architecture": config.arch,
        "model options": ", ".join(f"{k}={v}" for k, v in config.model_options.items()),
        "regression loss": config.regression_loss
        if any(t.kind == "regression" for t in data.tasks)
        else "",
        "loss scale": ", ".join(f"{k} x{v:g}" for k, v in config.loss_scale.items()),
        "taskbalance": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} CPU(s) visible",
        "device": config.device,
        "threads": str(torch.get_num_threads()),
        "processes": (
            f"{world.size} data-parallel ranks (DistributedDataParallel; each rank trains on "
            f"{config.batch_size // world.size} rows of every global batch; ms/step is rank 0's)"
            if world.distributed
            else ""
        ),
        "parallel runs": (
            f"{config.jobs} at a time (worker processes, {torch.get_num_threads()} thread(s) "
            "each; the runs' own ms/step were measured side by side)"
            if config.jobs > 1
            else ""
        ),
        "wall time": f"{seconds:.0f} s",
    }
    return {key: value for key, value in fields.items() if value}


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
    if world.distributed and config.jobs > 1:
        raise ValueError(
            f"jobs={config.jobs} under torch.distributed: every rank must train the same run "
            "at the same time; use jobs=1 (the ranks are the parallelism)"
        )
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
    if config.resume:
        folder = out / "checkpoints"
        found = len(list(folder.glob("*.pt")))
        echo(
            f"resuming from {found} run checkpoint(s) in {folder}"
            if found
            else f"--resume: no checkpoints in {folder} yet, every run starts"
        )
    grid_seeds = config.seeds[: config.grid_seeds or len(config.seeds)]
    later_seeds = config.seeds[len(grid_seeds) :]
    n_lrs = len(config.lrs)
    per_label = n_lrs * len(grid_seeds) + len(later_seeds)
    n_labels = len(config.methods) + (len(data.task_names) if config.single_task else 0)
    log_path = out / "train.log"
    results: list[RunResult] = []
    if world.main and not config.resume:
        log_path.write_text("", encoding="utf-8")
    # Append mode even for a new log: --jobs workers append to it too, and a writer at its own
    # offset would overwrite their lines.
    opened = (
        open(log_path, "a", encoding="utf-8")  # noqa: SIM115
        if world.main
        else contextlib.nullcontext(None)
    )
    with opened as log_file:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_labels * per_label, desc="runs", unit="run", dynamic_ncols=True)

        def log(line: str) -> None:
            if log_file is None:
                return
            log_file.write(line + "\n")
            log_file.flush()
            if verbose:
                (bar.write if bar is not None else echo)(line)

        def finished(run_config: RunConfig, result: RunResult) -> None:
            log(f"{run_name(run_config)}: best epoch {result.best_epoch}, "
                f"{result.step_ms:.2f} ms/step, {result.status}")  # fmt: skip
            if bar is not None:
                bar.update(1)

        def execute(configs: Sequence[RunConfig]) -> list[RunResult]:
            runs = [(c, out / "checkpoints" / f"{run_name(c)}.pt") for c in configs]
            options = {"resume": config.resume, "record_every": config.record_every,
                       "keep_final_state": config.keep_checkpoints}  # fmt: skip
            if config.jobs > 1 and len(runs) > 1:
                if bar is not None:
                    bar.set_postfix_str(f"{min(config.jobs, len(runs))} runs at a time")
                return train_in_workers(
                    data, runs, jobs=config.jobs, threads=torch.get_num_threads(),
                    log_path=log_path if log_file is not None else None, on_done=finished,
                    **options,
                )  # fmt: skip
            done = []
            for run_config, checkpoint in runs:
                if bar is not None:
                    bar.set_postfix_str(checkpoint.stem)
                runner = Runner(data, run_config, checkpoint=checkpoint, progress=progress,
                                log=log, **options)  # fmt: skip
                done.append(runner.run())
                finished(run_config, done[-1])
            return done

        def grid_then_chosen(
            make: Callable[[Sequence[int], Callable[[str], Sequence[float]]], list[RunConfig]],
        ) -> list[RunResult]:
            # The grid on the grid seeds; the other seeds at each label's chosen rate.
            runs = execute(make(grid_seeds, lambda _label: config.lrs))
            if later_seeds:
                chosen = choose_lrs(runs)
                runs += execute(make(later_seeds, lambda label: [chosen[label]]))
            return runs

        try:
            baselines: list[RunResult] = []
            if config.single_task:
                baselines = grid_then_chosen(lambda s, lrs: baseline_plan(config, data, s, lrs))
            use_delta_m = config.selection == "delta_m"
            refs = references(select(baselines, grid_seeds)) if use_delta_m else {}
            results = baselines + grid_then_chosen(lambda s, lrs: method_plan(config, s, lrs, refs))
        finally:
            if bar is not None:
                bar.close()
    selected = in_table_order(select(results, grid_seeds), config.methods)
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
    setup = setup_fields(config, data, grid_seeds, seconds)
    all_notes = [timed_note, *notes]
    if config.record_every > 0:
        all_notes.append(
            f"diagnostics sampled every {config.record_every} steps (diagnostics.csv): weights, "
            "EMTL's r_t where the step forms per-task gradient norms (not loss-level methods), "
            "AdaTask's AU shares"
        )
    files: dict[str, Path] = {}
    if world.main:
        files = write_outputs(
            out, data, rows, results, selected, command=command, notes=all_notes, setup=setup
        )
        files["log"] = log_path
    table = format_table(data, rows)
    return BenchResult(data, rows, results, selected, files, seconds, table)
