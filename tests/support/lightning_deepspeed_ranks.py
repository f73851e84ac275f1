"""MultiTaskMixin under Lightning's DeepSpeedStrategy on two gloo ranks (CPU).

Lightning refuses its DeepSpeed strategy on anything but a CUDA accelerator (in
``setup_environment``), while DeepSpeed itself runs ZeRO-1/2 on CPU with gloo. The ranks
therefore train with :class:`CPUDeepSpeedStrategy`, Lightning's strategy with that one check
lifted: the engine, its configuration, the precision plugin and the backward and step calls
are Lightning's own. Each rank trains ``lightning_models.HalfNet`` (float32: Lightning's
DeepSpeed precision plugin converts the module to ``32-true``) on its half of each batch;
``lightning_models.hand_loop`` on one process and the whole batch is the reference.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from integrations import lightning_models as lm
from support.ranks import exit_now, set_torchrun_env

CONFIGS: list[tuple[int, str, str]] = [
    (2, "imtl_g", "HalfNet"),
    (2, "imtl_l", "HalfNet"),
    (1, "imtl_g", "HalfNet"),
    (2, "imtl_g", "HalfManualNet"),
]
"""(ZeRO stage, method, module): feature level (the Gramian reduced by the method, the
combined gradient by DeepSpeed); loss level with the method's own parameters (in DeepSpeed's
optimizer, as part of the module); ZeRO-1; manual optimisation (``manual_backward``)."""
STEPS = 3


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy without its CUDA-only check, for the CPU tests."""

    def setup_environment(self) -> None:
        """What ``DeepSpeedStrategy.setup_environment`` does after its accelerator check."""
        super(DeepSpeedStrategy, self).setup_environment()


def fit(folder: str, stage: int, method: str, net: str, rank: int, world_size: int) -> Any:
    """Train ``lightning_models.<net>`` with ``method`` under ZeRO ``stage`` on this rank's
    share of each batch; return its Trainer."""
    model = getattr(lm, net)(method)
    # Numbered like GPUs, as Lightning's DeepSpeed checks (the index means nothing on the CPU).
    devices = [torch.device("cpu", index) for index in range(world_size)]
    trainer = lm.trainer(
        folder,
        STEPS,
        logger=False,
        strategy=CPUDeepSpeedStrategy(stage=stage, parallel_devices=devices),
        devices=world_size,
        use_distributed_sampler=False,  # Lightning's would shuffle
    )
    trainer.fit(model, lm.shard(rank, world_size, batch_size=8))
    return trainer


def worker(rank: int, world_size: int, port: int, out_file: str) -> None:
    """One rank, launched from outside as torchrun would: train every CONFIGS entry, then try
    ZeRO-3; rank 0 saves each entry's parameters and logged weights, and ZeRO-3's error."""
    set_torchrun_env(rank, world_size, port)
    torch.set_num_threads(1)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    folder = os.path.dirname(out_file)
    results: dict[Any, Any] = {}
    for index, (stage, method, net) in enumerate(CONFIGS):
        trainer = fit(folder, stage, method, net, rank, world_size)
        logged = trainer.logged_metrics
        weights = [float(logged[f"taskbalance/weight/{task}"]) for task in lm.TASKS]
        results[index] = (lm.parameters(trainer.lightning_module), weights)
    try:
        fit(folder, 3, "imtl_g", "HalfNet", rank, world_size)
        results["zero3"] = ""
    except ValueError as error:
        results["zero3"] = str(error)
    if rank == 0:
        torch.save(results, out_file)
    torch.distributed.destroy_process_group()
    exit_now()
