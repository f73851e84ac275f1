"""The ``taskbalance`` command: ``bench``, ``datasets``, ``methods``, ``quickstart``.

The benchmark modules (and their optional dependencies: pandas, scikit-learn, tqdm,
matplotlib) are imported only by the subcommands that need them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from taskbalance import __version__
from taskbalance.methods.registry import hyperparameters, list_methods, method_class

#: ``taskbalance methods``' row for the bench's pseudo-method (an optimizer, not a registry entry).
ADATASK_ROW = (
    "adatask", "task gradients", "parameter", "base='ew' (a loss-level method)",
    "Yang et al., AAAI 2023: the AdaTask Adam optimizer (bench pseudo-method; "
    "taskbalance.AdaTaskAdam in code)",
)  # fmt: skip


def _methods(_: argparse.Namespace) -> None:
    rows = [("name", "needs", "levels (default first)", "hyperparameters", "paper")]
    for name in list_methods():
        cls = method_class(name)
        options = ", ".join(
            f"{key}={value!r}"
            for key, value in hyperparameters(name).items()
            if key not in ("tasks", "level")
        )
        levels = sorted(cls.levels, key=lambda level: level != cls.default_level)
        rows.append((name, cls.requires.value, "/".join(levels) or "-", options or "-", cls.paper))
    rows.append(ADATASK_ROW)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        print("  ".join([*cells, row[4]]))


def _quickstart(args: argparse.Namespace) -> None:
    from taskbalance.bench.quickstart import run

    for method in args.methods:
        print(f"\n== {method} ==")
        run(method, steps=args.steps, every=args.every, seed=args.seed)


#: The lr grid of ``--tune`` (chosen per method on validation).
TUNE_GRID: tuple[float, ...] = (3e-3, 1e-3, 3e-4)

BENCH_EPILOG = """\
methods: registry names ('taskbalance methods' lists them) or the pseudo-method 'adatask'
  (EW with the AdaTask Adam optimizer; 'adatask:base=imtl_l' pairs it with another loss-level
  method). Hyperparameters: NAME:key=value,key=value, e.g. imtl_g:level=parameter or
  cagrad:c=0.4. Values are read as int, float, true/false, none, or strings. A method may be
  given several times with different hyperparameters.

protocols (--protocol; explicit options override any field):
  quick (default): QM9 (11 regression targets with very different difficulties; the descriptor
    model, not a graph network) on a 20,000-molecule training subset (other data sets: all
    training rows), 12 epochs, 1 seed, lr 1e-3 fixed, the single-task baselines and every
    default method: minutes on 2 CPU cores.
  full (also --full): every method in the registry, 20,000 training rows, 15 epochs, 3 seeds,
    the lr grid 3e-3, 1e-3 run on seed 0 (each method and baseline keeps its best rate for
    seeds 1 and 2): 0.5 to 1.6 hours per data set on 2 CPU cores.
  paper: the papers' data sizes. QM9: all 110,000 training molecules, 10,000 validation,
    10,831 test, 30 epochs; census_income: the whole training file (a seeded tenth held out
    for validation) and the whole test file, MMoE, 10 epochs; multi_mnist: 50,000 / 10,000 /
    10,000 pairs, 10 epochs. 3 seeds, grid 3e-3, 1e-3 on seed 0, the 5 seed methods and 11
    baselines (EW among them). Hours per data set on 2 CPU cores: run it in the background
    and continue it with --resume after an interruption.
  --tune: the lr grid 3e-3, 1e-3, 3e-4 for every method and baseline, chosen per method on
  validation.

selection: every run keeps the epoch with the best validation criterion, and every method and
  baseline the learning rate with the best criterion averaged over the grid seeds; the test
  split is read once, at the kept epoch. Criterion (--select): delta_m (default), the
  validation Delta m % against the single-task baselines of the same seed (which themselves
  select by validation loss); loss, the mean validation loss over tasks.

outputs (--out): results.csv, results.json, report.md, delta_m.png, relative_error.png (3+
  tasks), validation_curves.png, task_weights.png,
  rt_spread.png and au_shares.png (from diagnostics sampled every --record-every steps, written
  to diagnostics.csv), train.log, checkpoints/ (one per run, written after every epoch so
  that --resume continues an interrupted run; a finished run's keeps only its result unless
  --keep-checkpoints).

