"""Training the ranks.py model sharded with FSDP2 on two gloo ranks, counting collectives.

Each rank shards the trunk and the whole model with ``fully_shard`` (the trunk's layers have an
odd number of rows, so the ranks' shards differ in size) and trains on its half of the batch;
``ranks.train`` on one process and the whole batch is the reference. The collectives FSDP2 and
taskbalance make are counted per step (:class:`taskbalance.distributed.CollectiveCounter`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import taskbalance
from support import ranks
from taskbalance.distributed import CollectiveCounter


def sharded_model(mixed: bool = False) -> ranks.Net:
    model = ranks.Net()
    if mixed:
        model.float()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if mixed else MixedPrecisionPolicy()
    fully_shard(model.trunk, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def train(name: str, options: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """STEPS sharded steps on this rank's half; the full parameters and each step's counts."""
    model = sharded_model()
    method = taskbalance.get_method(name, tasks=ranks.NUM_TASKS, **options)
    method.double()
    optimizer = torch.optim.SGD(
        [{"params": model.parameters()}, {"params": method.parameters()}], lr=0.05
    )
    x, y = ranks.data()
    shard = slice(rank * ranks.BATCH // world_size, (rank + 1) * ranks.BATCH // world_size)
    x, y = x[shard], y[shard]
    counts = []
    for _ in range(ranks.STEPS):
        with CollectiveCounter() as collectives:
            z, predictions = model(x)
            losses = {f"t{t}": (p - y[:, t]).pow(2).mean() for t, p in enumerate(predictions)}
            optimizer.zero_grad()
            method.backward(losses, shared=model.trunk, features=z)
        counts.append((dict(collectives.calls), dict(collectives.numel)))
        optimizer.step()
    params = [p.full_tensor().detach().clone() for p in model.parameters()]
    params += [p.detach().clone() for p in method.parameters()]
    return {"params": params, "counts": counts}


def train_adatask(rank: int, world_size: int) -> list[torch.Tensor]:
    """AdaTask-Adam (per-task moments of the shared parameters) for STEPS steps; sharded with
    FSDP2 when several ranks take part, plain on one process."""
    model = sharded_model() if world_size > 1 else ranks.Net()
    optimizer = taskbalance.AdaTaskAdam(
        [
            {"params": model.trunk.parameters(), "shared": True},
            {"params": model.heads.parameters()},
        ],
        lr=0.01,
    )
    x, y = ranks.data()
    shard = slice(rank * ranks.BATCH // world_size, (rank + 1) * ranks.BATCH // world_size)
    for _ in range(ranks.STEPS):
        _, predictions = model(x[shard])
        losses = [(p - y[shard, t]).pow(2).mean() for t, p in enumerate(predictions)]
        optimizer.zero_grad()
        optimizer.backward(losses)
        optimizer.step()
    return [getattr(p, "full_tensor", p.detach)().detach().clone() for p in model.parameters()]


def functional_against_backward(rank: int, world_size: int) -> float:
    """The largest gap between ``gradients()`` (sharded DTensors) and what ``backward()``
    writes into the sharded ``.grad`` on the same batch."""
    model = sharded_model()
    x, y = ranks.data()

    def losses():
        _, predictions = model(x[rank::world_size])
        return [(p - y[rank::world_size, t]).pow(2).mean() for t, p in enumerate(predictions)]

    method = taskbalance.IMTLG(level="parameter")
    grads, _ = method.gradients(losses(), shared=model.trunk)
    method.backward(losses(), shared=model.trunk)
    pairs = zip(grads, model.trunk.parameters(), strict=True)
    return max(float((g.full_tensor() - p.grad.full_tensor()).abs().max()) for g, p in pairs)


def mixed_precision_step(rank: int, world_size: int) -> dict[str, Any]:
    """One parameter-level IMTL-G step with bf16 parameters in the forward and backward."""
    model = sharded_model(mixed=True)
    x, y = ranks.data()
    _, predictions = model(x[rank::world_size].float())
    losses = [
        (p.float() - y[rank::world_size, t].float()).pow(2).mean()
        for t, p in enumerate(predictions)
    ]
    info = taskbalance.IMTLG(level="parameter").backward(losses, shared=model.trunk)
    grads = [p.grad.full_tensor() for p in model.trunk.parameters()]
    return {
        "weights": info.gradient_weights,
        "finite": all(bool(g.isfinite().all()) for g in grads),
    }


def refusal(rank: int, world_size: int) -> str:
    """What a method that needs the Jacobian itself says at parameter level under FSDP2."""
    model = sharded_model()
    x, y = ranks.data()
    _, predictions = model(x[rank::world_size])
    losses = [(p - y[rank::world_size, t]).pow(2).mean() for t, p in enumerate(predictions)]
    try:
        taskbalance.get_method("graddrop", level="parameter").backward(losses, shared=model.trunk)
    except ValueError as error:
        return str(error)
    return ""


def fsdp1_refusals(rank: int, world_size: int) -> list[str]:
    """What FSDP1 (FullyShardedDataParallel) gets at feature and parameter level."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    messages = []
    for level in ("feature", "parameter"):
        model = ranks.Net()
        cpu = torch.device("cpu")
        model.trunk = FullyShardedDataParallel(model.trunk, device_id=cpu)
        wrapped = FullyShardedDataParallel(model, device_id=cpu)
        x, y = ranks.data()
        z, predictions = wrapped(x[rank::world_size])
        losses = [(p - y[rank::world_size, t]).pow(2).mean() for t, p in enumerate(predictions)]
        try:
            taskbalance.IMTLG(level=level).backward(losses, shared=model.trunk, features=z)
            messages.append("")
        except ValueError as error:
            messages.append(str(error))
    return messages


def worker(rank: int, world_size: int, init_file: str, configs: list, out_file: str) -> None:
    """One rank: every configuration, then the mixed-precision step and the refusal."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results: dict[Any, Any] = {
            index: train(name, options, rank, world_size)
            for index, (name, options) in enumerate(configs)
        }
        results["adatask"] = train_adatask(rank, world_size)
        results["mixed"] = mixed_precision_step(rank, world_size)
        results["functional"] = functional_against_backward(rank, world_size)
        results["refusal"] = refusal(rank, world_size)
        results["fsdp1"] = fsdp1_refusals(rank, world_size)
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()
    ranks.exit_now()
