"""The quickstart: IMTL on a real (tiny) multi-task regression set, losses and weights printed.

Linnerud (20 middle-aged men, Tenenhaus 1998, shipped with scikit-learn): three exercise
counts (chin-ups, sit-ups, jumps) predict three physiological measurements (weight in lb,
waist in inches, pulse per minute). The targets are left in their own units, so the three mean
squared errors differ by orders of magnitude: the case IMTL is built for. Small enough to train
in a second on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

import taskbalance

TASKS = ("weight", "waist", "pulse")


def load_linnerud() -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised exercise counts (20 x 3) and raw physiological targets (20 x 3)."""
    try:
        from sklearn.datasets import load_linnerud as sklearn_linnerud
    except ImportError as error:
        raise ImportError(
            "the quickstart reads scikit-learn's bundled Linnerud data: pip install "
            "'taskbalance[bench]'"
        ) from error
    data = sklearn_linnerud()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0), y


class SharedBottom(nn.Module):
    """A small MLP trunk and one linear head per task."""

    def __init__(self, num_tasks: int, hidden: int = 32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The trunk output z (what every head reads) and each head's prediction."""
        z = self.trunk(x)
        return z, [head(z).squeeze(-1) for head in self.heads]


def run(method_name: str = "imtl", steps: int = 600, every: int = 100, seed: int = 0) -> dict:
    """Train on Linnerud with one method; print losses and weights every ``every`` steps.

    Returns the final per-task losses. The target means start as the heads' biases, so the
    losses measure how much of each target's spread the model explains.

    >>> final = run("ew", steps=5, every=10)  # doctest: +ELLIPSIS
    step ...
    >>> sorted(final)
    ['pulse', 'waist', 'weight']
    """
    torch.manual_seed(seed)
    x, y = load_linnerud()
    model = SharedBottom(len(TASKS))
    with torch.no_grad():
        for head, mean in zip(model.heads, y.mean(0), strict=True):
            head.bias.fill_(mean)
    method = taskbalance.get_method(method_name, tasks=list(TASKS))
    optimizer = torch.optim.Adam([{"params": model.parameters()}, method.param_group()], lr=1e-2)
    header = "step  " + "  ".join(f"{f'loss {t}':>12}" for t in TASKS) + "   weights"
    print(header)
    for step in range(1, steps + 1):
        z, predictions = model(x)
        losses = {
            task: nn.functional.mse_loss(p, y[:, i])
            for i, (task, p) in enumerate(zip(TASKS, predictions, strict=True))
        }
        optimizer.zero_grad()
        info = method.backward(losses, shared=model.trunk, features=z)
        optimizer.step()
        if step % every == 0 or step == 1:
            values = "  ".join(f"{v:12.3f}" for v in info.losses.tolist())
            weights = " ".join(f"{w:.3g}" for w in info.weights.tolist())
            print(f"{step:>4}  {values}   {weights}")
    return dict(zip(TASKS, info.losses.tolist(), strict=True))
