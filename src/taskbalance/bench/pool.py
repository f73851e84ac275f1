"""Train a benchmark stage's independent runs in worker processes (``taskbalance bench --jobs N``).

A stage (the single-task baselines, or the methods, on the grid seeds or on the later seeds) is a
list of runs that do not depend on each other: each is seeded by its own config, builds its own
model and reads its own checkpoint. :func:`train_in_workers` trains them ``jobs`` at a time in
spawned processes, each with the parent's torch thread count and deterministic settings, and
returns the results in the order given, so a benchmark run with ``--jobs N`` writes the same
numbers as the same benchmark run serially (tests/bench/test_reproducibility.py checks this).

The workers get the dataset once each, when they start (tensors go through shared memory); they
append their per-epoch lines to the benchmark's log (each line names its run, so lines of runs
trained at the same time interleave but stay readable) and show no progress bars.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import IO, Any

from taskbalance.bench.data.types import MultiTaskData
from taskbalance.bench.run_config import RunConfig, RunResult
from taskbalance.bench.runner import Runner

#: What a worker holds between its runs: the data, the Runner options, the open log.
_worker: dict[str, Any] = {}


def _start_worker(
    data: MultiTaskData, device: str, threads: int, log_path: Path | None, options: dict[str, Any]
) -> None:
    from taskbalance.bench.determinism import make_deterministic

    # Ctrl-C reaches the whole process group: the parent alone decides, and stops the workers
    # (a worker interrupted by it would return the interrupt as a result and take the next run).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    make_deterministic(device, threads)
    log_file: IO[str] | None = (
        None if log_path is None else open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
    )
    _worker.update(data=data, options=options, log_file=log_file)


def _log(line: str) -> None:
    if _worker["log_file"] is not None:
        _worker["log_file"].write(line + "\n")


def _train(config: RunConfig, checkpoint: Path | None) -> RunResult:
    runner = Runner(
        _worker["data"], config, checkpoint=checkpoint, progress=False, log=_log,
        **_worker["options"],
    )  # fmt: skip
    return runner.run(callback=_stop_if_orphaned)


def _stop_if_orphaned(_runner: Runner) -> None:
    # A parent killed outright (SIGKILL, or SIGTERM with no handler) cannot stop its workers;
    # without this check they would train on, unseen, racing a resumed benchmark for the same
    # checkpoints. The epoch's checkpoint is written before this runs, so nothing is lost.
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():
        os._exit(1)


def train_in_workers(
    data: MultiTaskData,
    runs: Sequence[tuple[RunConfig, Path | None]],
    *,
    jobs: int,
    threads: int,
    log_path: Path | None = None,
    on_done: Callable[[RunConfig, RunResult], None] | None = None,
    **runner_options: Any,
) -> list[RunResult]:
    """Train ``runs`` (``(config, checkpoint path)`` pairs) at most ``jobs`` at a time in
    spawned worker processes and return their results in the order of ``runs``.

    ``threads``: torch's CPU threads in each worker (pass the parent's, so that every run
    computes exactly as it would serially). ``log_path``: a file the workers append their
    per-epoch lines to. ``on_done(config, result)`` is called in this process as each run
    finishes (in finishing order). ``runner_options`` go to every
    :class:`~taskbalance.bench.runner.Runner` (``resume``, ``record_every``,
    ``keep_final_state``). The first run that raises (or an interrupt of this process) stops
    the pool: runs not yet started are cancelled, the workers are terminated at once (a run in
    progress keeps its last finished epoch's checkpoint for ``--resume``), and the exception is
    raised here.

    >>> train_in_workers(None, [], jobs=2, threads=1)
    []
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if not runs:
        return []
    import torch.multiprocessing

    devices = {config.device for config, _ in runs}
    if len(devices) != 1:
        raise ValueError(f"the runs of one pool must share a device, got {sorted(devices)}")
    context = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(runs)),
        mp_context=context,
        initializer=_start_worker,
        initargs=(data, devices.pop(), threads, log_path, runner_options),
    ) as pool:
        futures = {pool.submit(_train, config, path): config for config, path in runs}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                failed = [f for f in finished if f.exception() is not None]
                if on_done is not None:
                    for future in finished - set(failed):
                        on_done(futures[future], future.result())
                if failed:
                    raise failed[0].exception()  # type: ignore[misc]
        except BaseException:
            _stop(pool)
            raise
    return [future.result() for future in futures]


def _stop(pool: ProcessPoolExecutor) -> None:
    # Without this, leaving the pool waits for every run in progress to end (minutes to hours);
    # their checkpoints keep their last finished epoch for --resume. Python 3.14 names this
    # ProcessPoolExecutor.terminate_workers(); 3.11 has no public way. The processes are read
    # before shutdown, which forgets them.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
