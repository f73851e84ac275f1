"""Run ``taskbalance bench`` in this (fresh) process on a tiny QM9 wheel, offline.

Usage: ``python bench_fresh.py WHEEL CACHE_DIR -- BENCH_ARGS...``. The wheel is served from
``CACHE_DIR`` as if fetched (its sha256 pinned in place of the real archive's) and QM9 is split
60 / 20 / rest instead of 110,000 / 10,000 / rest; everything else is the real command, so the
descriptor cache in ``CACHE_DIR`` is written by the first run and read by later ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys
from pathlib import Path

from taskbalance.bench.data import cache, registry
from taskbalance.bench.data.qm9 import load_qm9
from taskbalance.cli import main

if __name__ == "__main__":
    wheel, cache_dir = Path(sys.argv[1]), Path(sys.argv[2])
    argv = sys.argv[sys.argv.index("--") + 1 :]
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    cache.CARRIERS["qm9"] = dataclasses.replace(cache.CARRIERS["qm9"], sha256=sha)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / cache.CARRIERS["qm9"].filename).write_bytes(wheel.read_bytes())
    registry._LOADERS["qm9"] = functools.partial(load_qm9, n_train=60, n_val=20)
    sys.exit(main([*argv, "--cache-dir", str(cache_dir)]))
