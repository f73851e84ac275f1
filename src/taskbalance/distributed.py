"""The reductions that make a method see the whole batch under torch.distributed.

With R ranks, each holding an equal shard of the batch, and losses that are means over a shard,
the global task loss is ``L_t = (1/R) sum_r L_t^r``. What each level must reduce:

- losses: the T loss values are averaged (one all-reduce of T numbers), so that every rank's
  loss weights and state see the same numbers;
- feature level: the global shared representation is the concatenation of the shards' ``z^r``
  and ``dL_t/dz^r = (1/R) dL_t^r/dz^r``, so the global Gramian is ``(1/R^2) sum_r K^r``: one
  all-reduce of T x T numbers;
- parameter level: ``g_t = (1/R) sum_r g_t^r``, and the Gramian needs products across ranks, so
  the T x n Jacobian itself is averaged (T times the traffic of ordinary data parallelism).

The gradients each rank then writes are local, chosen so that their average over the ranks
(what DistributedDataParallel, or the user's own all-reduce, computes) is the update a single
process would make on the joined batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Reducer:
    """All-reduces over a process group; built only when more than one rank takes part.

    Attributes:
        group: the process group (``None``: the default group).
        world_size: the number of ranks in it.
        rank: this process's rank in it.
    """

    group: dist.ProcessGroup | None
    world_size: int
    rank: int

    def mean(self, tensor: Tensor) -> Tensor:
        """The mean of ``tensor`` over the ranks (a new tensor; the input is untouched)."""
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total / self.world_size

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the ranks (a new tensor; the input is untouched)."""
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (all ranks must pass the same shape), in rank order."""
        parts = [tensor.new_empty(tensor.shape) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.detach().contiguous(), group=self.group)
        return parts

    def mean_grads(self, tensors: list[Tensor]) -> None:
        """Average the ``.grad`` of tensors that no DDP wrapper reduces (a method's own)."""
        for tensor in tensors:
            if tensor.grad is not None:
                dist.all_reduce(tensor.grad, op=dist.ReduceOp.SUM, group=self.group)
                tensor.grad.div_(self.world_size)


def initialised() -> bool:
    """Whether torch.distributed runs (a DDP or FSDP wrapper may then expect its own hooks to
    see every gradient, even on one rank).

    >>> initialised()
    False
    """
    return dist.is_available() and dist.is_initialized()


def reducer(sync: bool | None, group: dist.ProcessGroup | None = None) -> Reducer | None:
    """The reducer for this call, or ``None`` when the call is local.

    Args:
        sync: ``True`` reduces (and requires an initialised process group), ``False`` never
            does, ``None`` reduces exactly when torch.distributed is initialised with more than
            one rank.
        group: the process group (``None``: the default group).

    >>> reducer(None) is None  # not initialised: local
    True
    """
    if sync is False:
        return None
    if not initialised():
        if sync:
            raise RuntimeError(
                "sync=True needs torch.distributed to be initialised "
                "(torch.distributed.init_process_group)"
            )
        return None
    world_size = dist.get_world_size(group)
    if world_size == 1 and not sync:
        return None
    return Reducer(group, world_size, dist.get_rank(group))


_COUNTED = {
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "all_gather": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_reduce": "all_reduce",
    "broadcast": "broadcast",
}
"""The torch.distributed functions a step may call (FSDP2's all-gathers and reduce-scatters,
DDP's and taskbalance's all-reduces), by the kind of collective they make."""


class CollectiveCounter:
    """Counts the collectives made inside a ``with`` block, and the numbers they carry.

    Wraps the ``torch.distributed`` functions that FSDP2, DDP and taskbalance call (each looked
    up on the module at call time), so it sees every all-gather, reduce-scatter, all-reduce and
    broadcast of a step. For checking what a step costs, e.g. that a feature-level step under
    FSDP2 makes the all-gathers of an ordinary backward; not meant for timing.

    Attributes:
        calls: ``{kind: number of calls}``, kinds ``all_gather``, ``reduce_scatter``,
            ``all_reduce``, ``broadcast``.
        numel: ``{kind: numbers sent}``: the input's size (for an all-gather, this rank's
            part; for a reduce-scatter, the whole input).

    >>> with CollectiveCounter() as counter:
    ...     pass  # a training step under torch.distributed
    >>> counter.calls
    {}
    """

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.numel: dict[str, int] = {}
        self._originals = {name: getattr(dist, name) for name in _COUNTED if hasattr(dist, name)}

    def __enter__(self) -> CollectiveCounter:
        for name, original in self._originals.items():
            setattr(dist, name, self._counting(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _counting(self, name: str, original):
        kind = _COUNTED[name]

        def counted(*args, **kwargs):
            self.calls[kind] = self.calls.get(kind, 0) + 1
            self.numel[kind] = self.numel.get(kind, 0) + _input_numel(name, args, kwargs)
            return original(*args, **kwargs)

        return counted


def _input_numel(name: str, args: tuple, kwargs: dict) -> int:
    """The size of what a collective sends from this rank."""
    if name in ("all_reduce", "broadcast"):
        tensor = kwargs.get("tensor", args[0] if args else None)
    elif name == "all_gather":
        tensor = kwargs.get("tensor", args[1] if len(args) > 1 else None)
    else:  # (output, input) collectives
        tensor = kwargs.get("input", kwargs.get("input_tensor", args[1] if len(args) > 1 else None))
    return tensor.numel() if isinstance(tensor, Tensor) else 0
