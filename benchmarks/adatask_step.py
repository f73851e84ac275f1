"""The AdaTask-Adam update's time and memory against one ``torch.optim.Adam(foreach=True)`` update.

Both optimizers hold the same shared parameters (an MLP trunk's). Each round times ``--steps``
updates of every variant, interleaved so that the machine's noise hits them alike; a variant's
time is its mean update time in its fastest round (noise from other processes only adds time;
the medians over rounds are saved too). Only the optimizer update is timed, not the backward
passes (the engine's cost, measured by ``benchmarks/step_time.py``): for Adam ``step()`` on a
ready ``.grad``; for AdaTask ``set_task_grads(blocks)`` + ``step()`` on ready per-task
gradients, handed over as ``opt.backward`` does (the optimizer may overwrite them: ``adatask``)
and as a caller who keeps them does (``adatask_kept``: one more allocation of T x the shared
parameters per step). The target is a ratio <= T: AdaTask does Adam's element-wise work on T
times the elements. As a memory-traffic reference, one Adam over T copies of the parameters
(what T independent optimizers would touch) is timed too: where T x n no longer fits in the CPU's
caches, even it costs more than T x Adam.

Memory is counted exactly from the optimizers' states: Adam keeps 2 buffers per parameter,
AdaTask 2T on a shared one; the per-task gradients (T buffers, transient) replace ``.grad``.

Usage:
    python benchmarks/adatask_step.py                 # T in {2, 3, 8}, both trunks
    python benchmarks/adatask_step.py --tasks 2 --rounds 5 --device cuda
Writes benchmarks/results/adatask_step.json and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from taskbalance.optim import AdaTaskAdam

RESULTS = Path(__file__).parent / "results" / "adatask_step.json"
TRUNKS = {
    "mlp": [256, 512, 512, 256],  # ~0.46 M parameters, as benchmarks/step_time.py
    "wide": [1024, 1024, 1024, 1024, 1024],  # ~4.2 M parameters
}


def trunk_parameters(widths: list[int], device: torch.device) -> list[nn.Parameter]:
    torch.manual_seed(0)
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(widths)]
    return [
        nn.Parameter(p.detach().to(device).clone()) for layer in layers for p in layer.parameters()
    ]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for key, value in state.items()
        if key != "step" and isinstance(value, torch.Tensor)
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(widths: list[int], num_tasks: int, rounds: int, steps: int, device: torch.device):
    adam_params = trunk_parameters(widths, device)
    ours_params = trunk_parameters(widths, device)
    adam = torch.optim.Adam(adam_params, lr=1e-6, foreach=True)
    ours = AdaTaskAdam(ours_params, lr=1e-6, shared=True)
    gen = torch.Generator(device=device).manual_seed(1)
    blocks = [torch.randn(num_tasks, *p.shape, generator=gen, device=device) for p in ours_params]
    for param, block in zip(adam_params, blocks, strict=True):
        param.grad = block.sum(0)

    def adam_update() -> None:
        adam.step()

    def adatask_update() -> None:
        # What opt.backward(losses) does: the optimizer may reuse the fresh per-task gradients
        # as scratch space (their values are overwritten, which does not matter for timing).
        ours.set_task_grads(blocks, consume=True)
        ours.step()

    def adatask_kept_update() -> None:
        # Gradients owned by the caller: the optimizer allocates its scratch space.
        kept.set_task_grads(blocks)
        kept.step()

    kept = AdaTaskAdam(trunk_parameters(widths, device), lr=1e-6, shared=True)
    # The memory-traffic reference: one Adam over T copies of the parameters (T x the elements,
    # what T independent Adam optimizers would touch).
    copies = [p for _ in range(num_tasks) for p in trunk_parameters(widths, device)]
    for param in copies:
        param.grad = torch.randn(param.shape, generator=gen, device=device)
    adam_copies = torch.optim.Adam(copies, lr=1e-6, foreach=True)
    variants = {
        "adam": adam_update,
        "adatask": adatask_update,
        "adatask_kept": adatask_kept_update,
        "adam_on_t_copies": adam_copies.step,
    }
    for update in variants.values():  # warm-up: creates the states, JIT paths, caches
        for _ in range(3):
            update()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, update in variants.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                update()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)
    # The fastest round is the least disturbed by other processes (noise only adds time).
    adam_s, ours_s, kept_s, copies_s = (
        min(times[name]) for name in ("adam", "adatask", "adatask_kept", "adam_on_t_copies")
    )
    medians = {f"{name}_median_ms": 1e3 * statistics.median(t) for name, t in times.items()}
    numel = sum(p.numel() for p in ours_params)
    adam_bytes, ours_bytes = state_bytes(adam), state_bytes(ours)
    return {
        "tasks": num_tasks,
        "shared_parameters": numel,
        "adam_ms": 1e3 * adam_s,
        "adatask_ms": 1e3 * ours_s,
        "ratio": ours_s / adam_s,
        "adatask_kept_ms": 1e3 * kept_s,
        "ratio_kept": kept_s / adam_s,
        "adam_on_t_copies_ms": 1e3 * copies_s,
        "ratio_to_adam_on_t_copies": ours_s / copies_s,
        "target_ratio": float(num_tasks),
        "within_target": ours_s / adam_s <= num_tasks,
        "adam_state_mb": adam_bytes / 2**20,
        "adatask_state_mb": ours_bytes / 2**20,
        "extra_state_mb": (ours_bytes - adam_bytes) / 2**20,
        "state_buffers_per_shared_parameter": ours_bytes / (numel * 4),
        "per_task_gradients_mb": num_tasks * numel * 4 / 2**20,
        **medians,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 8])
    parser.add_argument("--trunks", nargs="+", default=list(TRUNKS), choices=list(TRUNKS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows = []
    for trunk in args.trunks:
        for num_tasks in args.tasks:
            row = {
                "trunk": trunk,
                **measure(TRUNKS[trunk], num_tasks, args.rounds, args.steps, device),
            }
            rows.append(row)
            print(
                f"{trunk:5s} T={num_tasks:<2d} n={row['shared_parameters']:>8d}  "
                f"adam {row['adam_ms']:8.3f} ms  adatask {row['adatask_ms']:8.3f} ms  "
                f"ratio {row['ratio']:5.2f} (<= {num_tasks}; kept {row['ratio_kept']:5.2f}; "
                f"vs Adam on T copies {row['ratio_to_adam_on_t_copies']:4.2f})  "
                f"state {row['adam_state_mb']:6.1f} -> {row['adatask_state_mb']:6.1f} MB "
                f"({row['state_buffers_per_shared_parameter']:.0f} buffers/param)",
                flush=True,
            )
    result = {
        "benchmark": "adatask_step",
        "device": str(device)
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "dtype": "float32",
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
