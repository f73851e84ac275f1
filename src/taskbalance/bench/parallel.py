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

import os
from dataclasses import dataclass
from typing import Any

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

    >>> import torch
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

    >>> import torch
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
