"""A small two-task LightningModule, its data, and the hand-written loops it must agree with.

Shared by the one-process tests and the two-rank DDP workers (which import this module by
name, so it lives outside the test files).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import taskbalance
from taskbalance.integrations.lightning import MultiTaskMixin

TASKS = ("a", "b", "c")
SAMPLES = 16
LR = 0.05


class Net(MultiTaskMixin, L.LightningModule):
    """A trunk and three heads in float64; ``method`` is a registry name, or None."""

    def __init__(
        self, method: str | None, options: dict[str, Any] | None = None, optimizer: str = "sgd"
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in TASKS)
        if method is not None:
            self.method = taskbalance.get_method(method, tasks=list(TASKS), **(options or {}))
        self.optimizer_name = optimizer
        self.double()

    def task_losses(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The per-task mean squared errors and the trunk's output."""
        x, y = batch
        z = self.trunk(x)
        losses = {
            t: (head(z).squeeze(-1) - y[:, i]).pow(2).mean()
            for i, (t, head) in enumerate(zip(TASKS, self.heads, strict=True))
        }
        return losses, z

    def training_step(self, batch, batch_idx):
        losses, z = self.task_losses(batch)
        return self.balance(losses, features=z, shared=self.trunk)

    def configure_optimizers(self):
        return make_optimizer(self)


class ManualNet(Net):
    """The same module with manual optimisation."""

    def __init__(self, method: str | None, options: dict[str, Any] | None = None) -> None:
        super().__init__(method, options)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        losses, z = self.task_losses(batch)
        self.manual_backward(self.balance(losses, features=z, shared=self.trunk))
        optimizer.step()


def make_optimizer(model: Net) -> torch.optim.Optimizer:
    """SGD over the module's and the method's parameters, or AdaTaskAdam (shared trunk)."""
    if model.optimizer_name == "adatask":
        groups = [
            {"params": model.trunk.parameters(), "shared": True},
            {"params": model.heads.parameters()},
        ]
        if hasattr(model, "method"):
            groups.append(model.method.param_group())
        return taskbalance.AdaTaskAdam(groups, lr=LR)
    return torch.optim.SGD(model.multitask_param_groups(), lr=LR)


