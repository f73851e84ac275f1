"""The benchmark's named protocols: how much data, how many epochs, seeds and learning rates.

``taskbalance bench --protocol NAME`` (default ``quick``) starts from one of these and lets any
explicit option override a field. Every report names the protocol and the sizes it trained on.

* ``quick``: one seed, a fixed lr, 12 epochs, 20,000 training rows of QM9 (the whole training
  split of the other data sets): minutes on 2 CPU cores.
* ``full``: every method in the registry, 3 seeds, 15 epochs, the lr grid 3e-3, 1e-3 run on
  seed 0, 20,000 training rows of every data set: 0.5-1.6 hours per data set on 2 CPU cores.
* ``paper``: the sizes of the papers' protocols. QM9: the whole 110,000-molecule training
  split, the standard 10,000 validation molecules, the remaining 10,831 as test, 30 epochs.
  Census-Income: the whole official training file (a seeded 10 % of it held out for
  validation) and the whole official test file as test, MMoE, 10 epochs. MultiMNIST (and its
  Fashion variants): 50,000 / 10,000 / 10,000 pairs, the LeNet HPS, 10 epochs. Any other data
  set: its whole training split, 30 epochs. Always 3 seeds, the lr grid 3e-3, 1e-3 on seed 0,
  and :data:`PAPER_METHODS`. Hours per data set on 2 CPU cores: run it in the background and
  continue with ``--resume``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The methods of the paper-scale protocol: the seed methods and the baselines papers compare
#: them with (``adatask`` is EW with the AdaTask Adam optimizer).
PAPER_METHODS: tuple[str, ...] = (
    "ew", "imtl_l", "imtl_g", "imtl", "emtl", "adatask", "uw", "mgda", "pcgrad", "cagrad",
    "nash_mtl", "famo", "aligned_mtl", "db_mtl", "fairgrad", "upgrad",
)  # fmt: skip

#: The lr grid of the full and paper protocols: a QM9 ``--tune`` run saw every method pick
#: 3e-3 over 1e-3 and 3e-4 (docs/benchmarks.md).
GRID: tuple[float, ...] = (3e-3, 1e-3)
#: The data set a protocol runs when none is given.
DEFAULT_DATASET = "qm9"
_IMAGE_PAIRS = {"size": 60_000, "val_size": 10_000, "test_size": 10_000}


@dataclass(frozen=True)
class Protocol:
    """What a protocol fixes for one data set; ``None`` fields leave the benchmark's default.

    >>> p = protocol("paper", "census_income")
    >>> p.arch, p.epochs, p.data_options, p.train_size
    ('mmoe', 10, {'val_from': 'train'}, None)
    """

    name: str
    epochs: int
    seeds: int
    lrs: tuple[float, ...]
    grid_seeds: int | None
    methods: str
    """``"default"`` (the default methods), ``"all"`` (the registry) or ``"paper"``
    (:data:`PAPER_METHODS`)."""
    train_size: int | None = None
    """Training rows kept (a seeded subset); ``None``: the whole training split."""
    arch: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for reports: the protocol's name and what it fixes."""
        rows = "all training rows" if self.train_size is None else f"{self.train_size} rows"
        grid = ", ".join(f"{lr:g}" for lr in self.lrs)
        return (
            f"protocol {self.name}: {rows}, {self.epochs} epochs, {self.seeds} seed(s), "
            f"lr {grid}" + (f" (grid on {self.grid_seeds} seed(s))" if len(self.lrs) > 1 else "")
        )


PROTOCOLS: tuple[str, ...] = ("quick", "full", "paper")


def protocol(name: str, dataset: str) -> Protocol:
    """The protocol ``name`` (one of :data:`PROTOCOLS`) for ``dataset``.

    >>> protocol("quick", "qm9").train_size, protocol("quick", "rf1").train_size
    (20000, None)
    >>> protocol("paper", "multi_mnist").data_options["val_size"]
    10000
    """
    if name == "quick":
        size = 20_000 if dataset == DEFAULT_DATASET else None
        return Protocol("quick", 12, 1, (1e-3,), None, "default", train_size=size)
    if name == "full":
        return Protocol("full", 15, 3, GRID, 1, "all", train_size=20_000)
    if name == "paper":
        if dataset == "census_income":
            return Protocol(name, 10, 3, GRID, 1, "paper", arch="mmoe",
                            data_options={"val_from": "train"})  # fmt: skip
        if dataset.startswith("multi_"):
            return Protocol(name, 10, 3, GRID, 1, "paper", data_options=dict(_IMAGE_PAIRS))
        return Protocol(name, 30, 3, GRID, 1, "paper")
    raise ValueError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
