"""DeepSpeed ZeRO-1/2 on 2 gloo ranks (CPU): the method's step through
``taskbalance.integrations.deepspeed.backward`` equals one process on the joined batch, to
DeepSpeed's float32 reduction; ZeRO-3 and gradient accumulation are refused in one line."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from support import deepspeed_ranks, ranks

pytest.importorskip("deepspeed")

CONFIGS = [
    (1, "imtl_g", {"level": "feature"}),
    (2, "ew", {}),
    (2, "imtl_g", {"level": "feature"}),
    (2, "imtl_g", {"level": "parameter"}),
    (2, "imtl_l", {}),
]
IDS = [f"zero{stage}-{name}-{options.get('level', 'loss')}" for stage, name, options in CONFIGS]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepspeed")
    out_file = folder / "results.pt"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    arguments = (2, port, CONFIGS, str(out_file))
    mp.spawn(deepspeed_ranks.worker, args=arguments, nprocs=2, join=True)
    return torch.load(out_file)


@pytest.mark.parametrize(("index", "config"), list(enumerate(CONFIGS)), ids=IDS)
def test_zero_matches_one_process_on_the_joined_batch(results, index, config):
    _, name, options = config
    single = ranks.train(name, options, rank=0, world_size=1, ddp=False)
    for trained, expected in zip(results[index], single, strict=True):
        # DeepSpeed averages the gradients in float32 (EW too): 1e-7, not float64's 1e-12.
        torch.testing.assert_close(trained, expected, rtol=1e-6, atol=1e-7)


def test_zero3_and_gradient_accumulation_are_refused_in_one_line(results):
    zero3, accumulation = results["refusals"]
    assert zero3.startswith("ZeRO-3 gathers its partitioned parameters")
    assert accumulation.startswith("gradient_accumulation_steps is 2")
    assert "\n" not in zero3 + accumulation
