"""Archive readers: ar (for .deb), tar members and the IDX image format."""

import gzip
import io
import tarfile

import numpy as np
import pytest

from taskbalance.bench.data.archives import (
    parse_idx,
    read_ar,
    read_deb_members,
    read_tar_members,
    write_ar,
)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def test_ar_round_trip_with_odd_sizes_and_padding() -> None:
    members = {"debian-binary": b"2.0\n", "odd": b"abc", "even": b"abcd", "empty": b""}
    data = write_ar(members)
    assert data.startswith(b"!<arch>\n")
    assert read_ar(data) == members


def test_ar_reads_gnu_style_names_and_rejects_garbage() -> None:
    # GNU ar writes "name/" in the header; the trailing slash is not part of the name.
    data = write_ar({"data.tar.xz/": b"x"})
    assert list(read_ar(data)) == ["data.tar.xz"]
    with pytest.raises(ValueError, match="not an ar archive"):
        read_ar(b"PK\x03\x04")
    with pytest.raises(ValueError, match="corrupt ar member header"):
        read_ar(data[:-4] + b"zz\n\n")


def test_deb_members_come_from_data_tar(tmp_path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        info = tarfile.TarInfo("./usr/share/x.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    deb = tmp_path / "p.deb"
    deb.write_bytes(write_ar({"debian-binary": b"2.0\n", "data.tar.xz": buf.getvalue()}))
    assert read_deb_members(deb, ["usr/share/x.txt"]) == {"usr/share/x.txt": b"hello"}
    with pytest.raises(KeyError, match=r"missing\.txt"):
        read_deb_members(deb, ["missing.txt"])
    with pytest.raises(KeyError, match="nope"):
        read_tar_members(buf.getvalue(), ["nope"])


def test_idx_raw_and_gzipped() -> None:
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    raw = idx_bytes(images)
    np.testing.assert_array_equal(parse_idx(raw), images)
    np.testing.assert_array_equal(parse_idx(gzip.compress(raw)), images)
    with pytest.raises(ValueError, match="header says"):
        parse_idx(raw[:-1])
    with pytest.raises(ValueError, match="unsigned-byte"):
        parse_idx(b"\0\0\x0d\x01" + raw[4:])
