"""Data-parallel benchmark runs: what the runner and ``taskbalance bench`` need from
torch.distributed (``torchrun --nproc_per_node R taskbalance bench ...``).

The protocol under R ranks (see docs/benchmarks.md, "Several processes"):

* ``batch_size`` stays the GLOBAL batch: every rank draws the same permutation (the shuffle
  generator is seeded with the run's seed on every rank), cuts the same mini-batches, and keeps
  its own contiguous, equal share of each, ``len(batch) // R`` rows (:func:`shard`). The library
  reduces losses, Gramians and Jacobians as means over equal shards, so a mini-batch whose size
  is not a multiple of R loses its last ``len(batch) % R`` rows (at most R - 1 rows per batch,
  the same rows on every rank); with R dividing the batch size only the epoch's last, partial
  batch can lose rows. A run then equals the single-process run on the joined shards.
* The model is wrapped in ``DistributedDataParallel`` and the forward goes through the wrapper
  (so that its reducer is armed); ``method.backward`` and AdaTask's ``opt.backward`` reduce over
  the ranks by themselves (:mod:`taskbalance.distributed`).
* Every rank evaluates the whole validation and test splits (their parameters are identical)
  and rank 0's numbers are broadcast (:func:`broadcast`), so that every rank takes the same
  selection and divergence decisions. Only rank 0 prints, shows progress bars and writes files.

Equal shards are exact for means over rows. A task with missing labels (MovieLens' "like")
averages over the labelled rows of each shard, so its distributed loss is the mean of the
shards' means, not the mean over the joined batch's labelled rows: close, not equal.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` among ``size`` ranks (1: no distribution).

    >>> World().main, World(rank=1, size=2).main, World(rank=1, size=2).distributed
    (True, False, True)
    """

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.size > 1


def current_world() -> World:
    """The default process group's rank and size, or ``World()`` when torch.distributed is not
    initialised.

    >>> current_world()
    World(rank=0, size=1)
    """
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env(device: str = "cpu") -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``, ...) when ``WORLD_SIZE > 1`` and no group exists yet.

    The backend is gloo on CPU and NCCL for a CUDA ``device``. Returns whether this call
    initialised the group (the caller then destroys it at the end).

    >>> init_from_env() if "WORLD_SIZE" not in os.environ else False
    False
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    return True


def local_device(device: str, world: World) -> str:
    """The device this rank trains on: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` under several
    ranks (one GPU per rank); anything else is returned as is.

    >>> local_device("cpu", World(1, 2))
    'cpu'
    """
    if world.distributed and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', world.rank))}"
    return device


def shard(index: Tensor, world: World) -> Tensor:
    """This rank's share of a mini-batch's row indices: ``len(index) // size`` contiguous rows;
    the last ``len(index) % size`` rows are dropped (on every rank alike).

    >>> shard(torch.arange(7), World(rank=1, size=2))
    tensor([3, 4, 5])
    """
    if not world.distributed:
        return index
    per = len(index) // world.size
    return index[world.rank * per : (world.rank + 1) * per]


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object; returned as is on one rank).

    >>> broadcast({"a": 1.0}, World())
    {'a': 1.0}
    """
    if not world.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def mean_over_ranks(tensor: Tensor, world: World) -> Tensor:
    """The mean of ``tensor`` over the ranks (the tensor itself on one rank).

    >>> mean_over_ranks(torch.ones(2), World())
    tensor([1., 1.])
    """
    if not world.distributed:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total / world.size


def barrier(world: World) -> None:
    """Wait for every rank (nothing on one rank)."""
    if world.distributed:
        dist.barrier()


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
    from taskbalance.bench.runner import Runner

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


def _discard(line: str) -> None:
    """A log sink (rank 0 keeps it; the other ranks must drop it)."""


class _Stop(Exception):
    pass


def _interrupted_and_resumed(
    data: Any, config: Any, path: Path, dtype: torch.dtype | None
) -> list[Tensor]:
    from taskbalance.bench.runner import Runner

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
