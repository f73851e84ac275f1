"""Under torch.distributed (2 gloo ranks on CPU), a method's step equals the single-process
step on the joined batch, to float64 precision."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from support import ranks
from taskbalance import list_methods

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

CONFIGS = [
    ("ew", {}, True),
    ("ew", {}, False),  # a plain model whose gradients the user averages
    ("imtl", {"level": "feature"}, True),
    ("imtl", {"level": "parameter"}, True),
    ("imtl_g", {"level": "parameter"}, False),
    ("imtl_l", {}, True),
    ("rlw", {"seed": 3}, True),  # stochastic: the same seed on every rank
    ("emtl", {}, True),
    ("emtl", {"level": "feature"}, True),
    ("mgda", {"level": "feature"}, True),
    ("mgda", {"level": "parameter"}, True),
    ("pcgrad", {"seed": 1}, True),
    ("graddrop", {"level": "feature", "seed": 2}, True),
    ("famo", {"update": "next_step"}, True),
]
AVAILABLE = [config for config in CONFIGS if config[0] in list_methods()]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    out_file = folder / "params.pt"
    mp.spawn(
        ranks.worker,
        args=(2, str(folder / "init"), AVAILABLE, str(out_file)),
        nprocs=2,
        join=True,
    )
    return torch.load(out_file)


@pytest.mark.parametrize(
    ("index", "config"),
    list(enumerate(AVAILABLE)),
    ids=[f"{c[0]}-{c[1]}-ddp={c[2]}" for c in AVAILABLE],
)
def test_two_ranks_match_one_process_on_the_joined_batch(two_rank_results, index, config):
    name, options, _ = config
    single = ranks.train(name, options, rank=0, world_size=1, ddp=False)
    for distributed, expected in zip(two_rank_results[index], single, strict=True):
        torch.testing.assert_close(distributed, expected, rtol=1e-10, atol=1e-12)


def test_a_nan_loss_on_one_rank_stops_every_rank(tmp_path):
    out_file = tmp_path / "raised.pt"
    mp.spawn(
        ranks.nan_on_one_rank_worker,
        args=(2, str(tmp_path / "init"), str(out_file)),
        nprocs=2,
        join=True,
    )
    messages = torch.load(out_file)
    assert all("'2' = nan" in message for message in messages), messages
