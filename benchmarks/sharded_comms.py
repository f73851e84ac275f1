"""The collectives of one step under DDP and FSDP2, per level, at T = 3 and T = 16.

Run:  python benchmarks/sharded_comms.py   (2 gloo ranks on CPU, about a minute)

Each configuration trains a shared MLP trunk (16 -> 64 -> 64, 5,248 parameters) with one linear
head per task for 3 steps on 2 ranks and counts, on the last step, the all-gathers,
reduce-scatters and all-reduces and the numbers each rank sends
(:class:`taskbalance.distributed.CollectiveCounter`; DDP's bucketed all-reduce goes through its
default communication hook, registered from Python so that the counter sees it); under FSDP2
the trunk and the whole model are each one ``fully_shard`` unit. Counts, not times: they do not
depend on the machine. Writes benchmarks/results/sharded_comms.json and prints the markdown table
docs/performance.md quotes.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.fsdp import fully_shard

import taskbalance
from taskbalance.distributed import CollectiveCounter

OUT = Path(__file__).parent / "results" / "sharded_comms.json"
CONFIGS = [("ew", None), ("imtl_g", "feature"), ("imtl_g", "parameter")]
TASK_COUNTS = (3, 16)


class Model(nn.Module):
    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(64, 1) for _ in range(num_tasks))

    def forward(self, x):
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


def step_counts(wrapper: str, num_tasks: int, name: str, level: str | None, rank: int) -> dict:
    torch.manual_seed(0)
    model = Model(num_tasks)
    if wrapper == "fsdp2":
        fully_shard(model.trunk)
        fully_shard(model)
        forward = model
    else:
        forward = nn.parallel.DistributedDataParallel(model)
        # The same all-reduce as DDP's default, made from Python, where the counter sees it.
        forward.register_comm_hook(None, allreduce_hook)
    options = {} if level is None else {"level": level}
    method = taskbalance.get_method(name, tasks=num_tasks, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(32, 16, generator=gen), torch.randn(32, num_tasks, generator=gen)
    for _ in range(3):
        with CollectiveCounter() as counter:
            z, predictions = forward(x)
            losses = [(p.squeeze(-1) - y[:, t]).pow(2).mean() for t, p in enumerate(predictions)]
            optimizer.zero_grad()
            method.backward(losses, shared=model.trunk, features=z)
        optimizer.step()
    return {"calls": counter.calls, "numel": counter.numel}


def worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    rows = []
    for num_tasks in TASK_COUNTS:
        for wrapper in ("ddp", "fsdp2"):
            for name, level in CONFIGS:
                counts = step_counts(wrapper, num_tasks, name, level, rank)
                rows.append(
                    {
                        "T": num_tasks,
                        "wrapper": wrapper,
                        "method": name,
                        "level": level or "loss",
                        **counts,
                    }
                )
    if rank == 0:
        Path(out).write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/support/ranks.exit_now: gloo's teardown sometimes aborts


def table(rows: list[dict]) -> str:
    lines = [
        "| T | wrapper | step | all-gathers | reduce-scatters (numbers sent) "
        "| all-reduces (numbers sent) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        calls, numel = row["calls"], row["numel"]
        step = "EW" if row["method"] == "ew" else f"IMTL-G, {row['level']} level"
        lines.append(
            f"| {row['T']} | {row['wrapper'].upper()} | {step} | {calls.get('all_gather', 0)} "
            f"| {calls.get('reduce_scatter', 0)} ({numel.get('reduce_scatter', 0):,}) "
            f"| {calls.get('all_reduce', 0)} ({numel.get('all_reduce', 0):,}) |"
        )
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rows.json")
        mp.spawn(worker, args=(2, os.path.join(folder, "init"), out), nprocs=2, join=True)
        rows = json.loads(Path(out).read_text())
    OUT.write_text(
        json.dumps({"world_size": 2, "torch": torch.__version__, "rows": rows}, indent=1) + "\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
