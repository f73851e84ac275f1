"""Train a benchmark stage's runs as Ray tasks (``taskbalance bench --executor ray``).

Why Ray: the runs of a stage are independent (:mod:`taskbalance.bench.executor`), so a
benchmark that takes hours on one machine spreads over every core of a cluster with no change
to the runs themselves; Ray schedules them on whichever node has free CPUs (or a free GPU with
``--device cuda``) and brings the results back. ``--jobs N`` stays the local choice with no
extra dependency. Ray is the optional extra ``taskbalance[ray]``.

* Where: a Ray instance already initialised in this process (``ray.init(...)`` before
  :func:`~taskbalance.bench.benchmark.run_benchmark`) is used as it is; else the cluster at
  ``RAY_ADDRESS`` when that is set; else a new local instance (no dashboard) on this machine's
  cores, left running for the benchmark's later stages.
* Each run is one task asking for ``threads`` CPUs (one GPU on CUDA): it sets the same thread
  count and deterministic settings as the parent
  (:func:`taskbalance.bench.determinism.make_deterministic`) and trains a
  :class:`~taskbalance.bench.runner.Runner` exactly as the serial executor does, so the numbers,
  table and files are the serial run's. The problem goes to the object store once
  (``ray.put``), pickled by cloudpickle: on a cluster, its module (and taskbalance) must be
  importable on every node.
* Checkpoints: each task writes its run's checkpoint to the absolute path the parent gives, after
  every epoch, so ``--resume`` reads back whatever any executor wrote; on a cluster of several
  machines, ``--out`` must be on storage that every node sees (else a node keeps its runs'
  checkpoints on its own disk and ``--resume`` trains them again).
* The per-epoch log lines come back with each run's result and go to ``train.log`` when it
  finishes (in finishing order, not interleaved).
* A run that raises stops the stage: the tasks not yet finished are cancelled, and a
  :class:`~taskbalance.bench.executor.RunFailedError` names the run's config and the worker's
  error. The runs already finished keep their checkpoints for ``--resume``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskbalance.bench.checkpoints import CheckpointMismatchError
from taskbalance.bench.determinism import make_deterministic
from taskbalance.bench.problem import Problem
from taskbalance.bench.run_config import RunConfig, RunResult
from taskbalance.bench.runner import Runner

if TYPE_CHECKING:
    from taskbalance.bench.executor import Runs, Stage


def import_ray() -> Any:
    """The ``ray`` module, or a one-line ``ImportError`` that names the extra to install."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            "the Ray executor needs Ray, which is not installed: pip install 'taskbalance[ray]'"
        ) from None
    return ray


def connect() -> Any:
    """The ``ray`` module with Ray initialised: as it is when this process already did, else
    the cluster at ``RAY_ADDRESS``, else a new local instance without dashboard."""
    ray = import_ray()
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(include_dashboard=False)
    return ray


def resources(device: str, threads: int) -> dict[str, int]:
    """What one run's task asks Ray for: ``threads`` CPUs, and one GPU on a CUDA device (Ray
    then shows the task that GPU alone, as ``cuda``).

    >>> resources("cpu", 2), resources("cuda", 1)
    ({'num_cpus': 2}, {'num_cpus': 1, 'num_gpus': 1})
    """
    return {"num_cpus": threads, **({"num_gpus": 1} if device.startswith("cuda") else {})}


def describe_cluster() -> str:
    """Where the runs went, for the report: the Ray cluster's nodes and CPUs (Ray initialised)."""
    ray = import_ray()
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return f"{len(ray.nodes())} node(s), {cpus} CPU(s)"


def train_task(
    problem: Problem,
    config: RunConfig,
    checkpoint: Path | None,
    options: dict[str, Any],
    threads: int,
) -> tuple[RunResult, list[str]]:
    """One run on a Ray worker (the function Ray ships): its result and its log lines."""
    make_deterministic(config.device, threads)
    lines: list[str] = []
    runner = Runner(problem, config, checkpoint=checkpoint, progress=False, log=lines.append,
                    **options)  # fmt: skip
    return runner.run(), lines


def in_ray(stage: Stage, runs: Runs, threads: int) -> list[RunResult]:
    """Train ``runs`` as Ray tasks (:func:`connect` first) and return their results in the
    order of ``runs``; ``stage.log`` gets each run's lines and ``stage.on_done`` its result as
    it finishes. The first run that raises cancels the others and is raised as a
    :class:`~taskbalance.bench.executor.RunFailedError` naming its config (a
    :class:`CheckpointMismatchError` as it is: it names its checkpoint)."""
    from taskbalance.bench.executor import run_failed

    if not runs:
        return []
    ray = connect()
    task = ray.remote(train_task)
    problem = ray.put(stage.problem)
    configs = {}
    for config, path in runs:
        ref = task.options(**resources(config.device, threads)).remote(
            problem, config, None if path is None else path.resolve(), stage.options, threads
        )
        configs[ref] = config
    results: dict[Any, RunResult] = {}
    pending = list(configs)
    try:
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                result, lines = ray.get(ref)
            except ray.exceptions.RayError as error:
                cause = getattr(error, "cause", None) or error  # the worker's own exception
                if isinstance(cause, CheckpointMismatchError):
                    raise cause from None
                raise run_failed(configs[ref], cause) from cause
            for line in lines if stage.log is not None else ():
                stage.log(line)
            results[ref] = result
            if stage.on_done is not None:
                stage.on_done(configs[ref], result)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return [results[ref] for ref in configs]
