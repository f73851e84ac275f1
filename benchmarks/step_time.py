"""Step time and peak memory of each way to back-propagate T task losses, side by side.

Every variant runs one training step's forward and backward on the same model and batch; the
variants are interleaved round after round so that the machine's noise hits them alike, and each
is reported as the ratio of its median step time to a plain ``sum(losses).backward()`` step.
Peak memory is read off the profiler's CPU memory timeline for the first step of a fresh model
(so that buffers reused across steps are counted), minus the plain step's peak; it is compared
with the size of the T x n Jacobian of the shared parameters.

Models: ``small_mlp`` (64 -> 256 -> 256 trunk, batch 256: a step of about a millisecond, where
fixed per-step work shows) with 10-class heads, ``small_mlp_mse`` (the same trunk with 1-output
MSE heads: the lightest heads, so the step is mostly the trunk's), ``mlp`` (256-512-512-256,
batch 64) and ``cnn`` (two conv layers and a linear layer, batch 64). Every step time is given
as a ratio to the plain ``sum(losses).backward()`` step and to EW's ``method.backward`` step
(which carries the library's own per-step work). Sections, all printed and written to the
result file:

- per model and T: every variant's step time (``imtl_g_parameter`` takes the default
  ``gramian_path="auto"``, ``imtl_g_parameter_jacobian`` forces the Jacobian path);
- overhead: the extra time of ``method.backward`` over the plain step's backward on the same
  losses, on the tiny model (where that is the fixed per-step work) and the small MLP, T = 3;
- zoo: every registered method at its default level, at T = 3 and T = 32 on the MLP, also as a
  ratio to IMTL-G's step at the same level;
- memory: the extra peak memory of the parameter-level step, layerwise against the Jacobian;
- targets: each figure of the speed issue, with its target and whether it was met.

Usage:
    python benchmarks/step_time.py                      # everything
    python benchmarks/step_time.py --tasks 3 32 --rounds 10 --no-memory --no-zoo
Writes benchmarks/results/step_time.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import taskbalance

RESULTS = Path(__file__).parent / "results" / "step_time.json"
BATCH = {"tiny": 16, "small_mlp": 256, "small_mlp_mse": 256, "mlp": 64, "cnn": 64}
TIMED_MODELS = ("small_mlp", "small_mlp_mse", "mlp", "cnn")
"""The models of the step-time table; ``tiny`` (16 -> 32, batch 16) serves the overhead section,
where its tensor work is negligible, so that what is left is the fixed per-step work."""


class MultiTaskNet(nn.Module):
    """A trunk read by T small heads; ``losses`` returns the T losses and the trunk output."""

    def __init__(self, kind: str, num_tasks: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        if kind == "tiny":
            self.trunk = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
            width = 32
        elif kind in ("small_mlp", "small_mlp_mse"):
            self.trunk = nn.Sequential(
                nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU()
            )
            width = 256
        elif kind == "mlp":
            self.trunk: nn.Module = nn.Sequential(
                nn.Linear(256, 512),
                nn.ReLU(),
                nn.Linear(512, 512),
                nn.ReLU(),
                nn.Linear(512, 256),
                nn.ReLU(),
            )
            width = 256
        elif kind == "cnn":
            self.trunk = nn.Sequential(
                nn.Conv2d(1, 16, 5),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 5),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(32 * 4 * 4, 128),
                nn.ReLU(),
            )
            width = 128
        else:
            raise ValueError(f"unknown model {kind!r}; valid: {', '.join(BATCH)}")
        self.regression = kind.endswith("_mse")
        outputs = 1 if self.regression else 10
        self.heads = nn.ModuleList(nn.Linear(width, outputs) for _ in range(num_tasks))
        self.kind = kind

    def batch(self) -> tuple[Tensor, Tensor]:
        """A fixed batch, on the model's device."""
        gen = torch.Generator().manual_seed(1)
        batch = BATCH[self.kind]
        features = {"tiny": (16,), "mlp": (256,), "cnn": (1, 28, 28)}.get(self.kind, (64,))
        x = torch.randn((batch, *features), generator=gen)
        if self.regression:
            y = torch.randn((batch, len(self.heads)), generator=gen)
        else:
            y = torch.randint(0, 10, (batch, len(self.heads)), generator=gen)
        device = self.heads[0].weight.device
        return x.to(device), y.to(device)

    def losses(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        z = self.trunk(x)
        if self.regression:
            losses = [
                nn.functional.mse_loss(head(z)[:, 0], y[:, t]) for t, head in enumerate(self.heads)
            ]
        else:
            losses = [
                nn.functional.cross_entropy(head(z), y[:, t]) for t, head in enumerate(self.heads)
            ]
        return losses, z


def _variants(model: MultiTaskNet) -> dict[str, Callable[[Tensor, Tensor], None]]:
    num_tasks = len(model.heads)
    shared = list(model.trunk.parameters())

    def plain(x, y):
        losses, _ = model.losses(x, y)
        sum(losses).backward()

    def loop_t_backward(x, y):
        losses, _ = model.losses(x, y)
        for t, loss in enumerate(losses):
            loss.backward(retain_graph=t < num_tasks - 1)

    def method_step(method, **options):
        def step(x, y):
            losses, z = model.losses(x, y)
            method.backward(losses, shared=shared, features=z, **options)

        return step

    variants = {
        "sum_backward": plain,
        "ew": method_step(taskbalance.EW()),
        "imtl_l": method_step(taskbalance.IMTLL(tasks=num_tasks)),
        "imtl_g_feature": method_step(taskbalance.IMTLG(level="feature")),
        "imtl_g_feature_loop": method_step(
            taskbalance.IMTLG(level="feature"), jacobian_mode="loop"
        ),
        "imtl_g_parameter": method_step(taskbalance.IMTLG(level="parameter")),
        "imtl_g_parameter_jacobian": method_step(
            taskbalance.IMTLG(level="parameter"), gramian_path="jacobian"
        ),
        "imtl_feature": method_step(taskbalance.IMTL(tasks=num_tasks)),
        "loop_t_backward": loop_t_backward,
    }
    try:
        from torchjd.aggregation import IMTLG as TorchJDIMTLG
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:
        return variants
    aggregator = TorchJDIMTLG()

    def torchjd_imtlg(x, y):
        losses, z = model.losses(x, y)
        mtl_backward(losses, features=z, shared_params=shared)
        jac_to_grad(shared, aggregator)

    variants["torchjd_imtlg"] = torchjd_imtlg
    return variants


def time_variants(kind: str, num_tasks: int, rounds: int, zoo: bool = False) -> dict[str, float]:
    """Median step time of every variant, interleaved round by round (seconds)."""
    model = MultiTaskNet(kind, num_tasks)
    x, y = model.batch()
    variants = _zoo_variants(model) if zoo else _variants(model)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds + 2):
        for name, step in variants.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step(x, y)
            elapsed = time.perf_counter() - start
            if round_ >= 2:  # the first two rounds warm up caches and allocators
                samples[name].append(elapsed)
    return {name: statistics.median(times) for name, times in samples.items()}


