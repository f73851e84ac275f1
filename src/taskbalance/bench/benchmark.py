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

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch.utils.data import Subset

from taskbalance import __version__
from taskbalance.bench import executor
from taskbalance.bench.builtin import builtin_problem
from taskbalance.bench.data import load_dataset
from taskbalance.bench.data.types import MultiTaskData, split_indices
from taskbalance.bench.determinism import make_deterministic
from taskbalance.bench.method_specs import MethodSpec
from taskbalance.bench.parallel import current_world
from taskbalance.bench.plan import (
    baseline_plan,
    choose_lrs,
    config_from_dict,
    default_methods,
    in_table_order,
    method_plan,
    references,
    run_name,
    select,
)
from taskbalance.bench.problem import Problem, TensorData, load_problem
from taskbalance.bench.report import Row, format_table, summarize, write_outputs
from taskbalance.bench.run_config import RunConfig, RunResult
from taskbalance.bench.runner import time_steps

#: The epoch-selection rules of :attr:`BenchConfig.selection`.
SELECTIONS: tuple[str, ...] = ("delta_m", "loss")


@dataclass
class BenchConfig:
    """What a benchmark runs (see :func:`run_benchmark`).

    >>> BenchConfig(dataset="rf1").lrs
    [0.001]
    """

    dataset: str = "qm9"
    problem: str | None = None
    """A ``module:factory`` entry point making the :class:`~taskbalance.bench.problem.Problem`
    to train instead of ``dataset`` (``arch``, ``model_options``, ``regression_loss`` and
    ``data_options`` then do not apply: the problem brings its model, losses and data)."""
    problem_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the ``problem`` factory."""
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
    executor: str = "local"
    """Where the runs train (:data:`taskbalance.bench.executor.EXECUTORS`): ``"local"`` (in
    this process, or ``jobs`` worker processes) or ``"ray"`` (each run a Ray task on a local
    Ray instance, or on the cluster at ``RAY_ADDRESS``: :mod:`taskbalance.bench.ray_executor`;
    the numbers are those of a serial run)."""
    keep_checkpoints: bool = False
    """Keep every finished run's model, optimizer and method state in its checkpoint; by
    default a finished run's checkpoint keeps only its result (enough for ``resume``)."""
    threads: int | None = None
    """torch's CPU threads, set by :func:`run_benchmark` (default: 1 on CPU, the CLI's policy:
    small models on shared cores; see :func:`taskbalance.bench.determinism.make_deterministic`)."""
    protocol: str = "custom"
    """The named protocol these settings came from (:mod:`taskbalance.bench.protocols`), for
    the report; ``"custom"`` when built by hand."""

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {self.jobs}")
        if self.executor not in executor.EXECUTORS:
            raise ValueError(f"executor must be one of {executor.EXECUTORS}, got {self.executor!r}")
        if self.executor == "ray" and self.jobs > 1:
            raise ValueError(
                f"jobs={self.jobs} with the Ray executor: Ray schedules the runs on its CPUs "
                "itself; jobs is for the local executor"
            )
        if self.grid_seeds is not None and self.grid_seeds < 1:
            raise ValueError(f"grid_seeds must be at least 1, got {self.grid_seeds}")


@dataclass
class BenchResult:
    """The outcome: the table rows, every run, the selected runs, and the files written."""

    data: Problem
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


def load_bench_problem(config: BenchConfig) -> Problem:
    """The problem ``config`` describes: ``config.problem``'s (its training split cut to a
    seeded subset of ``train_size`` rows when smaller), or the built-in ``config.dataset``
    (:func:`load_bench_data`) with ``config.arch``. Errors of an entry point are one line
    (:func:`taskbalance.bench.problem.load_problem`)."""
    if config.problem is None:
        data = load_bench_data(config)
        return builtin_problem(data, config.arch, config.model_options, config.regression_loss)
    problem = load_problem(config.problem, config.problem_args)
    if config.train_size is None or problem.multi_input:
        return problem
    n = len(problem.train)  # type: ignore[arg-type]
    if config.train_size >= n:
        return problem
    (keep,) = split_indices(n, (config.train_size,), config.data_seed)
    return dataclasses.replace(problem, train=subset(problem.train, keep.sort().values),
                               fingerprint=None if problem.fingerprint is None else
                               f"{problem.fingerprint}-train{config.train_size}")  # fmt: skip


