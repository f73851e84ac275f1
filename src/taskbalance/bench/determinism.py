"""Run-to-run reproducibility of a benchmark: the settings that make the same command give the
same numbers.

What varies a run's numbers, and what this module fixes:

* the thread count: a matrix product split over more threads sums in another order, so the
  thread count is set explicitly (1 by default on CPU) and written into every report;
* non-deterministic kernels: :func:`torch.use_deterministic_algorithms` (on CUDA also the
  cuBLAS workspace setting it requires and no cuDNN autotuning, which picks kernels by timing);
* the data order and the models' initialisation: seeded per run by the runner (its own
  generator for the mini-batch order; no data-loader workers);
* derived data cached by an earlier run (QM9's descriptors): checked against a reference digest
  when read (:mod:`taskbalance.bench.data.qm9`).

What it cannot fix: another CPU family, another torch build or a GPU may round differently
(other vector kernels), and a few rounding differences grow over an epoch into different
numbers. docs/benchmarks.md gives the spread measured across kernel variants.
"""

from __future__ import annotations

import os

import torch


def make_deterministic(device: str = "cpu", threads: int | None = None) -> int:
    """Fix the sources of run-to-run difference this process controls; call it before the
    first CUDA operation. ``threads``: torch's CPU threads (default 1 on CPU: the benchmark's
    models are small, and on a shared 2-core machine two threads per process were measured 2-30x
    slower; on a GPU, torch's own default). Returns the thread count in force.

    >>> before = torch.get_num_threads()
    >>> make_deterministic("cpu", threads=1), torch.are_deterministic_algorithms_enabled()
    (1, True)
    >>> torch.use_deterministic_algorithms(False); torch.set_num_threads(before)
    """
    if threads is not None or torch.device(device).type == "cpu":
        torch.set_num_threads(threads or 1)
    if torch.device(device).type == "cuda":
        # cuBLAS needs a fixed workspace to be deterministic; read when its handle is created.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.get_num_threads()