def _zoo_variants(model: MultiTaskNet) -> dict[str, Callable[[Tensor, Tensor], None]]:
    """The plain step, every registered method at its default level, and IMTL-G at parameter
    level (``imtl_g@parameter``), the reference of the methods that default to it."""
    shared = list(model.trunk.parameters())

    def plain(x, y):
        losses, _ = model.losses(x, y)
        sum(losses).backward()

    def method_step(method):
        def step(x, y):
            losses, z = model.losses(x, y)
            method.backward(losses, shared=shared, features=z)

        return step

    variants = {"sum_backward": plain}
    for name in taskbalance.list_methods():
        variants[name] = method_step(taskbalance.get_method(name, tasks=len(model.heads)))
    variants["imtl_g@parameter"] = method_step(taskbalance.IMTLG(level="parameter"))
    return variants


def zoo_ratios_to_imtl_g(times: dict[str, float]) -> dict[str, float]:
    """Each gradient-level method's step time over IMTL-G's at the method's default level."""
    reference = {"feature": times["imtl_g"], "parameter": times["imtl_g@parameter"]}
    ratios = {}
    for name in taskbalance.list_methods():
        level = taskbalance.get_method(name, tasks=2).level
        if level is not None:
            ratios[name] = times[name] / reference[level]
    return ratios