def data() -> TensorDataset:
    """Inputs and three targets whose scales differ by task."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(SAMPLES, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(SAMPLES, len(TASKS), generator=gen, dtype=torch.float64)
    return TensorDataset(x, y * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64))


def loader(batch_size: int) -> DataLoader:
    """The batches in order (no shuffling), as Lightning and the hand loops see them."""
    return DataLoader(data(), batch_size=batch_size, shuffle=False)


def shard(rank: int, world_size: int, batch_size: int) -> DataLoader:
    """This rank's contiguous share of each of :func:`loader`'s batches, in order."""
    share = batch_size // world_size
    indices = [
        start + rank * share + i for start in range(0, SAMPLES, batch_size) for i in range(share)
    ]
    return DataLoader(Subset(data(), indices), batch_size=share, shuffle=False)


def trainer(folder: str, steps: int, **options: Any) -> L.Trainer:
    """A quiet one-process CPU Trainer logging every step into ``folder``."""
    settings: dict[str, Any] = {"accelerator": "cpu", "devices": 1, **options}
    return L.Trainer(
        max_steps=steps,
        default_root_dir=folder,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )


def parameters(model: Net) -> list[torch.Tensor]:
    """Every parameter (the method's included), detached copies."""
    return [p.detach().clone() for p in model.parameters()]


def hand_loop(
    model: Net, steps: int, batch_size: int, accumulate: int = 1
) -> list[taskbalance.StepInfo]:
    """Train ``model`` without Lightning: for each step, every micro-batch's own
    ``method.backward``, their gradients averaged, one step (AdaTask: ``optimizer.backward``
    on one batch, then its step).

    Returns the record of each micro-batch."""
    optimizer = make_optimizer(model)
    batches = list(loader(batch_size))
    params = list(model.parameters())
    infos = []
    for step in range(steps):
        optimizer.zero_grad()
        if isinstance(optimizer, taskbalance.AdaTaskAdam):
            losses, _ = model.task_losses(batches[step % len(batches)])
            infos.append(optimizer.backward(losses, method=getattr(model, "method", None)))
            optimizer.step()
            continue
        summed = [torch.zeros_like(p) for p in params]
        for micro in range(accumulate):
            optimizer.zero_grad()
            losses, z = model.task_losses(batches[(step * accumulate + micro) % len(batches)])
            infos.append(model.method.backward(losses, features=z, shared=model.trunk))
            for total, param in zip(summed, params, strict=True):
                if param.grad is not None:
                    total += param.grad
        for total, param in zip(summed, params, strict=True):
            param.grad = total / accumulate
        optimizer.step()
    return infos


DDP_CONFIGS: list[tuple[str | None, dict[str, Any], str]] = [
    ("imtl_g", {}, "sgd"),  # feature level: the T x T Gramian is reduced
    ("mgda", {"level": "parameter"}, "sgd"),  # parameter level: the Jacobian is reduced
    ("imtl_l", {}, "sgd"),  # the method's own parameters, left out of DDP, averaged by it
    ("imtl_l", {}, "adatask"),  # AdaTask: the per-task gradients are reduced
    ("imtl_g", {"level": "parameter"}, "sgd"),  # under FSDP2: the Jacobian reduce-scattered
]
DDP_STEPS = 3


class ShardedNet(Net):
    """The module sharded with FSDP2 in ``configure_model``, as Lightning's ModelParallelStrategy
    expects: the trunk and each head are ``fully_shard`` units (the training step calls them,
    not the LightningModule's own forward)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.trunk)
        for head in self.heads:
            fully_shard(head)


def ddp_worker(
    rank: int, world_size: int, port: int, configs: list[int], out_file: str, sharded: bool = False
) -> None:
    """One rank of a 2-process Lightning run on CPU (gloo), launched from outside as torchrun
    would, with the DDP strategy or (``sharded``) ModelParallelStrategy's FSDP2: train the
    given DDP_CONFIGS entries on this rank's share of each batch, and let rank 0 save the
    (full) parameters."""
    import os

    from lightning.pytorch.strategies import ModelParallelStrategy

    from support.ranks import exit_now, set_torchrun_env

    set_torchrun_env(rank, world_size, port)
    torch.set_num_threads(1)
    results = []
    for method, options, optimizer in (DDP_CONFIGS[index] for index in configs):
        model = (ShardedNet if sharded else Net)(method, options, optimizer)
        strategy = ModelParallelStrategy(world_size, 1) if sharded else "ddp"
        fit = trainer(
            os.path.dirname(out_file),
            DDP_STEPS,
            logger=False,
            strategy=strategy,
            devices=world_size,
            use_distributed_sampler=False,  # Lightning's would shuffle
        )
        fit.fit(model, shard(rank, world_size, batch_size=8))
        results.append([getattr(p, "full_tensor", p.detach)().detach() for p in model.parameters()])
    if rank == 0:
        torch.save(results, out_file)
    torch.distributed.destroy_process_group()
    exit_now()


class HalfNet(Net):
    """The module in float32: for 16-bit mixed precision (autocast to float16), and under
    Lightning's DeepSpeed strategy (its precision plugin converts the module to float32)."""

    def __init__(self, method: str | None, options: dict[str, Any] | None = None) -> None:
        super().__init__(method, options)
        self.float()

    def task_losses(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x, y = batch
        return super().task_losses((x.float(), y.float()))


class HalfManualNet(ManualNet, HalfNet):
    """The float32 module with manual optimisation."""


def scaled_hand_loop(model: Net, steps: int, batch_size: int, init_scale: float) -> None:
    """The plain mixed-precision loop: autocast to float16 for the forward, the method's
    backward with a GradScaler, ``scaler.step`` and ``scaler.update``."""
    optimizer = make_optimizer(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    batches = list(loader(batch_size))
    for step in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            losses, z = model.task_losses(batches[step % len(batches)])
        model.method.backward(losses, features=z, shared=model.trunk, scaler=scaler)
        scaler.step(optimizer)
        scaler.update()
