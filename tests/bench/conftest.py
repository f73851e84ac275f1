"""Shared fixture: stand a tiny, locally built archive in for a pinned registry archive."""

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from taskbalance.bench.data import cache


@pytest.fixture
def use_archive(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str, bytes], Path]:
    """Return ``put(key, data) -> cache_dir``: place ``data`` where ``fetch(key)`` looks for the
    archive and pin its sha256, so loaders read it through the real cache code, offline."""
    cache_dir = tmp_path / "cache"

    def put(key: str, data: bytes) -> Path:
        carrier = replace(cache.CARRIERS[key], sha256=hashlib.sha256(data).hexdigest())
        monkeypatch.setitem(cache.CARRIERS, key, carrier)
        cache_dir.mkdir(exist_ok=True)
        (cache_dir / carrier.filename).write_bytes(data)
        return cache_dir

    return put
