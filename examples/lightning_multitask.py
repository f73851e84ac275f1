"""A two-task LightningModule trained with a taskbalance method (or AdaTask) by a real Trainer.

    pip install 'taskbalance[lightning]'
    python examples/lightning_multitask.py                    # IMTL, a few seconds on CPU
    python examples/lightning_multitask.py --method mgda
    python examples/lightning_multitask.py --adatask          # AdaTaskAdam, equal weighting

Two regression tasks on one synthetic input, the second target 100 times larger: with the
plain sum, its gradient would dominate the shared trunk. The per-task losses and the method's
weights are logged under taskbalance/... (here by a CSVLogger into a temporary folder) and the
last step's are printed.
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import taskbalance
from taskbalance.integrations.lightning import MultiTaskMixin

TASKS = ("small", "large")


class TwoTaskNet(MultiTaskMixin, L.LightningModule):
    """A shared trunk and one linear head per task."""

    def __init__(self, method: str | None = "imtl", adatask: bool = False) -> None:
        super().__init__()
        self.adatask = adatask
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.heads = nn.ModuleDict({task: nn.Linear(16, 1) for task in TASKS})
        if method is not None:
            self.method = taskbalance.get_method(method, tasks=list(TASKS))

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self.trunk(x)
        losses = {
            task: F.mse_loss(head(z).squeeze(-1), y[:, i])
            for i, (task, head) in enumerate(self.heads.items())
        }
        return self.balance(losses, features=z, shared=self.trunk)

    def configure_optimizers(self):
        if self.adatask:
            return taskbalance.AdaTaskAdam(
                [
                    {"params": self.trunk.parameters(), "shared": True},
                    {"params": self.heads.parameters()},
                    *([self.method.param_group()] if hasattr(self, "method") else []),
                ],
                lr=1e-2,
            )
        return torch.optim.Adam(self.multitask_param_groups(), lr=1e-2)


def data(samples: int = 512) -> TensorDataset:
    """Inputs and two targets whose scales differ by a factor 100."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 8, generator=gen)
    y = torch.stack([x[:, :4].sum(1), 100 * x[:, 4:].sum(1)], dim=1)
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="imtl", help="a registry name (taskbalance methods)")
    parser.add_argument("--adatask", action="store_true", help="AdaTaskAdam, equal weighting")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TwoTaskNet(method=None if args.adatask else args.method, adatask=args.adatask)
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            devices=1,
            logger=CSVLogger(folder),
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, DataLoader(data(), batch_size=64, shuffle=True))
    for name, value in sorted(trainer.logged_metrics.items()):
        if "/loss/" in name or "/weight/" in name:
            print(f"{name:32s} {float(value):10.4f}")


if __name__ == "__main__":
    main()
