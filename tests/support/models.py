"""Tiny hard-parameter-sharing models for engine and method tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SharedBottom(nn.Module):
    """An MLP trunk read by one linear head per task (regression to random targets).

    Args:
        num_tasks: number of heads.
        dim_in, dim_hidden: trunk sizes.
        linear_trunk: a single bias-free linear layer as the trunk (for level comparisons).
        seed: initialisation seed.
    """

    def __init__(
        self,
        num_tasks: int,
        dim_in: int = 5,
        dim_hidden: int = 7,
        linear_trunk: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        if linear_trunk:
            self.trunk: nn.Module = nn.Linear(dim_in, dim_hidden, bias=False)
        else:
            self.trunk = nn.Sequential(
                nn.Linear(dim_in, dim_hidden), nn.Tanh(), nn.Linear(dim_hidden, dim_hidden)
            )
        self.heads = nn.ModuleList(nn.Linear(dim_hidden, 1) for _ in range(num_tasks))
        self.to(dtype)

    def losses(self, x: Tensor, targets: Tensor, scales: list[float] | None = None):
        """Per-task mean squared errors (times ``scales``), and the trunk output z."""
        z = self.trunk(x)
        losses = {}
        for t, head in enumerate(self.heads):
            loss = (head(z).squeeze(-1) - targets[:, t]).pow(2).mean()
            losses[f"task{t}"] = loss * (scales[t] if scales else 1.0)
        return losses, z


def batch(num_tasks: int, size: int = 6, dim_in: int = 5, seed: int = 1, dtype=torch.float64):
    """A random input batch and targets with very different scales per task."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, dim_in, generator=gen, dtype=dtype)
    targets = torch.randn(size, num_tasks, generator=gen, dtype=dtype)
    targets = targets * torch.logspace(0, 2, num_tasks, dtype=dtype)
    return x, targets


def grads(module: nn.Module) -> list[Tensor]:
    """Copies of the module's parameter gradients (zeros where None)."""
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for p in module.parameters()
    ]
