"""The benchmark runner under torch.distributed (2 gloo ranks on CPU, float64): the same final
parameters as one process on the joined batches, resumable checkpoints, one rank talking."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from support.bench_ranks import spawn_worker
from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec
from taskbalance.bench.method_specs import parse_method_spec
from taskbalance.bench.parallel import World, shard
from taskbalance.bench.run_config import RunConfig
from taskbalance.bench.runner import Runner

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

# Loss level, feature-level Gramian, parameter-level Jacobian reduction, a method with its own
# parameters (their gradients averaged by the library), and AdaTask's per-task gradients.
METHODS = ["ew", "imtl_g", "imtl_g:level=parameter", "imtl_l", "adatask"]
RECORD_EVERY = 2


def synthetic() -> MultiTaskData:
    """Two regressions of different scales and a binary task, float64. 50 training rows in
    batches of 16: the last batch has 2 rows, one per rank (a ragged, still equal, shard)."""
    g = torch.Generator().manual_seed(0)

    def split(rows: int) -> Split:
        x = torch.randn(rows, 5, generator=g, dtype=torch.float64)
        noise = torch.randn(rows, 3, generator=g, dtype=torch.float64)
        y = {
            "small": 0.1 * x[:, 0] + 0.05 * noise[:, 0],
            "large": 3 * x[:, 1] - x[:, 2] + 0.3 * noise[:, 1],
            "flag": (x[:, 3] + 0.5 * noise[:, 2] > 0).double(),
        }
        return Split(x, y)

    tasks = (
        TaskSpec("small", "regression", 1, "mae", False),
        TaskSpec("large", "regression", 1, "mae", False),
        TaskSpec("flag", "binary", 1, "auc", True),
    )
    return MultiTaskData("synthetic", tasks, split(50), split(24), split(24), "synthetic", "none")


def configs() -> list[RunConfig]:
    options = {"hidden": 12, "tower": 6}
    return [
        RunConfig(
            method=parse_method_spec(m), epochs=2, batch_size=16, lr=3e-3, model_options=options
        )
        for m in METHODS
    ]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-ddp")
    out_file = folder / "results.pt"
    (folder / "ckpt").mkdir()
    mp.spawn(
        spawn_worker,
        args=(2, str(folder / "init"), synthetic(), configs(), str(out_file), torch.float64,
              str(folder / "ckpt"), RECORD_EVERY),
        nprocs=2,
        join=True,
    )  # fmt: skip
    return torch.load(out_file, weights_only=False), folder / "ckpt"


@pytest.fixture(scope="module")
def one_process():
    data = synthetic()
    runners = [
        Runner(data, c, progress=False, dtype=torch.float64, record_every=RECORD_EVERY)
        for c in configs()
    ]
    return [(runner, runner.run()) for runner in runners]


# Adam divides by sqrt(v) + eps: a rounding difference (~1e-16 relative) in a gradient component
# that is itself near 0 moves that component's step by up to lr * 1e-16 / eps ~ 1e-11 per step.
# Anything else is float64 rounding; a missing reduction or a wrong shard is off by >= 1e-3.
TOLERANCE = {"rtol": 1e-8, "atol": 1e-9}


@pytest.mark.parametrize("index", range(len(METHODS)), ids=METHODS)
def test_two_ranks_end_with_the_single_process_parameters(two_ranks, one_process, index):
    results, _ = two_ranks
    runner, _ = one_process[index]
    expected = [p.detach() for p in runner.model.parameters()]
    assert len(results[index]["params"]) == len(expected)
    for got, want in zip(results[index]["params"], expected, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE)


@pytest.mark.parametrize("index", range(len(METHODS)), ids=METHODS)
def test_two_ranks_report_the_single_process_losses_metrics_and_diagnostics(
    two_ranks, one_process, index
):
    results, _ = two_ranks
    _, result = one_process[index]
    got = results[index]
    for mine, theirs in zip(got["history"], result.history, strict=True):
        for key in ("train_loss", "val_loss", "val_metric", "weights"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-8, abs=1e-9), key
    assert got["test"] == pytest.approx(result.test_metrics, rel=1e-8, abs=1e-9)
    assert [r["metric"] for r in got["records"]] == [r["metric"] for r in result.records]
    assert [r["value"] for r in got["records"]] == pytest.approx(
        [r["value"] for r in result.records], rel=1e-6, abs=1e-9
    )


def test_a_distributed_run_resumes_from_its_checkpoint_to_identical_parameters(two_ranks):
    results, folder = two_ranks
    for index in range(len(METHODS)):
        for resumed, full in zip(results[index]["resumed"], results[index]["params"], strict=True):
            assert torch.equal(resumed, full)
    assert sorted(p.name for p in folder.glob("*.pt")) == sorted(
        [f"{i}.pt" for i in range(len(METHODS))] + [f"{i}-cut.pt" for i in range(len(METHODS))]
    )


def test_each_rank_trains_on_its_half_of_every_batch(two_ranks, one_process):
    results, _ = two_ranks
    runner, _ = one_process[0]
    assert runner.rows_trained == 2 * 50
    assert all(entry["rows"] == [50, 50] for entry in results.values())  # 25 a rank an epoch


def test_only_rank_0_logs_and_shows_progress(two_ranks):
    results, _ = two_ranks
    assert all(entry["quiet"] == [False, True] for entry in results.values())


def test_gradient_methods_record_r_spread_and_adatask_au_shares_under_two_ranks(two_ranks):
    results, _ = two_ranks
    metrics = {m: {r["metric"] for r in results[i]["records"]} for i, m in enumerate(METHODS)}
    assert "r_spread" in metrics["imtl_g"] and "r_spread" not in metrics["ew"]
    assert "au_share" in metrics["adatask"]


def test_shards_are_equal_and_contiguous_and_drop_at_most_size_minus_one_rows():
    index = torch.arange(11)
    parts = [shard(index, World(rank, 3)) for rank in range(3)]
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert torch.equal(shard(index, World()), index)