def subset(dataset: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` of ``dataset``: a :class:`TensorData` of them, or a ``Subset``.

    >>> subset(TensorData(torch.arange(4.0), {"y": torch.arange(4)}), torch.tensor([1, 3]))[1]
    (tensor(3.), {'y': tensor(3)})
    """
    if isinstance(dataset, TensorData):
        return TensorData(*dataset.batch(index))
    return Subset(dataset, index.tolist())


def rows_text(problem: Problem) -> str:
    """The split sizes for reports: ``train / val / test``, per task when multi-input.

    >>> d = TensorData(torch.zeros(3, 1), {"y": torch.zeros(3)})
    >>> rows_text(Problem("p", (), d, d, d, model=print))
    '3 / 3 / 3'
    """
    sizes = [problem.sizes(s) for s in ("train", "val", "test")]
    if not problem.multi_input:
        return " / ".join(str(len(problem.split(s))) for s in ("train", "val", "test"))
    return "; ".join(
        f"{t} " + " / ".join(str(size[t]) for size in sizes) for t in problem.task_names
    )


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
    config: BenchConfig, data: Problem, grid_seeds: Sequence[int], seconds: float
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
        "rows (train / val / test)": rows_text(data),
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
        "architecture": config.arch if config.problem is None else f"{config.problem}'s model",
        "model options": ", ".join(f"{k}={v}" for k, v in config.model_options.items()),
        "problem arguments": ", ".join(f"{k}={v}" for k, v in config.problem_args.items()),
        "regression loss": config.regression_loss
        if config.problem is None and any(t.metric_name == "mae" for t in data.tasks)
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
        "parallel runs": _parallel_runs(config),
        "wall time": f"{seconds:.0f} s",
    }
    return {key: value for key, value in fields.items() if value}


def _parallel_runs(config: BenchConfig) -> str:
    """The report's "parallel runs" field: how many runs trained side by side, and where."""
    side_by_side = (f"{torch.get_num_threads()} thread(s) each; the runs' own ms/step were "
                    "measured side by side")  # fmt: skip
    if config.executor == "ray":
        from taskbalance.bench.ray_executor import describe_cluster

        return f"Ray tasks on {describe_cluster()} ({side_by_side})"
    return f"{config.jobs} at a time (worker processes, {side_by_side})" if config.jobs > 1 else ""


class _Session:
    """The benchmark's console and log: status lines, the runs bar and ``train.log``."""

    def __init__(self, out: Path, log_file: IO[str] | None, echo: Callable[[str], None],
                 verbose: bool, total: int, progress: bool) -> None:  # fmt: skip
        self.out, self.log_file, self.echo, self.verbose = out, log_file, echo, verbose
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="runs", unit="run", dynamic_ncols=True)

    def log(self, line: str) -> None:
        """One line into train.log (and onto the console when verbose)."""
        if self.log_file is None:
            return
        self.log_file.write(line + "\n")
        self.log_file.flush()
        if self.verbose:
            (self.bar.write if self.bar is not None else self.echo)(line)

    def started(self, checkpoint: Path | None) -> None:
        """Show which run trains now."""
        if self.bar is not None and checkpoint is not None:
            self.bar.set_postfix_str(checkpoint.stem)

    def finished(self, config: RunConfig, result: RunResult) -> None:
        """Log a finished run and advance the bar."""
        self.log(f"{run_name(config)}: best epoch {result.best_epoch}, "
                 f"{result.step_ms:.2f} ms/step, {result.status}")  # fmt: skip
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


def _as_problem(config: BenchConfig, data: Problem | MultiTaskData | None) -> Problem:
    if isinstance(data, Problem):
        return data
    if isinstance(data, MultiTaskData):
        return builtin_problem(data, config.arch, config.model_options, config.regression_loss)
    return load_bench_problem(config)


def _train_all(
    config: BenchConfig, problem: Problem, session: _Session, progress: bool
) -> list[RunResult]:
    """Both stages (baselines, then methods), each on the grid seeds then the later seeds."""
    grid_seeds = config.seeds[: config.grid_seeds or len(config.seeds)]
    later_seeds = config.seeds[len(grid_seeds) :]
    log_path = session.out / "train.log" if session.log_file is not None else None
    stage = executor.Stage(
        problem,
        {"resume": config.resume, "record_every": config.record_every,
         "keep_final_state": config.keep_checkpoints},
        log=session.log, on_start=session.started, on_done=session.finished, progress=progress,
    )  # fmt: skip

    def execute(configs: Sequence[RunConfig]) -> list[RunResult]:
        runs = [(c, session.out / "checkpoints" / f"{run_name(c)}.pt") for c in configs]
        if session.bar is not None and config.executor == "ray":
            session.bar.set_postfix_str(f"{len(runs)} runs on Ray")
        elif session.bar is not None and config.jobs > 1 and len(runs) > 1:
            session.bar.set_postfix_str(f"{min(config.jobs, len(runs))} runs at a time")
        return executor.execute(stage, runs, executor=config.executor, jobs=config.jobs,
                                threads=torch.get_num_threads(), log_path=log_path)  # fmt: skip

    def grid_then_chosen(make: Callable[..., list[RunConfig]]) -> list[RunResult]:
        runs = execute(make(grid_seeds, lambda _label: config.lrs))
        if later_seeds:
            chosen = choose_lrs(runs)
            runs += execute(make(later_seeds, lambda label: [chosen[label]]))
        return runs

    baselines: list[RunResult] = []
    if config.single_task:
        baselines = grid_then_chosen(lambda s, lrs: baseline_plan(config, problem, s, lrs))
    refs = references(select(baselines, grid_seeds)) if config.selection == "delta_m" else {}
    return baselines + grid_then_chosen(lambda s, lrs: method_plan(config, s, lrs, refs))


def _timing(
    config: BenchConfig, problem: Problem, selected: Sequence[RunResult], echo: Callable
) -> tuple[dict[str, float], str]:
    """Interleaved step times of the selected runs' configs (first seed), and the note."""
    if config.timing_rounds <= 0 or config.timing_steps <= 0:
        return {}, "step times: medians of each run's own training steps (no interleaved timing)"
    first = min(config.seeds)
    timed = [RunConfig(**{**config_from_dict(r.config), "epochs": 0}) for r in selected
             if r.config["seed"] == first]  # fmt: skip
    echo(f"timing {len(timed)} configurations, interleaved ...")
    timing = time_steps(problem, timed, config.timing_rounds, config.timing_steps)
    return timing, (
        f"step times: {config.timing_rounds} interleaved rounds of {config.timing_steps} "
        f"steps per method on one batch of {config.batch_size}, after training (median)"
    )


def resume_line(folder: Path) -> str:
    """What ``--resume`` finds in the checkpoint ``folder``, in one line.

    >>> resume_line(Path("/nowhere"))
    '--resume: no checkpoints in /nowhere yet, every run starts'
    """
    found = len(list(folder.glob("*.pt")))
    if found:
        return f"resuming from {found} run checkpoint(s) in {folder}"
    return f"--resume: no checkpoints in {folder} yet, every run starts"


def _diagnostics_note(every: int) -> str:
    """The report's note on the diagnostics sampled every ``every`` steps."""
    return (
        f"diagnostics sampled every {every} steps (diagnostics.csv): weights, EMTL's r_t where "
        "the step forms per-task gradient norms (not loss-level methods), AdaTask's AU shares"
    )


def python_command(config: BenchConfig) -> str:
    """How a benchmark started from Python is named in its report's ``Command:`` line.

    >>> python_command(BenchConfig(dataset="rf1", out_dir="out"))
    "Python: run_benchmark(BenchConfig(dataset='rf1', ...), out_dir='out')"
    """
    what = f"problem={config.problem!r}" if config.problem else f"dataset={config.dataset!r}"
    return f"Python: run_benchmark(BenchConfig({what}, ...), out_dir={config.out_dir!r})"


def run_benchmark(
    config: BenchConfig,
    *,
    data: Problem | MultiTaskData | None = None,
    command: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    verbose: bool = False,
    notes: Sequence[str] = (),
) -> BenchResult:
    """Run the benchmark ``config`` and write its outputs to ``config.out_dir``.

    ``data`` replaces loading: a :class:`~taskbalance.bench.problem.Problem`, or a built-in
    :class:`~taskbalance.bench.data.types.MultiTaskData` (tests pass a tiny one). ``command``
    is the report's ``Command:`` line (default: :func:`python_command`). Sets torch's CPU
    threads to ``config.threads`` (default 1 on CPU, as the CLI) and deterministic algorithms.
    ``echo`` prints status lines; per-epoch log lines go to ``<out>/train.log`` (and to
    ``echo`` when ``verbose``). Under several ranks only rank 0 echoes, shows progress and
    writes; the others return the same rows with no files.
    """
    began = time.perf_counter()
    world = current_world()
    if world.distributed and (config.jobs > 1 or config.executor != "local"):
        raise ValueError(
            f"jobs={config.jobs}, executor={config.executor!r} under torch.distributed: every "
            "rank must train the same run at the same time; use jobs=1 and the local executor "
            "(the ranks are the parallelism)"
        )
    if config.executor == "ray":
        from taskbalance.bench.ray_executor import import_ray

        import_ray()  # a missing extra is one line, before anything loads or trains
    make_deterministic(config.device, config.threads)
    if not world.main:
        echo, progress, verbose = (lambda _line: None), False, False
    out = Path(config.out_dir)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    if data is None:
        echo(f"loading {config.problem or config.dataset} ...")
    problem = _as_problem(config, data)
    echo(f"{problem.name}: {rows_text(problem)} train / val / test, tasks "
         f"{', '.join(problem.task_names)}")  # fmt: skip
    if config.resume:
        echo(resume_line(out / "checkpoints"))
    grid_seeds = config.seeds[: config.grid_seeds or len(config.seeds)]
    per_label = len(config.lrs) * len(grid_seeds) + len(config.seeds) - len(grid_seeds)
    n_labels = len(config.methods) + (len(problem.task_names) if config.single_task else 0)
    log_path = out / "train.log"
    if world.main and not config.resume:
        log_path.write_text("", encoding="utf-8")
    # Append mode even for a new log: --jobs workers append to it too, and a writer at its own
    # offset would overwrite their lines.
    log_file = open(log_path, "a", encoding="utf-8") if world.main else None  # noqa: SIM115
    session = _Session(out, log_file, echo, verbose, n_labels * per_label, progress)
    try:
        results = _train_all(config, problem, session, progress)
    finally:
        session.close()
        if log_file is not None:
            log_file.close()
    selected = in_table_order(select(results, grid_seeds), config.methods)
    timing, timed_note = _timing(config, problem, selected, echo)
    rows = summarize(problem, selected, timing=timing)
    seconds = time.perf_counter() - began
    all_notes = [timed_note, *notes]
    if config.record_every > 0:
        all_notes.append(_diagnostics_note(config.record_every))
    files: dict[str, Path] = {}
    if world.main:
        setup = setup_fields(config, problem, grid_seeds, seconds)
        files = write_outputs(out, problem, rows, results, selected,
                              command=command or python_command(config), notes=all_notes,
                              setup=setup)  # fmt: skip
        files["log"] = log_path
    table = format_table(problem, rows)
    return BenchResult(problem, rows, results, selected, files, seconds, table)
