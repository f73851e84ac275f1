"""Training the ranks.py model under DeepSpeed ZeRO on two gloo ranks (CPU).

Each rank trains on its half of the batch through a ``deepspeed.initialize`` engine (SGD, no
clipping) with ``taskbalance.integrations.deepspeed.backward`` in place of ``engine.backward``;
the method's own parameters have a plain SGD of their own. ``ranks.train`` on one process and
the whole batch is the reference.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

import taskbalance
from support import ranks
from taskbalance.integrations import deepspeed as ds_integration


def _config(stage: int, accumulation: int = 1) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": ranks.BATCH // 2,
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": "SGD", "params": {"lr": 0.05}},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }


def train(stage: int, name: str, options: dict[str, Any], rank: int) -> list[torch.Tensor]:
    import deepspeed

    model = ranks.Net()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=_config(stage)
    )
    method = taskbalance.get_method(name, tasks=ranks.NUM_TASKS, **options).double()
    own = torch.optim.SGD(method.parameters(), lr=0.05) if list(method.parameters()) else None
    x, y = ranks.data()
    shard = slice(rank * ranks.BATCH // 2, (rank + 1) * ranks.BATCH // 2)
    for _ in range(ranks.STEPS):
        z, predictions = engine(x[shard])
        losses = {f"t{t}": (p - y[shard, t]).pow(2).mean() for t, p in enumerate(predictions)}
        if own is not None:
            own.zero_grad()
        ds_integration.backward(engine, method, losses, shared=model.trunk, features=z)
        engine.step()
        if own is not None:
            own.step()
    return [p.detach().clone() for p in [*model.parameters(), *method.parameters()]]


def refusals() -> list[str]:
    """What ZeRO-3 and gradient accumulation get, one line each."""
    import deepspeed

    messages = []
    for stage, accumulation in ((3, 1), (2, 2)):
        model = ranks.Net()
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=_config(stage, accumulation)
        )
        z, predictions = engine(ranks.data()[0][: ranks.BATCH // 2])
        try:
            ds_integration.backward(
                engine, taskbalance.IMTLG(), [p.sum() for p in predictions], features=z
            )
            messages.append("")
        except ValueError as error:
            messages.append(str(error))
    return messages


def worker(rank: int, world_size: int, port: int, configs: list, out_file: str) -> None:
    """One rank: every configuration, then the refusals; rank 0 saves the results."""
    ranks.set_torchrun_env(rank, world_size, port)
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        results: dict[Any, Any] = {
            index: train(stage, name, options, rank)
            for index, (stage, name, options) in enumerate(configs)
        }
        results["refusals"] = refusals()
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()
    ranks.exit_now()
