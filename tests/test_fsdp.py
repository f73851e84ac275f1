"""Under FSDP2 (2 gloo ranks on CPU, float64), every level equals one process on the joined
batch after several optimizer steps, with the collectives counted per step."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from support import fsdp_ranks, ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

CONFIGS = [
    ("ew", {}),
    ("imtl_l", {}),
    ("imtl_g", {"level": "feature"}),
    ("imtl_g", {"level": "parameter"}),
    ("imtl", {"level": "feature"}),
    ("imtl", {"level": "parameter"}),
    ("mgda", {"level": "feature"}),
    ("mgda", {"level": "parameter"}),
    ("emtl", {"level": "parameter"}),
    ("upgrad", {"level": "parameter"}),
]
IDS = [f"{name}-{options.get('level', 'loss')}" for name, options in CONFIGS]
WORLD = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    out_file = folder / "results.pt"
    mp.spawn(
        fsdp_ranks.worker,
        args=(WORLD, str(folder / "init"), CONFIGS, str(out_file)),
        nprocs=WORLD,
        join=True,
    )
    return torch.load(out_file)


@pytest.mark.parametrize(("index", "config"), list(enumerate(CONFIGS)), ids=IDS)
def test_fsdp2_matches_one_process_on_the_joined_batch(results, index, config):
    name, options = config
    single = ranks.train(name, options, rank=0, world_size=1, ddp=False)
    for sharded, expected in zip(results[index]["params"], single, strict=True):
        torch.testing.assert_close(sharded, expected, rtol=1e-12, atol=1e-12)


def test_adatask_updates_each_ranks_shards_as_one_process_updates_the_whole(results):
    single = fsdp_ranks.train_adatask(rank=0, world_size=1)
    for sharded, expected in zip(results["adatask"], single, strict=True):
        torch.testing.assert_close(sharded, expected, rtol=1e-12, atol=1e-12)


def test_the_functional_form_returns_the_sharded_update_backward_writes(results):
    assert results["functional"] <= 1e-15


def _per_step(results, index, kind):
    counts = [calls.get(kind, 0) for calls, _ in results[index]["counts"]]
    assert len(set(counts)) == 1, f"{CONFIGS[index]}: {kind} differs between steps: {counts}"
    return counts[0]


@pytest.mark.parametrize(("index", "config"), list(enumerate(CONFIGS)), ids=IDS)
def test_every_level_makes_the_all_gathers_of_one_ordinary_backward(results, index, config):
    plain = _per_step(results, 0, "all_gather")
    assert _per_step(results, index, "all_gather") == plain


def test_the_parameter_level_reduce_scatters_each_task_once_into_the_shards(results):
    plain = _per_step(results, 0, "reduce_scatter")  # one per unit
    index = CONFIGS.index(("imtl_g", {"level": "parameter"}))
    # T of ours (all trunk units in one each), the heads' unit by FSDP; the trunk's own is not
    # needed, since its gradient is written sharded.
    assert _per_step(results, index, "reduce_scatter") == ranks.NUM_TASKS + plain - 1
    trunk = ranks.Net().trunk
    padded = sum(
        math.ceil(p.shape[0] / WORLD) * WORLD * math.prod(p.shape[1:]) for p in trunk.parameters()
    )
    heads = sum(
        math.ceil(p.shape[0] / WORLD) * WORLD * math.prod(p.shape[1:])
        for p in ranks.Net().heads.parameters()
    )
    _, numel = results[index]["counts"][0]
    assert numel["reduce_scatter"] == ranks.NUM_TASKS * padded + heads


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (("ew", {}), 1),
        (("imtl_g", {"level": "feature"}), 2),
        (("imtl_g", {"level": "parameter"}), 2),
    ],
)
def test_gradient_levels_all_reduce_the_losses_and_one_t_by_t_gramian(results, config, expected):
    index = CONFIGS.index(config)
    assert _per_step(results, index, "all_reduce") == expected
    _, numel = results[index]["counts"][0]
    assert numel["all_reduce"] == ranks.NUM_TASKS + (expected - 1) * ranks.NUM_TASKS**2


def test_mixed_precision_with_bf16_parameters_stays_finite(results):
    mixed = results["mixed"]
    assert mixed["finite"]
    assert bool(mixed["weights"].isfinite().all())


def test_a_method_that_needs_the_jacobian_is_refused_in_one_line(results):
    message = results["refusal"]
    assert message.startswith("GradDrop needs the whole T x n Jacobian, which FSDP shards")
    assert "\n" not in message


def test_fsdp1_is_refused_in_one_line_at_both_levels(results):
    for message in results["fsdp1"]:
        assert message.startswith("the model is sharded with FSDP1 (FullyShardedDataParallel)")
        assert "fully_shard" in message and "\n" not in message


def test_the_torchrun_example_trains_and_makes_the_collectives_the_docs_state():
    example = Path(__file__).parents[1] / "examples" / "fsdp_multitask.py"
    with socket.socket() as probe:  # a free port for torchrun's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_addr", "127.0.0.1", "--master_port", str(port), str(example), "--steps", "2"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = "{'all_gather': 3, 'all_reduce': 2, 'reduce_scatter': 4}"
    assert f"collectives of the last step: {expected}" in done.stdout
