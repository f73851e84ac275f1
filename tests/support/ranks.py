"""Training the same small model on one process and on two gloo ranks, for DDP checks.

Each rank trains on its half of the batch; the single process trains on the whole batch. The
losses are means, so the global loss is the mean of the two ranks' losses, and a correct
distributed step must leave exactly the single-process parameters.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import taskbalance

STEPS = 3
NUM_TASKS = 3
BATCH = 16  # the joined batch; each of the two ranks trains on half of it


class Net(nn.Module):
    """A trunk and one head per task; forward returns the trunk output and the predictions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(NUM_TASKS))
        self.double()

    def forward(self, x):
        z = self.trunk(x)
        return z, [head(z).squeeze(-1) for head in self.heads]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """The joined batch: inputs and targets whose scales differ by task."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(BATCH, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(BATCH, NUM_TASKS, generator=gen, dtype=torch.float64)
    return x, y * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)


def train(name: str, options: dict[str, Any], rank: int, world_size: int, ddp: bool) -> list:
    """Train for STEPS steps on this rank's shard; return the parameters (model, method)."""
    model = Net()
    method = taskbalance.get_method(name, tasks=NUM_TASKS, **options)
    method.double()
    wrapped = nn.parallel.DistributedDataParallel(model) if ddp else model
    optimizer = torch.optim.SGD(
        [{"params": model.parameters()}, {"params": method.parameters()}], lr=0.05
    )
    x, y = data()
    shard = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    x, y = x[shard], y[shard]
    for _ in range(STEPS):
        z, predictions = wrapped(x)
        losses = {f"t{t}": (p - y[:, t]).pow(2).mean() for t, p in enumerate(predictions)}
        optimizer.zero_grad()
        method.backward(losses, shared=model.trunk, features=z, sync=world_size > 1)
        if world_size > 1 and not ddp:  # a plain model: the user averages gradients
            for param in model.parameters():
                dist.all_reduce(param.grad)
                param.grad /= world_size
        optimizer.step()
    return [p.detach().clone() for p in [*model.parameters(), *method.parameters()]]


def worker(rank: int, world_size: int, init_file: str, configs: list, out_file: str) -> None:
    """One rank: train every configuration and let rank 0 save the parameters."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results = {
            index: train(name, options, rank, world_size, ddp)
            for index, (name, options, ddp) in enumerate(configs)
        }
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()
    exit_now()


def set_torchrun_env(rank: int, world_size: int, port: int) -> None:
    """Set the environment torchrun gives a rank on one machine (the frameworks under test
    read it to join the process group)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        NODE_RANK="0",
    )


def exit_now() -> None:
    """End this rank without the interpreter's teardown. About one run in five on this
    machine, a rank's process aborted after its work was done ("terminate called without an
    active exception", in a C++ thread with no Python frame, i.e. in static destructors at
    exit), failing a test whose results were already saved. Skipping the teardown is safe: the
    results are written and closed, and the process group is destroyed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def nan_on_one_rank_worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    """Rank 1's loss is NaN: every rank must raise, none may wait in a collective."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        model = Net()
        x, y = data()
        z, predictions = model(x[rank::world_size])
        losses = [(p - y[rank::world_size, t]).pow(2).mean() for t, p in enumerate(predictions)]
        if rank == 1:
            losses[2] = losses[2] * float("nan")
        try:
            taskbalance.IMTLG().backward(losses, features=z, sync=True)
            raised = ""
        except taskbalance.NonFiniteLossError as error:
            raised = str(error)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, raised)
        if rank == 0:
            torch.save(gathered, out_file)
    finally:
        dist.destroy_process_group()
    exit_now()