several processes: torchrun --nproc_per_node 2 $(which taskbalance) bench ... trains every run
  data-parallel (gloo on CPU, one GPU per rank with --device cuda): --batch-size stays the
  global batch, each rank trains on its equal share of every batch, the methods reduce over the
  ranks; only rank 0 prints and writes.
"""


def _method_spec(text: str):
    from taskbalance.bench.method_specs import parse_method_spec

    try:
        return parse_method_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _lr_grid(text: str) -> list[float]:
    return [_positive_float(part) for part in text.split(",") if part.strip()]


def _loss_scale(text: str) -> tuple[str, float]:
    task, eq, factor = text.partition("=")
    if not eq or not task:
        raise argparse.ArgumentTypeError(f"expected TASK=FACTOR (e.g. mu=10), got {text!r}")
    return task, _positive_float(factor)


def _missing_extra(error: ImportError) -> Callable[[argparse.Namespace], None]:
    def run(_: argparse.Namespace) -> None:
        raise SystemExit(
            f"taskbalance: this command needs the benchmark extras ({error}); "
            "pip install 'taskbalance[bench]'"
        )

    return run


def _add_problem_options(bench: argparse.ArgumentParser, choices: dict) -> None:
    """``taskbalance bench``'s options for what trains: the data set or problem, methods, model."""
    bench.add_argument(
        "--dataset",
        choices=choices["datasets"],
        default=None,
        metavar="NAME",
        help=f"one of: {', '.join(choices['datasets'])} (default {choices['default_dataset']})",
    )
    bench.add_argument(
        "--problem",
        nargs="+",
        default=None,
        metavar=("MODULE:FACTORY", "KEY=VALUE"),
        help="your own problem instead of --dataset: FACTORY(**{KEY: VALUE}) in the importable "
        "MODULE returns a taskbalance.bench.problem.Problem (data, model factory, per-task "
        "loss and metric; docs/problems.md)",
    )
    bench.add_argument(
        "--methods",
        nargs="+",
        type=_method_spec,
        default=None,
        metavar="SPEC",
        help="methods to compare, NAME or NAME:key=value,... (default: ew imtl_l "
        "imtl_g imtl emtl adatask uw dwa rlw mgda pcgrad cagrad famo nash_mtl, "
        "those that exist)",
    )
    bench.add_argument(
        "--arch",
        choices=choices["architectures"],
        default=None,
        help="hps (LeNet trunk for images, MLP shared bottom for tabular data), "
        "mmoe or ple (tabular data only); default hps (paper protocol on census_income: mmoe)",
    )
    bench.add_argument(
        "--hidden",
        type=_positive_int,
        default=None,
        help="width of the MLP bottom / of each expert (tabular; default 256 / 64)",
    )
    bench.add_argument(
        "--layers",
        type=_positive_int,
        default=None,
        help="depth of the MLP shared bottom (tabular hps; default 2)",
    )
    bench.add_argument(
        "--experts",
        type=_positive_int,
        default=None,
        help="number of shared experts (mmoe default 4, ple default 2)",
    )


def _add_selection_options(bench: argparse.ArgumentParser, choices: dict) -> None:
    """``taskbalance bench``'s options for the learning rates tried and how runs are selected."""
    bench.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="one learning rate for every run (default: quick 1e-3; full and paper a grid)",
    )
    bench.add_argument(
        "--lr-grid",
        type=_lr_grid,
        default=None,
        metavar="LR,LR,...",
        help="a learning-rate grid, the same for every method and baseline; each "
        "method keeps the lr with the best validation criterion (--select)",
    )
    bench.add_argument(
        "--grid-seeds",
        type=_positive_int,
        default=None,
        metavar="N",
        help="run the lr grid on the first N seeds only; the other seeds train at each "
        "method's chosen lr (default: every seed; full and paper 1)",
    )
    bench.add_argument(
        "--select",
        choices=choices["selections"],
        default="delta_m",
        help="the validation criterion that picks each run's epoch and each method's lr: "
        "delta_m (validation Delta m %% against the single-task baselines) or loss (mean "
        "validation loss); default delta_m",
    )
    bench.add_argument(
        "--tune",
        action="store_true",
        help=f"shorthand for --lr-grid {','.join(f'{v:g}' for v in TUNE_GRID)}",
    )