def fixed_overhead(kind: str, num_tasks: int, rounds: int) -> dict[str, float]:
    """Median extra time (s) of each step's backward call over the plain
    ``sum(losses).backward()`` on the same losses, the calls interleaved round by round.

    On the ``tiny`` model this is the fixed per-step work (checks, solves, bookkeeping, the
    hooks of the feature level's one backward): its tensors are too small for their arithmetic
    to count. On a larger model it also holds the work that grows with the representation, e.g.
    IMTL-G's per-task z-gradients stacked, their Gramian and their combination. The whole call
    is timed, autograd's engine included, so that work done inside the backward (the feature
    level solves inside it) is counted like any other."""
    model = MultiTaskNet(kind, num_tasks)
    x, y = model.batch()
    shared = list(model.trunk.parameters())
    methods: dict[str, taskbalance.Method | None] = {
        "sum_backward": None,
        "ew": taskbalance.EW(),
        "imtl_g_feature": taskbalance.IMTLG(level="feature"),
        "imtl_feature": taskbalance.IMTL(tasks=num_tasks),
        "imtl_g_parameter": taskbalance.IMTLG(level="parameter"),
    }
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(rounds + 5):
        for name, method in methods.items():
            model.zero_grad(set_to_none=True)
            losses, z = model.losses(x, y)
            start = time.perf_counter()
            if method is None:
                sum(losses).backward()
            else:
                method.backward(losses, shared=shared, features=z)
            if round_ >= 5:
                samples[name].append(time.perf_counter() - start)
    plain = statistics.median(samples["sum_backward"])
    return {name: statistics.median(times) - plain for name, times in samples.items()}


