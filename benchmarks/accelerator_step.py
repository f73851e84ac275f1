"""Step time and host synchronisations per step on an accelerator, side by side.

The GPU half of the speed issue: on a CUDA device, each variant's step (forward and backward)
is timed between ``torch.cuda.synchronize()`` calls, interleaved round by round, and reported
as a ratio to the plain ``sum(losses).backward()`` step; then one step of each variant runs
under ``torch.cuda.set_sync_debug_mode("warn")``, which warns at every operation that makes the
host wait for the device, and the warnings are counted. At T = 3 the T x T solves run on the
device (:mod:`taskbalance.methods._device_solvers`); at T = 32, above their size limit, the
face solvers and IMTL-G's come to the host (one read), which is the device-against-host
comparison. ``jacobian_mode`` ``"batched"`` (one vmapped backward, the default off the CPU) and
``"loop"`` (T backward calls) are both timed at parameter level. Every method step passes
``on_nonfinite="propagate"`` (the setting with no read; ``"raise"`` reads the T losses once),
and ``imtl_g_feature_checked`` keeps the default ``"raise"`` to show that read.

On the CPU (``--device cpu``) the same table is timed without synchronisation counts: a dry
run of the script, not a GPU figure.

Usage:
    python benchmarks/accelerator_step.py                   # CUDA, every model, T = 3 and 32
    python benchmarks/accelerator_step.py --device cpu --models small_mlp_mse --rounds 3
Writes benchmarks/results/accelerator_step_<device type>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import taskbalance
from step_time import MultiTaskNet

RESULTS = Path(__file__).parent / "results"
MODELS = ("small_mlp_mse", "mlp", "cnn")


def _variants(model: MultiTaskNet) -> dict[str, Callable[[], None]]:
    """Every step to compare, each a closure over the model and its batch."""
    x, y = model.batch()
    shared = list(model.trunk.parameters())
    num_tasks = len(model.heads)

    def plain() -> None:
        losses, _ = model.losses(x, y)
        sum(losses).backward()

    def method_step(method: taskbalance.Method, **options) -> Callable[[], None]:
        options.setdefault("on_nonfinite", "propagate")

        def step() -> None:
            losses, z = model.losses(x, y)
            method.backward(losses, shared=shared, features=z, **options)

        return step

    def method(name: str, **options) -> taskbalance.Method:
        return taskbalance.get_method(name, tasks=num_tasks, **options)

    return {
        "sum_backward": plain,
        "ew": method_step(method("ew")),
        "imtl_g_feature": method_step(method("imtl_g", level="feature")),
        "imtl_g_feature_checked": method_step(
            method("imtl_g", level="feature"), on_nonfinite="raise"
        ),
        "imtl_feature": method_step(method("imtl")),
        "imtl_g_parameter_batched": method_step(
            method("imtl_g", level="parameter"), jacobian_mode="batched"
        ),
        "imtl_g_parameter_loop": method_step(
            method("imtl_g", level="parameter"), jacobian_mode="loop"
        ),
        "mgda_feature": method_step(method("mgda", level="feature")),
        "cagrad_parameter": method_step(method("cagrad")),
        "nash_mtl_parameter": method_step(method("nash_mtl")),
        "emtl_parameter": method_step(method("emtl")),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model: MultiTaskNet, device: torch.device, rounds: int) -> dict[str, float]:
    """Median seconds per step of every variant, interleaved round by round."""
    variants = _variants(model)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds + 2):
        for name, step in variants.items():
            model.zero_grad(set_to_none=True)
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            if round_ >= 2:  # warm-up: allocator, kernels, the methods' first-step state
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def count_syncs(model: MultiTaskNet) -> dict[str, int]:
    """Operations that made the host wait for the device, in one warmed-up step of each
    variant (``torch.cuda.set_sync_debug_mode("warn")`` warns once per such operation)."""
    counts = {}
    for name, step in _variants(model).items():
        step()  # first-step state and lazy initialisation are not what is counted
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[name] = sum("synchroniz" in str(warning.message) for warning in caught)
        model.zero_grad(set_to_none=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--tasks", nargs="+", type=int, default=[3, 32])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per variant")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu for a dry run")
    # FAMO's reminder and the stale-parameter warnings are not what is measured here.
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}", flush=True)
    rows = []
    for kind in args.models:
        for num_tasks in args.tasks:
            model = MultiTaskNet(kind, num_tasks).to(device)
            times = time_steps(model, device, args.rounds)
            plain = times["sum_backward"]
            row = {
                "model": kind,
                "tasks": num_tasks,
                "sum_backward_ms": 1e3 * plain,
                "ratio_to_sum_backward": {k: t / plain for k, t in times.items()},
                "syncs_per_step": count_syncs(model) if device.type == "cuda" else None,
            }
            rows.append(row)
            ratios = " ".join(f"{k}={v:.2f}x" for k, v in row["ratio_to_sum_backward"].items())
            print(f"{kind} T={num_tasks} plain={1e3 * plain:.2f}ms {ratios}", flush=True)
            if row["syncs_per_step"] is not None:
                syncs = " ".join(f"{k}={v}" for k, v in row["syncs_per_step"].items())
                print(f"  syncs per step: {syncs}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"accelerator_step_{device.type}.json"
    meta = {"device": name, "torch": torch.__version__, "rounds": args.rounds}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
