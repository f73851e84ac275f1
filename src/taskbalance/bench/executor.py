"""Executors: how the independent runs of one benchmark stage get trained.

The runs of a stage (:mod:`taskbalance.bench.plan`) do not depend on each other: each is
seeded by its own config, builds its own model and reads and writes its own checkpoint. An
executor trains a list of ``(config, checkpoint)`` pairs and returns their results in the
order given, so every executor gives the same numbers, table and files:

* ``"serial"``: one run after the other in this process (the default; under ``torchrun``
  every rank trains the same run at the same time, data-parallel);
* ``"jobs"``: ``jobs`` runs at a time in spawned worker processes on this machine
  (:mod:`taskbalance.bench.pool`, no extra dependency);
* ``"ray"``: every run a Ray task, on a local Ray instance or the cluster at ``RAY_ADDRESS``
  (:mod:`taskbalance.bench.ray_executor`, the optional extra ``taskbalance[ray]``).

:func:`execute` picks one from :data:`EXECUTORS` and ``jobs``. ``on_done(config, result)`` is
called in this process as each run finishes; a run that fails stops the stage and its error
names the run's config, while the finished runs keep their checkpoints (``--resume`` reads them
back, whatever executor wrote them).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskbalance.bench.checkpoints import CheckpointMismatchError
from taskbalance.bench.pool import train_in_workers
from taskbalance.bench.problem import Problem
from taskbalance.bench.run_config import RunConfig, RunResult
from taskbalance.bench.runner import Runner

#: Where :func:`execute` trains the runs: ``"local"`` (serially, or ``jobs`` at a time in
#: worker processes) or ``"ray"`` (Ray tasks).
EXECUTORS: tuple[str, ...] = ("local", "ray")

Runs = Sequence[tuple[RunConfig, Path | None]]
OnDone = Callable[[RunConfig, RunResult], None]


class RunFailedError(RuntimeError):
    """A run raised: the message names the run (label, lr, seed) and the error."""


@dataclass
class Stage:
    """What every run of a stage shares: the problem, the Runner options and the callbacks."""

    problem: Problem
    options: dict[str, Any]
    """``resume``, ``record_every``, ``keep_final_state`` for every Runner."""
    log: Callable[[str], None] | None = None
    on_start: Callable[[Path | None], None] | None = None
    on_done: OnDone | None = None
    progress: bool = False


def describe(config: RunConfig) -> str:
    """A run in one phrase, for errors: ``label lr <lr> seed <seed>``.

    >>> describe(RunConfig(lr=3e-3, seed=2))
    'ew lr 0.003 seed 2'
    """
    return f"{config.label} lr {config.lr:g} seed {config.seed}"


def check_picklable(problem: Problem) -> None:
    """Raise a one-line ``ValueError`` when ``problem`` cannot be sent to worker processes
    (a lambda or a local function in it: define them at module level)."""
    try:
        pickle.dumps(problem)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise ValueError(
            f"problem {problem.name!r} does not pickle ({error}), so --jobs cannot send it to "
            "worker processes: define its functions at module level, or use --jobs 1"
        ) from None


def run_failed(config: RunConfig, error: BaseException) -> RunFailedError:
    """The error that reports ``error``, raised by ``config``'s run, naming the run.

    >>> run_failed(RunConfig(seed=1), ValueError("bad"))
    RunFailedError('run ew lr 0.001 seed 1 failed: bad')
    """
    return RunFailedError(f"run {describe(config)} failed: {error}")


def execute(
    stage: Stage,
    runs: Runs,
    *,
    executor: str = "local",
    jobs: int = 1,
    threads: int = 1,
    log_path: Path | None = None,
) -> list[RunResult]:
    """Train ``runs`` with ``executor`` (:data:`EXECUTORS`): ``"ray"`` as Ray tasks
    (:func:`taskbalance.bench.ray_executor.in_ray`); ``"local"`` ``jobs`` at a time in worker
    processes (:func:`in_workers`, appending to ``log_path``) when ``jobs > 1`` and there are
    several runs, else :func:`serial`. ``threads``: torch's CPU threads of each run elsewhere
    than in this process. Returns the results in the order of ``runs``.

    >>> execute(Stage(None, {}), [], jobs=2)
    []
    """
    if executor == "ray":
        from taskbalance.bench.ray_executor import in_ray

        return in_ray(stage, runs, threads)
    if executor != "local":
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if jobs > 1 and len(runs) > 1:
        return in_workers(stage, runs, jobs, threads, log_path)
    return serial(stage, runs)


def serial(stage: Stage, runs: Runs) -> list[RunResult]:
    """Train ``runs`` one after the other in this process."""
    done = []
    for config, checkpoint in runs:
        if stage.on_start is not None:
            stage.on_start(checkpoint)
        try:
            runner = Runner(stage.problem, config, checkpoint=checkpoint, progress=stage.progress,
                            log=stage.log, **stage.options)  # fmt: skip
            done.append(runner.run())
        except CheckpointMismatchError:  # names its checkpoint, hence the run, already
            raise
        except Exception as error:
            raise run_failed(config, error) from error
        if stage.on_done is not None:
            stage.on_done(config, done[-1])
    return done


def in_workers(stage: Stage, runs: Runs, jobs: int, threads: int, log_path: Path | None):
    """Train ``runs`` ``jobs`` at a time in worker processes (:func:`train_in_workers`)."""
    check_picklable(stage.problem)
    return train_in_workers(
        stage.problem, runs, jobs=jobs, threads=threads, log_path=log_path,
        on_done=stage.on_done, **stage.options,
    )  # fmt: skip
