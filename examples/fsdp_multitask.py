"""IMTL-G under FSDP2 (``fully_shard``) on CPU: the same ``method.backward`` call as on one process.

Run:  torchrun --nproc_per_node 2 examples/fsdp_multitask.py [--level parameter|feature]

Each rank holds half of every shared parameter and trains on its half of Linnerud (real data
bundled with scikit-learn). At parameter level each task's gradient is reduce-scattered into
FSDP's own shards, the T x T Gramian is summed over the shards in one all-reduce and each rank
writes its shard of the update into the sharded ``.grad``; at feature level FSDP's units stay
unsharded across the per-task passes. Rank 0 prints the losses, the weights and the collectives
of the last step (gloo on CPU; with CUDA GPUs, use ``nccl`` and one device per rank).
"""

import argparse
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import taskbalance
from taskbalance.bench.quickstart import TASKS, SharedBottom, load_linnerud
from taskbalance.distributed import CollectiveCounter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", choices=["parameter", "feature"], default="parameter")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    # The heads' outputs are views (squeeze); FSDP2 warns about in-place ops on such outputs,
    # which this loop never makes.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every rank, then sharded
    x, y = load_linnerud()
    x, y = x[rank::world], y[rank::world]  # this rank's half of the batch

    model = SharedBottom(len(TASKS))
    with torch.no_grad():
        for head, mean in zip(model.heads, y.mean(0), strict=True):
            head.bias.fill_(mean)
    fully_shard(model.trunk)  # the shared part: one unit
    fully_shard(model)  # the heads, in the root unit
    method = taskbalance.IMTLG(level=args.level)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    for step in range(1, args.steps + 1):
        with CollectiveCounter() as counter:
            z, predictions = model(x)
            losses = {
                t: nn.functional.mse_loss(p, y[:, i])
                for i, (t, p) in enumerate(zip(TASKS, predictions, strict=True))
            }
            optimizer.zero_grad()
            info = method.backward(losses, shared=model.trunk, features=z)
        optimizer.step()
        if rank == 0 and (step % 50 == 0 or step == args.steps):
            pairs = zip(info.tasks, info.losses.tolist(), strict=True)
            values = ", ".join(f"{t} {v:.3f}" for t, v in pairs)
            print(f"step {step}: {values} | weights {[round(w, 3) for w in info.weights.tolist()]}")
    if rank == 0:
        print(f"collectives of the last step: {counter.calls}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
