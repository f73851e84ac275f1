"""Steps under FSDP2 (``torch.distributed.fsdp.fully_shard``): exact, and as sharded as the model.

FSDP2 holds each unit's parameters as ``Shard(0)`` DTensors, all-gathers them for the forward
and again for the backward, and reshards at the end of every backward call. Two things follow
for a multi-task step, which makes one backward call per task before the final one:

- **the per-task passes would all-gather every unit again, pass after pass.** The units are
  held unsharded from the first per-task pass to the final backward (:func:`units_held`), so a
  step makes exactly the all-gathers of one ordinary backward, whatever T;
- **at parameter level, the per-task gradients must not be gathered whole on every rank.** Each
  task's gradient of the unsharded parameters (this rank's batch) is reduce-scattered as soon as
  it exists into FSDP's own shard layout (one reduce-scatter per task over all the shared units,
  the average over the ranks, as FSDP averages), so each rank holds ``T x n / R`` numbers: its
  rows of the global Jacobian. The Gramian is the sum of the ranks' ``G_r G_r^T`` (one all-reduce
  of T x T numbers), and each rank writes ``a^T G_r`` straight into the sharded ``.grad``
  (:class:`ShardedJacobian`). The sum of per-rank Gramians of per-rank *batches* would not be
  ``K``: the per-task gradients are reduced over the ranks first, then split.

Methods that need the Jacobian itself (not its Gramian) cannot run on shards and are refused in
one line by the caller. FSDP1 (``FullyShardedDataParallel``) flattens parameters into one
``FlatParameter`` per unit whose shards differ in size across ranks; it is refused in one line
(:func:`refuse_fsdp1`), pointing to FSDP2.

Everything here reads FSDP2's documented objects and a few of their attributes
(``FSDPParam.sharded_param`` / ``_unsharded_param``, ``FSDPParamGroup.reshard_after_backward``),
as of torch 2.13 (the version tested); tests/test_fsdp.py pins the behaviour on 2 gloo ranks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from taskbalance.engine.jacobian import gramian, seed_one, weighted_rows


@functools.cache
def _dtensor_type() -> type | None:
    """DTensor, looked up once (the import statement costs about 30 us per step)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor: nothing can be sharded
        return None
    return DTensor


def is_sharded(params: Sequence[Tensor]) -> bool:
    """Whether the shared parameters are FSDP2's sharded DTensors.

    >>> is_sharded([torch.zeros(2, requires_grad=True)])
    False
    """
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in params)


FSDP1_REFUSED = (
    "the model is sharded with FSDP1 (FullyShardedDataParallel), which flattens each unit's "
    "parameters into one FlatParameter, frees it between backward calls and gives each rank a "
    "shard of another size; taskbalance supports FSDP2: shard the model with "
    "torch.distributed.fsdp.fully_shard instead"
)


def is_fsdp1(tensor: Tensor) -> bool:
    """Whether FSDP1 flattened ``tensor`` (a ``FlatParameter``, or an original parameter that
    is a view into one under ``use_orig_params=True``).

    >>> is_fsdp1(torch.zeros(2))
    False
    """
    return bool(
        getattr(tensor, "_is_flat_param", False) or getattr(tensor, "_fsdp_flattened", False)
    )


def refuse_fsdp1(tensors: Sequence[Tensor]) -> None:
    """One line instead of a crash deep in a per-task pass when FSDP1 flattened ``tensors``."""
    if any(is_fsdp1(t) for t in tensors):
        raise ValueError(FSDP1_REFUSED)


def _param_groups() -> list[Any]:
    """Every FSDP2 parameter group of this process (one per ``fully_shard`` call)."""
    if not dist.is_available() or not dist.is_initialized():
        return []
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # a torch before FSDP2
        return []
    groups = []
    for reference in list(_module_state_mapping.values()):
        state = reference()
        if isinstance(state, FSDPState):
            groups.extend(g for g in state._fsdp_param_groups if g not in groups)
    return groups


@contextmanager
def units_held() -> Iterator[None]:
    """Keep every FSDP2 unit unsharded across the per-task passes (a no-op without FSDP2).

    FSDP2 reshards at the end of each backward call; with resharding after backward switched
    off for the per-task passes, the first pass's all-gathers serve all of them and the final
    backward, which then reshards and reduce-scatters as usual. ``is_last_backward`` is off too,
    so that FSDP keeps its backward prefetch order for the final backward.
    """
    groups = _param_groups()
    if not groups:
        yield
        return
    saved = [(g, g.reshard_after_backward) for g in groups]
    states = _state_contexts()
    last = [(ctx, ctx.is_last_backward) for ctx in states]
    for group, _ in saved:
        group.reshard_after_backward = False
    for ctx, _ in last:
        ctx.is_last_backward = False
    try:
        yield
    finally:
        for group, value in saved:
            group.reshard_after_backward = value
        for ctx, value in last:
            ctx.is_last_backward = value


def _state_contexts() -> list[Any]:
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    contexts = []
    for reference in list(_module_state_mapping.values()):
        state = reference()
        if isinstance(state, FSDPState) and state._state_ctx not in contexts:
            contexts.append(state._state_ctx)
    return contexts


