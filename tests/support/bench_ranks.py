"""The benchmark runner on two gloo ranks, for the data-parallel benchmark tests
(tests/bench/test_bench_distributed.py): each rank trains every run of a list, rank 0 saves
what the tests compare with one process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from support.ranks import exit_now
from taskbalance.bench.parallel import barrier, current_world
from taskbalance.bench.runner import Runner


def spawn_worker(
    rank: int,
    world_size: int,
    init_file: str,
    data: Any,
    configs: Sequence[Any],
    out_file: str,
    dtype: torch.dtype | None = None,
    checkpoint_dir: str | None = None,
    record_every: int | None = None,
) -> None:
    """One rank of a job started with ``torch.multiprocessing.spawn`` (gloo, CPU): train every
    :class:`~taskbalance.bench.runner.RunConfig` of ``configs`` on ``data`` with the runner,
    then let rank 0 save ``{index: {"params", "history", "test", "records", "quiet",
    "rows"}}`` to ``out_file`` (per rank: ``quiet``, whether its runner dropped the log and the
    progress bar; ``rows``, the training rows it stepped on). Tests compare it with a single
    process on the joined batches.

    With ``checkpoint_dir``, each run also writes ``<index>.pt`` there (rank 0 only), and a
    second pass stops each run after its first epoch and resumes it from ``<index>-cut.pt``;
    the resumed parameters are saved under ``"resumed"``.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results: dict[int, dict[str, Any]] = {}
        for index, config in enumerate(configs):
            path = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{index}.pt"
            runner = Runner(
                data, config, checkpoint=path, progress=True, log=_discard, dtype=dtype,
                record_every=record_every,
            )  # fmt: skip
            result = runner.run()
            quiet, rows = [None] * world_size, [None] * world_size
            # Whether each rank kept its log and progress bar off (rank 0 must not), and the
            # training rows each rank stepped on (its shards).
            dist.all_gather_object(quiet, runner.log is None and not runner.progress)
            dist.all_gather_object(rows, runner.rows_trained)
            entry: dict[str, Any] = {
                "params": [p.detach().clone() for p in runner.model.parameters()],
                "history": result.history,
                "test": result.test_metrics,
                "records": result.records,
                "quiet": quiet,
                "rows": rows,
            }
            if checkpoint_dir is not None:
                entry["resumed"] = _interrupted_and_resumed(
                    data, config, Path(checkpoint_dir) / f"{index}-cut.pt", dtype
                )
            results[index] = entry
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()
    exit_now()


def _discard(line: str) -> None:
    """A log sink (rank 0 keeps it; the other ranks must drop it)."""


class _Stop(Exception):
    pass


def _interrupted_and_resumed(
    data: Any, config: Any, path: Path, dtype: torch.dtype | None
) -> list[Tensor]:
    def stop(runner: Runner) -> None:
        if runner.epoch == 1:
            raise _Stop

    with contextlib.suppress(_Stop):
        Runner(data, config, checkpoint=path, progress=False, dtype=dtype).run(stop)
    # Every rank reads the checkpoint rank 0 wrote: wait until it is there.
    barrier(current_world())
    resumed = Runner(data, config, checkpoint=path, resume=True, progress=False, dtype=dtype)
    resumed.run()
    return [p.detach().clone() for p in resumed.model.parameters()]
