"""A tiny in-memory multi-task dataset for benchmark tests (no files, no network)."""

from __future__ import annotations

import torch

from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec


def tiny() -> MultiTaskData:
    """Two regressions of different scales on 4 features: 48 / 24 / 24 rows, seeded."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        x = torch.randn(n, 4, generator=g)
        return Split(x, {"a": x[:, 0], "b": 5 * x[:, 1] + x[:, 2]})

    tasks = tuple(TaskSpec(t, "regression", 1, "mae", False) for t in "ab")
    return MultiTaskData("tiny", tasks, split(48), split(24), split(24), "synthetic", "none")