def _add_training_options(bench: argparse.ArgumentParser, choices: dict) -> None:
    """``taskbalance bench``'s options for how each run trains (the learning rates and the
    selection: :func:`_add_selection_options`)."""
    bench.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="epochs per run (default: the protocol's; quick 12, full 15, paper 10-30)",
    )
    bench.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help="number of seeds 0..N-1 (default: the protocol's; quick 1, full and paper 3)",
    )
    bench.add_argument("--batch-size", type=_positive_int, default=256, help="default 256")
    _add_selection_options(bench, choices)
    bench.add_argument("--weight-decay", type=float, default=0.0, help="Adam L2 (default 0)")
    bench.add_argument(
        "--train-size",
        type=_positive_int,
        default=None,
        help="keep a seeded subset of N training rows (default: the protocol's; quick 20000 "
        "of QM9, full 20000, paper all)",
    )
    bench.add_argument(
        "--loss-scale",
        type=_loss_scale,
        action="append",
        default=[],
        metavar="TASK=FACTOR",
        help="multiply TASK's loss by FACTOR (the IMTL paper's x10 experiment: "
        "e.g. --loss-scale mu=10); repeatable",
    )
    bench.add_argument(
        "--regression-loss",
        choices=("mse", "l1"),
        default="mse",
        help="loss on standardised regression targets (default mse)",
    )
    bench.add_argument(
        "--no-single-task", action="store_true", help="skip the single-task baselines (no Delta m)"
    )
    bench.add_argument("--device", default="cpu", help="torch device (default cpu)")
    bench.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default 1 on CPU: small models, shared cores)",
    )


def _add_run_options(bench: argparse.ArgumentParser, choices: dict) -> None:
    """``taskbalance bench``'s options for where the runs train and how they resume."""
    bench.add_argument(
        "--resume", action="store_true", help="continue from the checkpoints in the output folder"
    )
    bench.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="train N runs at a time in worker processes, each with --threads threads (the "
        "numbers equal a serial run's; e.g. --jobs 2 on 2 cores; default 1)",
    )
    bench.add_argument(
        "--executor",
        choices=choices["executors"],
        default="local",
        help="local (default: this process, or --jobs worker processes) or ray: every run a "
        "Ray task, on a local Ray instance or on the cluster at $RAY_ADDRESS, each with "
        "--threads CPUs (the numbers equal a serial run's; needs taskbalance[ray])",
    )
    bench.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each finished run's trained model, optimizer and method state in its "
        "checkpoint (default: a finished run's checkpoint keeps only its result, which is all "
        "--resume needs)",
    )


