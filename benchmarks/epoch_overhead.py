"""Epoch overhead of the benchmark harness: the runner's epoch with EW against a hand-written loop.

Issue 6's requirement: "An epoch of a loss-level method costs at most 1.1x a hand-written
training loop on the same model and data". Both sides get:

* the same model: ``build_model`` after ``torch.manual_seed(seed)``, as the runner builds it
  (same architecture and initial weights);
* the same data tensors (the runner's training split, already in memory), the same batch size,
  a fresh seeded permutation per epoch;
* Adam with the same learning rate; one intra-op thread (the benchmark's default on CPU).

The hand-written loop is what a user writes without the harness::

    for start in range(0, n, batch):
        idx = order[start : start + batch]
        out = model(x[idx])
        loss = sum(F.mse_loss(out[t], y[t][idx]) for t in tasks)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()

The runner's epoch is :meth:`Runner.train_epoch` with ``method="ew"``: the same work plus the
harness (the method's backward, per-step timing, running loss and weight sums, NaN checks, and,
in the ``runner`` variant, the diagnostics recorder at the benchmark's default sampling of
every 20 steps). Validation and checkpoints are not part of either side (the hand loop has
none). The variants are interleaved round after round, in alternating order (A B C, C B A, ...),
so that the load of a shared machine hits them alike; the reported ratio is the median over
rounds of ``runner epoch / hand epoch`` of the same round.

Usage:
    python benchmarks/epoch_overhead.py                          # QM9, 10,000 rows, 9 rounds
    python benchmarks/epoch_overhead.py --dataset multi_mnist --train-size 3000
    python benchmarks/epoch_overhead.py --protocol paper --dataset census_income  # paper scale
    python benchmarks/epoch_overhead.py --profile                # cProfile of the runner epoch
Writes benchmarks/results/epoch_overhead.json (``--protocol paper``:
epoch_overhead_paper_<dataset>.json) and prints a summary.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from taskbalance.bench.benchmark import BenchConfig, load_bench_data
from taskbalance.bench.data.types import MultiTaskData
from taskbalance.bench.method_specs import parse_method_spec
from taskbalance.bench.models import build_model
from taskbalance.bench.protocols import Protocol, protocol
from taskbalance.bench.run_config import RunConfig
from taskbalance.bench.runner import Runner

RESULTS = Path(__file__).parent / "results" / "epoch_overhead.json"
REQUIREMENT = 1.1


class HandLoop:
    """The minimal training loop on the same model, data and batches (see the module doc)."""

    def __init__(self, data: MultiTaskData, config: RunConfig) -> None:
        torch.manual_seed(config.seed)
        self.model = build_model(config.arch, data, data.task_names, config.model_options)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.tasks = data.task_names
        self.kinds = {t: data.task(t).kind for t in self.tasks}
        split = data.train
        self.x, self.x_cat, self.y = split.x, split.x_cat, split.y
        self.batch = config.batch_size
        self.shuffle = torch.Generator().manual_seed(config.seed)

    def loss(self, output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "regression":
            return F.mse_loss(output, target)
        if kind == "multiclass":
            return F.cross_entropy(output, target)
        return F.binary_cross_entropy_with_logits(output, target)

    def epoch(self) -> None:
        self.model.train()
        n = len(self.x)
        order = torch.randperm(n, generator=self.shuffle)
        for start in range(0, n, self.batch):
            idx = order[start : start + self.batch]
            inputs = self.x[idx] if self.x_cat is None else (self.x[idx], self.x_cat[idx])
            _, out = self.model(inputs)
            loss = sum(self.loss(out[t], self.y[t][idx], self.kinds[t]) for t in self.tasks)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="qm9", help="qm9 (default) or multi_mnist")
    parser.add_argument(
        "--protocol",
        choices=("paper",),
        default=None,
        help="the data size and architecture of a bench protocol (default: --train-size rows)",
    )
    parser.add_argument("--train-size", type=int, default=None, help="default 10000")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile one runner epoch")
    parser.add_argument("--no-write", action="store_true", help="do not write the JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.protocol is None:
        preset = Protocol("", 1, 1, (1e-3,), None, "default", train_size=10_000)
    else:
        preset = protocol(args.protocol, args.dataset)
    train_size = args.train_size or preset.train_size
    bench = BenchConfig(
        dataset=args.dataset, train_size=train_size, data_options=dict(preset.data_options)
    )
    data = load_bench_data(bench)
    arch = preset.arch or "hps"
    config = RunConfig(
        method=parse_method_spec("ew"), arch=arch, batch_size=args.batch_size, epochs=1
    )
    steps = -(-len(data.train) // args.batch_size)
    print(
        f"{data.name}: {len(data.train)} training rows, {len(data.task_names)} tasks, {arch}, "
        f"batch {args.batch_size} ({steps} steps per epoch), {args.threads} thread(s)"
    )

    variants = {
        "hand": HandLoop(data, config).epoch,
        "runner": Runner(data, config, progress=False, record_every=20).train_epoch,
        "runner_no_recorder": Runner(data, config, progress=False).train_epoch,
    }
    for run in variants.values():  # warm-up: allocations, Adam state, lazy imports
        run()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(variants["runner"])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)

    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for index in range(args.rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            began = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - began)
    load_after = os.getloadavg()

    def ratio(name: str) -> float:
        return statistics.median(a / b for a, b in zip(seconds[name], seconds["hand"], strict=True))

    ratios = {name: ratio(name) for name in names if name != "hand"}
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name in names:
        extra = f"  ratio to hand {ratios[name]:.3f}" if name in ratios else ""
        print(f"{name:20s} median epoch {medians[name]:.3f} s "
              f"({1e3 * medians[name] / steps:.2f} ms/step){extra}")  # fmt: skip
    verdict = "meets" if ratios["runner"] <= REQUIREMENT else "EXCEEDS"
    print(f"runner / hand = {ratios['runner']:.3f}: {verdict} the {REQUIREMENT}x requirement; "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}")  # fmt: skip
    if args.no_write:
        return
    payload = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/epoch_overhead.py "
        + (f"--protocol {args.protocol} " if args.protocol else "")
        + f"--dataset {args.dataset} --train-size {len(data.train)} "
        f"--batch-size {args.batch_size} --rounds {args.rounds} --threads {args.threads}",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "dataset": data.name,
        "protocol": args.protocol,
        "architecture": arch,
        "train_rows": len(data.train),
        "tasks": len(data.task_names),
        "batch_size": args.batch_size,
        "steps_per_epoch": steps,
        "rounds": args.rounds,
        "epoch_seconds": seconds,
        "median_epoch_seconds": medians,
        "ratio_to_hand": ratios,
        "requirement": REQUIREMENT,
        "meets_requirement": ratios["runner"] <= REQUIREMENT,
    }
    path = RESULTS
    if args.protocol is not None:
        path = RESULTS.with_name(f"epoch_overhead_{args.protocol}_{args.dataset}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