class ShardedJacobian:
    """This rank's rows of the global per-task Jacobian of FSDP2-sharded parameters.

    Args:
        outputs: the T (loss-weighted) task losses of this rank's batch.
        params: the shared parameters as the user holds them (sharded DTensors).

    Attributes:
        leaves: the unsharded tensors the forward read (the graph's leaves for ``params``).
        gramian: ``K = G G^T`` of the global (rank-averaged) per-task gradients.
    """

    def __init__(self, outputs: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        self.params = tuple(params)
        by_param = _fsdp_params(self.params)
        self._fsdp = [by_param[id(p)][0] for p in self.params]
        self._groups = list({id(g): g for _, g in (by_param[id(p)] for p in self.params)}.values())
        self.leaves = tuple(fp._unsharded_param for fp in self._fsdp)
        group = self._fsdp[0].mesh_info.shard_process_group
        self._group = group
        self._world = dist.get_world_size(group)
        self._rank = dist.get_rank(group)
        self.blocks = self._collect(outputs)
        local = gramian(self.blocks, len(outputs))  # this rank's rows: a share of K
        dist.all_reduce(local, group=group)
        self.gramian = local

    def _collect(self, outputs: Sequence[Tensor]) -> list[Tensor | None]:
        num_tasks = len(outputs)
        blocks: list[Tensor | None] = [None] * len(self.params)
        one = seed_one(outputs[0])
        reached = [False] * len(self.params)
        for task, output in enumerate(outputs):
            grads = torch.autograd.grad(
                output, self.leaves, grad_outputs=one, retain_graph=True, allow_unused=True
            )
            shards = self._reduce_scatter(grads)
            for i, shard in enumerate(shards):
                if grads[i] is not None:
                    reached[i] = True
                block = blocks[i]
                if block is None:
                    block = blocks[i] = shard.new_zeros((num_tasks, *shard.shape))
                block[task] = shard
        # Whether a task reaches a parameter is the same on every rank (one model), so a
        # parameter no task reaches gets None everywhere, as on the unsharded paths.
        return [b if r else None for b, r in zip(blocks, reached, strict=True)]

    def _reduce_scatter(self, grads: Sequence[Tensor | None]) -> list[Tensor]:
        """The rank-average of each full gradient, this rank's ``Shard(0)`` rows of it, in one
        reduce-scatter over every shared parameter (zeros where a gradient is None)."""
        world = self._world
        pieces: list[list[Tensor]] = [[] for _ in range(world)]
        sizes = []
        for fp, grad in zip(self._fsdp, grads, strict=True):
            full = fp._unsharded_param
            rows = math.ceil(full.shape[0] / world) if full.dim() else 1
            padded = full.new_zeros((rows * world, *full.shape[1:]))
            if grad is not None:
                padded[: full.shape[0]] = grad
            for r, chunk in enumerate(padded.chunk(world)):
                pieces[r].append(chunk.reshape(-1))
            sizes.append((rows, full.shape))
        send = torch.cat([torch.cat(p) for p in pieces])
        receive = send.new_empty(send.numel() // world)
        dist.reduce_scatter_single(receive, send, op=dist.ReduceOp.SUM, group=self._group)
        receive /= world
        shards = []
        parts = receive.split([rows * math.prod(shape[1:]) for rows, shape in sizes])
        for (rows, shape), part in zip(sizes, parts, strict=True):
            local = min(rows, max(shape[0] - self._rank * rows, 0))  # the last ranks' are short
            shards.append(part.reshape(rows, *shape[1:])[:local])
        return shards

    def combine(self, weights: Tensor) -> list[Tensor | None]:
        """``sum_t weights[t] g_t``, this rank's shard of it, per shared parameter."""
        return [None if b is None else weighted_rows(weights, b) for b in self.blocks]

    def release(self) -> None:
        """Reshard the shared units after the final backward, which at parameter level runs
        into the heads only. Under a root unit that holds the heads, FSDP's end-of-backward
        callback reshards every unit; without one (e.g. Lightning's ModelParallelStrategy,
        where each head and the trunk are units of their own), nothing else would, and the
        next forward would read the stale unsharded parameters instead of the updated
        shards."""
        for group in self._groups:
            if group.is_unsharded and group.reshard_after_backward:
                group.reshard()

    def as_dtensors(self, update: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Each local shard as a sharded DTensor laid out like its parameter."""
        return [
            None if local is None else fp.to_sharded_dtensor(local.to(param.dtype).contiguous())
            for fp, param, local in zip(self._fsdp, self.params, update, strict=True)
        ]

    def accumulate(self, update: Sequence[Tensor | None]) -> None:
        """Add each local shard to the sharded ``.grad``, as FSDP's own reduce-scatter does."""
        for param, grad in zip(self.params, self.as_dtensors(update), strict=True):
            if grad is None:
                continue
            if param.grad is None:
                param.grad = grad
            else:
                param.grad += grad


def _fsdp_params(params: Sequence[Tensor]) -> dict[int, tuple[Any, Any]]:
    """The FSDP2 parameter record of each sharded parameter and its group, by ``id`` of the
    DTensor."""
    found = {}
    for group in _param_groups():
        for fp in group.fsdp_params:
            found[id(fp.sharded_param)] = (fp, group)
    missing = [i for i, p in enumerate(params) if id(p) not in found]
    if missing:
        raise ValueError(
            f"shared parameters: items {missing} are DTensors that no FSDP2 unit of this "
            "process holds (tensor parallelism is not supported); shard them with fully_shard"
        )
    return found