def _add_output_options(bench: argparse.ArgumentParser, choices: dict) -> None:
    """``taskbalance bench``'s options for files (data cache, outputs), timing, the protocol,
    where runs train and resume (:func:`_add_run_options`) and the console."""
    bench.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder (default ./taskbalance-bench/<dataset>)",
    )
    bench.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="dataset cache (default $TASKBALANCE_CACHE or ~/.cache/taskbalance)",
    )
    bench.add_argument(
        "--data-root",
        default=None,
        metavar="DIR",
        help="a folder with the raw dataset files, instead of fetching them",
    )
    bench.add_argument(
        "--timing-rounds",
        type=int,
        default=5,
        metavar="N",
        help="after training, time every method in N interleaved rounds of 10 steps (robust "
        "to a machine whose load drifts); 0: report each run's own median step (default 5)",
    )
    bench.add_argument(
        "--record-every",
        type=int,
        default=20,
        metavar="K",
        help="sample the diagnostics (weights, r_t spread, AU shares) every K training steps "
        "for diagnostics.csv, rt_spread.png, au_shares.png; 0: off (default 20)",
    )
    bench.add_argument(
        "--protocol",
        choices=choices["protocols"],
        default="quick",
        help="quick (default), full or paper: data size, epochs, seeds, lr grid and methods "
        "(see below; explicit options override)",
    )
    bench.add_argument(
        "--full",
        action="store_true",
        help="shorthand for --protocol full: every method, 20000 training rows, 15 epochs, "
        "3 seeds, lr grid 3e-3,1e-3 on seed 0",
    )
    _add_run_options(bench, choices)
    bench.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print the per-epoch log lines (always written to train.log)",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_bench(commands: argparse._SubParsersAction) -> None:
    try:
        from taskbalance.bench.benchmark import SELECTIONS
        from taskbalance.bench.data import DATASETS
        from taskbalance.bench.executor import EXECUTORS
        from taskbalance.bench.models import ARCHITECTURES
        from taskbalance.bench.protocols import DEFAULT_DATASET, PROTOCOLS
    except ImportError as error:  # pandas and friends: the optional [bench] extra
        stub = commands.add_parser("bench", help="benchmark methods (needs taskbalance[bench])")
        stub.set_defaults(run=_missing_extra(error))
        return

    bench = commands.add_parser(
        "bench",
        help="benchmark methods on real data: table of per-task metrics, Delta m %%, time/step",
        description="Train the single-task baselines and each method on a real multi-task "
        "dataset under one protocol (same epochs, batch, lr grid for all; selection on the "
        "validation split) and print a paper-style table.",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    choices = {"datasets": DATASETS, "architectures": ARCHITECTURES, "selections": SELECTIONS,
               "protocols": PROTOCOLS, "default_dataset": DEFAULT_DATASET,
               "executors": EXECUTORS}  # fmt: skip
    _add_problem_options(bench, choices)
    _add_training_options(bench, choices)
    _add_output_options(bench, choices)
    bench.set_defaults(run=_bench)  # fmt: skip


def bench_config(args: argparse.Namespace):
    """The :class:`~taskbalance.bench.benchmark.BenchConfig` that ``args`` describe: the
    protocol's settings (:func:`taskbalance.bench.protocols.protocol`), each overridden by the
    options given explicitly."""
    from taskbalance.bench.benchmark import BenchConfig
    from taskbalance.bench.plan import all_methods, default_methods, paper_methods
    from taskbalance.bench.protocols import DEFAULT_DATASET, protocol

    dataset = args.dataset or DEFAULT_DATASET
    entry, problem_args = _problem_option(args)
    preset = protocol("full" if args.full else args.protocol, "problem" if entry else dataset)
    if args.lr_grid is not None:
        lrs = list(args.lr_grid)
    elif args.tune:
        lrs = list(TUNE_GRID)
    elif args.lr is not None:
        lrs = [args.lr]
    else:
        lrs = list(preset.lrs)
    model_options = {
        key: value
        for key, value in (
            ("hidden", args.hidden),
            ("layers", args.layers),
            ("experts", args.experts),
        )
        if value is not None
    }
    data_options = dict(preset.data_options)
    if args.cache_dir is not None:
        data_options["cache_dir"] = args.cache_dir
    if args.data_root is not None:
        data_options["root"] = args.data_root
    methods = {"default": default_methods, "all": all_methods, "paper": paper_methods}
    name = entry.rpartition(":")[2] if entry else dataset
    return BenchConfig(
        dataset=dataset,
        problem=entry,
        problem_args=problem_args,
        methods=list(args.methods or methods[preset.methods]()),
        arch=args.arch or preset.arch or "hps",
        model_options=model_options,
        epochs=args.epochs or preset.epochs,
        batch_size=args.batch_size,
        seeds=list(range(args.seeds or preset.seeds)),
        lrs=lrs,
        weight_decay=args.weight_decay,
        device=args.device,
        loss_scale=dict(args.loss_scale),
        regression_loss=args.regression_loss,
        train_size=args.train_size if args.train_size is not None else preset.train_size,
        data_options=data_options,
        single_task=not args.no_single_task,
        out_dir=args.out or str(Path("taskbalance-bench") / name),
        threads=args.threads,
        resume=args.resume,
        keep_checkpoints=args.keep_checkpoints,
        jobs=args.jobs,
        executor=args.executor,
        timing_rounds=max(args.timing_rounds, 0),
        record_every=max(args.record_every, 0),
        selection=args.select,
        grid_seeds=args.grid_seeds or preset.grid_seeds,
        protocol=preset.name,
    )


#: Options that describe a built-in data set's model or files: no meaning with --problem.
BUILTIN_ONLY = ("dataset", "arch", "hidden", "layers", "experts", "data_root", "cache_dir")


def _problem_option(args: argparse.Namespace) -> tuple[str | None, dict]:
    """``--problem MODULE:FACTORY KEY=VALUE ...`` as ``(entry, arguments)``; one-line errors
    for malformed arguments and for options that only a built-in data set takes."""
    from taskbalance.bench.problem import parse_arguments

    if not args.problem:
        return None, {}
    given = [f"--{o.replace('_', '-')}" for o in BUILTIN_ONLY if getattr(args, o) is not None]
    if given:
        raise SystemExit(
            f"taskbalance bench: {', '.join(given)} describe(s) a built-in data set; --problem "
            "brings its own data and model"
        )
    entry, *items = args.problem
    try:
        return entry, parse_arguments(items)
    except ValueError as error:
        raise SystemExit(f"taskbalance bench: --problem {entry}: {error}") from None


def _check_out(out: str) -> None:
    """Refuse an output folder that is an existing file, before anything loads."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"taskbalance bench: --out {out} is an existing file; give a folder")


def _bench(args: argparse.Namespace) -> None:
    from taskbalance.bench.parallel import init_from_env

    # Under torchrun (WORLD_SIZE > 1) the process group is ours to create and to destroy.
    initialised = init_from_env(args.device)
    try:
        _bench_in_world(args)
    finally:
        if initialised:
            import torch.distributed as dist

            dist.destroy_process_group()


def _bench_in_world(args: argparse.Namespace) -> None:
    import dataclasses

    from taskbalance.bench.determinism import make_deterministic
    from taskbalance.bench.parallel import current_world, local_device

    world = current_world()
    say = print if world.main else (lambda *_args, **_kw: None)
    try:
        config = bench_config(args)
    except ValueError as error:  # options that do not go together (--jobs with --executor ray)
        raise SystemExit(f"taskbalance bench: {error}") from None
    _check_out(config.out_dir)
    if world.distributed and (config.jobs > 1 or config.executor != "local"):
        raise SystemExit(
            "taskbalance bench: --jobs and --executor train runs side by side; under torchrun "
            "the ranks already share each run: drop them"
        )
    if config.executor == "ray":
        from taskbalance.bench.ray_executor import import_ray

        try:
            import_ray()
        except ImportError as error:
            raise SystemExit(f"taskbalance bench: --executor ray: {error}") from None
    config = dataclasses.replace(config, device=local_device(config.device, world))
    make_deterministic(config.device, args.threads)
    problem = _load_checked(config, world)
    notes = []
    if len(config.lrs) == 1:
        notes.append(
            f"fixed learning rate {config.lrs[0]:g} for every method (no grid; --tune or "
            "--lr-grid gives every method the same small grid, chosen on validation)"
        )
    say(f"methods: {', '.join(m.label for m in config.methods)}")
    result = _run(config, problem, args, world, notes)
    say()
    say(result.table)
    say()
    for note in notes:
        say(note)
    say(f"finished in {result.seconds:.0f} s; written:")
    for kind, path in result.files.items():
        say(f"  {kind:18s} {path}")


def _load_checked(config, world):
    """The problem, loaded (rank 0 first: it fetches into the cache while the others wait)
    and checked before anything trains: the loss-scale tasks, the model, the methods."""
    from taskbalance.bench.benchmark import load_bench_problem
    from taskbalance.bench.data import ChecksumError, FetchError
    from taskbalance.bench.parallel import barrier
    from taskbalance.bench.runner import check_setup

    try:
        if not world.main:
            barrier(world)
        problem = load_bench_problem(config)
        if world.main:
            barrier(world)
        check_setup(problem, config.methods, config.loss_scale, config.seeds[0])
    except (FetchError, ChecksumError, ValueError) as error:
        raise SystemExit(f"taskbalance bench: {error}") from None
    return problem


def _run(config, problem, args, world, notes):
    import shlex

    from taskbalance.bench.benchmark import run_benchmark
    from taskbalance.bench.checkpoints import CheckpointMismatchError

    launcher = (
        f"torchrun --nproc_per_node {world.size} $(which taskbalance)"
        if world.distributed
        else "taskbalance"
    )
    command = f"{launcher} {shlex.join(args.argv)}"
    try:
        return run_benchmark(
            config, data=problem, command=command.strip(), progress=not args.no_progress,
            verbose=args.verbose, notes=notes,
        )  # fmt: skip
    except CheckpointMismatchError as error:
        raise SystemExit(
            f"taskbalance bench: {error}; resume with the options that wrote it, or use "
            "another --out"
        ) from None


def _datasets(args: argparse.Namespace) -> None:
    from taskbalance.bench.data import CARRIERS, DATASETS, cache_root

    carriers = {
        "multi_mnist": ("mnist",), "multi_fashion": ("fashion_mnist",),
        "multi_fashion_mnist": ("mnist", "fashion_mnist"), "census_income": ("census_income",),
        "qm9": ("qm9",), "movielens": ("widedeep",), "rf1": ("widedeep",),
    }  # fmt: skip
    root = cache_root(args.cache_dir)
    print(f"cache: {root}")
    rows = [("name", "cached", "carrier (registry package==version, MB)")]
    for name in DATASETS:
        keys = carriers.get(name, ())
        cached = bool(keys) and all((root / CARRIERS[k].filename).exists() for k in keys)
        where = "; ".join(
            f"{CARRIERS[k].manager} {CARRIERS[k].package}=={CARRIERS[k].version} "
            f"({CARRIERS[k].approx_mb})"
            for k in keys
        )
        rows.append((name, "yes" if cached else "no", where or "?"))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for row in rows:
        print(f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}")


def _compare(args: argparse.Namespace) -> None:
    from taskbalance.bench.compare import compare_delta_m, differences, load_result, table_rows

    try:
        base, other = load_result(args.base), load_result(args.other)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"taskbalance compare: {error}") from None
    print(compare_delta_m(table_rows(base), table_rows(other), args.names))
    for line in differences(base, other, args.names):
        print(line)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block): the bad option or value,
    what is valid, and where the options are listed."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ('{self.prog} --help' lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``taskbalance`` command."""
    parser = _Parser(prog="taskbalance", description="Multi-task optimisation for PyTorch.")
    parser.add_argument("--version", action="version", version=f"taskbalance {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    listing = commands.add_parser("methods", help="list the methods with level, needs, paper")
    listing.set_defaults(run=_methods)
    _add_bench(commands)
    datasets = commands.add_parser(
        "datasets", help="list the benchmark datasets and whether their archives are cached"
    )
    datasets.add_argument("--cache-dir", default=None, metavar="DIR", help="the cache to look in")
    datasets.set_defaults(run=_datasets)
    compare = commands.add_parser(
        "compare",
        help="Delta m of two benchmark runs side by side (e.g. the x10 loss-scale experiment)",
        description="Print a Markdown table of each method's Delta m % in two 'taskbalance "
        "bench' results (a results.json or its folder), the change of the mean, and whether "
        "it exceeds the two runs' spreads over seeds.",
    )
    compare.add_argument("base", help="the reference run (results.json or its folder)")
    compare.add_argument("other", help="the run to compare (results.json or its folder)")
    compare.add_argument(
        "--names",
        nargs=2,
        default=("as is", "other"),
        metavar=("BASE", "OTHER"),
        help="column names of the two runs (default: 'as is' 'other')",
    )
    compare.set_defaults(run=_compare)
    quick = commands.add_parser(
        "quickstart",
        help="train a small multi-task model on real data (Linnerud) and print losses, weights",
    )
    quick.add_argument(
        "--methods",
        nargs="+",
        default=["ew", "imtl"],
        choices=list_methods(),
        metavar="NAME",
        help="methods to train one after the other (default: ew imtl); any name that "
        "'taskbalance methods' lists",
    )
    quick.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    quick.add_argument("--every", type=int, default=100, help="print every N steps (default 100)")
    quick.add_argument("--seed", type=int, default=0)
    quick.set_defaults(run=_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``taskbalance`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