def _peak_bytes(step: Callable[[Tensor, Tensor], None], x: Tensor, y: Tensor) -> int:
    """Peak bytes allocated during one step, from the profiler's CPU memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step(x, y)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return int(max(sum(row) for row in sizes))


def peak_extra_memory(kind: str, num_tasks: int, variants: list[str]) -> dict[str, int]:
    """Peak memory of each variant's FIRST step (so reused buffers are counted) minus that of
    the plain step, each on a fresh model."""

    def peak(variant: str) -> int:
        model = MultiTaskNet(kind, num_tasks)
        x, y = model.batch()
        return _peak_bytes(_variants(model)[variant], x, y)

    base = peak("sum_backward")
    return {variant: peak(variant) - base for variant in variants}


MEMORY_VARIANTS = [
    "imtl_g_parameter",
    "imtl_g_parameter_jacobian",
    "loop_t_backward",
    "torchjd_imtlg",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(TIMED_MODELS),
        choices=TIMED_MODELS,
        help="trunks to time",
    )
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 3, 5, 8, 32])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per variant")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--no-zoo", action="store_true", help="skip timing every method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    # FAMO's reminder to call update() is not what is measured here.
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    rows = []
    for kind in args.models:
        for num_tasks in args.tasks:
            times = time_variants(kind, num_tasks, args.rounds)
            row = _row(kind, num_tasks, times)
            if not args.no_memory:
                row["extra_peak_bytes"] = peak_extra_memory(kind, num_tasks, MEMORY_VARIANTS)
            rows.append(row)
            print(_format_row(row), flush=True)
    overhead = {}
    for kind in ("tiny", "small_mlp"):
        times = fixed_overhead(kind, 3, 10 * args.rounds)
        overhead[kind] = {name: 1e3 * t for name, t in times.items()}
        label = f"overhead (ms over the plain backward, {kind} T=3):"
        print(label, _format_numbers(overhead[kind]), flush=True)
    zoo = []
    if not args.no_zoo:
        for num_tasks in (3, 32):
            times = time_variants("mlp", num_tasks, args.rounds, zoo=True)
            row = _row("mlp", num_tasks, times)
            row["ratio_to_imtl_g_same_level"] = zoo_ratios_to_imtl_g(times)
            zoo.append(row)
            print("zoo", _format_row(row), flush=True)
            print("zoo / imtl_g", _format_numbers(row["ratio_to_imtl_g_same_level"]), flush=True)
    targets = _targets(rows, overhead, zoo)
    for target in targets:
        print("target", _format_target(target), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                "torch": torch.__version__,
                "batch": BATCH,
                "rounds": args.rounds,
                "rows": rows,
                "overhead_ms": overhead,
                "zoo": zoo,
                "targets": targets,
            },
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")


def _targets(
    rows: list[dict], overhead: dict[str, dict[str, float]], zoo: list[dict]
) -> list[dict]:
    """Every figure of the speed issue next to its target (a figure whose run was skipped,
    e.g. by --models or --no-zoo, is left out)."""
    found = []

    def add(figure: str, value: float, bound: float, at_most: bool = True) -> None:
        met = value <= bound if at_most else value >= bound
        found.append(
            {"figure": figure, "value": value, "target": bound, "at_most": at_most, "met": met}
        )

    add("fixed overhead of ew (ms), tiny T=3", overhead["tiny"]["ew"], 0.15)
    add("fixed overhead of imtl_g_feature (ms), tiny T=3", overhead["tiny"]["imtl_g_feature"], 0.2)
    by_key = {(row["model"], row["tasks"]): row for row in rows}
    row = by_key.get(("small_mlp_mse", 3))
    if row:
        add(
            "imtl_g_feature / sum_backward, small_mlp_mse T=3",
            row["ratio_to_sum_backward"]["imtl_g_feature"],
            1.3,
        )
    for model, tasks, bound in (("small_mlp", 3, 1.3), ("cnn", 3, 1.15)):
        row = by_key.get((model, tasks))
        if row:
            ratios = row["ratio_to_sum_backward"]
            add(
                f"imtl_g_feature / ew, {model} T={tasks}",
                ratios["imtl_g_feature"] / ratios["ew"],
                bound,
            )
    for model in ("mlp", "cnn"):
        row = by_key.get((model, 32))
        if not row:
            continue
        ratios = row["ratio_to_sum_backward"]
        add(
            f"imtl_g_parameter / loop_t_backward, {model} T=32",
            ratios["imtl_g_parameter"] / ratios["loop_t_backward"],
            1.1,
        )
        if "torchjd_imtlg" in ratios:
            add(
                f"torchjd_imtlg / imtl_g_parameter, {model} T=32",
                ratios["torchjd_imtlg"] / ratios["imtl_g_parameter"],
                1.5,
                at_most=False,
            )
        if "extra_peak_bytes" in row:
            extra = row["extra_peak_bytes"]["imtl_g_parameter"] / row["jacobian_bytes"]
            add(f"extra peak memory of imtl_g_parameter (x Jacobian), {model} T=32", extra, 0.5)
    for row in zoo:
        for name, ratio in row["ratio_to_imtl_g_same_level"].items():
            method = type(taskbalance.get_method(name, tasks=2))
            if method.requires is taskbalance.Requirement.GRAMIAN and name != "imtl_g":
                add(f"{name} / imtl_g (same level), mlp T={row['tasks']}", ratio, 1.2)
            elif name in ("moco", "excess_mtl"):
                add(f"{name} / imtl_g (same level), mlp T={row['tasks']}", ratio, 2.0)
    return found


def _format_target(target: dict) -> str:
    sign = "<=" if target["at_most"] else ">="
    verdict = "met" if target["met"] else "MISSED"
    return f"{target['figure']}: {target['value']:.3g} (target {sign} {target['target']}) {verdict}"


def _format_numbers(numbers: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.3g}" for name, value in numbers.items())


def _row(kind: str, num_tasks: int, times: dict[str, float]) -> dict:
    shared_numel = sum(p.numel() for p in MultiTaskNet(kind, num_tasks).trunk.parameters())
    return {
        "model": kind,
        "tasks": num_tasks,
        "shared_params": shared_numel,
        "batch": BATCH[kind],
        "jacobian_bytes": num_tasks * shared_numel * 4,
        "sum_backward_ms": 1e3 * times["sum_backward"],
        "ratio_to_sum_backward": {n: t / times["sum_backward"] for n, t in times.items()},
        "ratio_to_ew": {n: t / times["ew"] for n, t in times.items() if n != "ew"},
    }


def _format_row(row: dict) -> str:
    ratios = row["ratio_to_sum_backward"]
    parts = [f"{row['model']} T={row['tasks']:>2} plain={row['sum_backward_ms']:.1f}ms"]
    parts += [
        f"{name}={ratio:.2f}x/{row['ratio_to_ew'][name]:.2f}xEW"
        for name, ratio in ratios.items()
        if name not in ("sum_backward", "ew")
    ]
    if "extra_peak_bytes" in row:
        jacobian = row["jacobian_bytes"]
        extras = row["extra_peak_bytes"].items()
        parts += [f"mem/{name}={extra / jacobian:.2f}J" for name, extra in extras]
    return " ".join(parts)


if __name__ == "__main__":
    main()
