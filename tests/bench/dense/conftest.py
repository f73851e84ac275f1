"""Shared by the dense tests: one torch thread, as ``taskbalance bench`` trains (``--threads``
default 1: small convolutions gain nothing from a second thread, and on a loaded machine two
threads make them many times slower), and a tiny MNIST stand-in (no download)."""

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """Tiny MNIST stand-in (raw IDX files, read with ``root=``): training images of classes
    0-4, test images of classes 5-9, each a filled square of random side (ink 255) on black."""
    root = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    for prefix, n, classes in (("train", 60, range(5)), ("t10k", 20, range(5, 10))):
        images = np.zeros((n, 28, 28))
        for image in images:
            half = rng.integers(4, 11)
            image[14 - half : 14 + half, 14 - half : 14 + half] = 255
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.choice(list(classes), size=n))
    return root
