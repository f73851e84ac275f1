"""IMTL under DistributedDataParallel, on CPU: the same three-line change as on one process.

Run:  torchrun --nproc_per_node 2 examples/ddp_quickstart.py

Each rank trains on its half of Linnerud (real data bundled with scikit-learn); taskbalance
reduces the losses and the T x T feature-level Gramian over the ranks, so every rank computes
the weights a single process would compute on the whole batch, and DDP averages the gradients
as usual. Rank 0 prints the losses (averaged over the ranks) and the weights.
"""

import torch
import torch.distributed as dist
from torch import nn

import taskbalance
from taskbalance.bench.quickstart import TASKS, SharedBottom, load_linnerud


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every rank
    x, y = load_linnerud()
    x, y = x[rank::world], y[rank::world]  # this rank's shard

    model = SharedBottom(len(TASKS))
    with torch.no_grad():
        for head, mean in zip(model.heads, y.mean(0), strict=True):
            head.bias.fill_(mean)
    ddp = nn.parallel.DistributedDataParallel(model)
    method = taskbalance.IMTL(tasks=list(TASKS))
    optimizer = torch.optim.Adam([{"params": ddp.parameters()}, method.param_group()], lr=1e-2)

    for step in range(1, 301):
        z, predictions = ddp(x)  # through DDP's forward, so that its reducer is armed
        losses = {
            t: nn.functional.mse_loss(p, y[:, i])
            for i, (t, p) in enumerate(zip(TASKS, predictions, strict=True))
        }
        optimizer.zero_grad()
        info = method.backward(losses, features=z)  # reduces over the ranks by itself
        optimizer.step()
        if rank == 0 and step % 50 == 0:
            values = ", ".join(
                f"{t} {v:.3f}" for t, v in zip(info.tasks, info.losses.tolist(), strict=True)
            )
            print(f"step {step}: {values} | weights {[round(w, 3) for w in info.weights.tolist()]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
