"""Dense MultiMNIST: determinism, splits, and the synthetic geometry checked against the
formulas it is built from (occlusion, floor plane, void pixels, normals), on tiny MNIST-like
IDX files (no download)."""

import numpy as np
import pytest
import torch

from taskbalance.bench.dense.digits import (
    BACKGROUND,
    FAR,
    FLOOR_BOTTOM,
    FLOOR_TOP,
    NEAR,
    RELIEF,
    load_dense_multi_mnist,
    render,
)

CANVAS = 32


def test_the_same_seed_gives_the_same_scenes_and_another_seed_others(mnist_root):
    a = load_dense_multi_mnist(30, 10, seed=1, root=mnist_root)
    b = load_dense_multi_mnist(30, 10, seed=1, root=mnist_root)
    c = load_dense_multi_mnist(30, 10, seed=2, root=mnist_root)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).inputs, getattr(b, split).inputs)
        for task in a.task_names:
            assert torch.equal(getattr(a, split).targets[task], getattr(b, split).targets[task])
    assert not torch.equal(a.train.inputs, c.train.inputs)


def test_shapes_splits_and_digits_by_source_file(mnist_root):
    data = load_dense_multi_mnist(30, 10, seed=0, root=mnist_root, canvas=CANVAS)
    assert (len(data.train), len(data.val), len(data.test)) == (27, 3, 10)
    assert data.in_channels == 1 and "SYNTHETIC GEOMETRY" in data.description
    x, y = data.test.batch(torch.arange(10))
    assert tuple(x.shape) == (10, 1, CANVAS, CANVAS)
    assert tuple(y["depth"].shape) == (10, 1, CANVAS, CANVAS)
    assert tuple(y["normal"].shape) == (10, 3, CANVAS, CANVAS)
    # Test scenes use the test file's digits only (classes 5-9), training scenes the training
    # file's (0-4); both have floor and void pixels.
    assert set(y["segmentation"].unique().tolist()) <= {-1, 5, 6, 7, 8, 9, BACKGROUND}
    train = set(data.train.targets["segmentation"].unique().tolist())
    assert train <= {-1, 0, 1, 2, 3, 4, BACKGROUND} and {-1, BACKGROUND} <= train
    assert abs(float(data.train.inputs.mean())) < 1e-5
    assert float(data.train.inputs.std()) == pytest.approx(1.0, abs=1e-3)


def full_square():
    return torch.full((28, 28), 255, dtype=torch.uint8)


@pytest.mark.parametrize("front", [0, 1])
def test_the_nearer_digit_hides_the_farther_one(front):
    # Digit 3 spans pixels 0-24 at depth 1.0; digit 7 at (8, 8) spans 16 pixels at depth 1.5:
    # its box lies inside 3's. Whichever is nearer owns the pixels of the overlap.
    depths = torch.tensor([[1.0, 1.5]]) if front == 0 else torch.tensor([[1.0, 0.9]])
    corners = torch.tensor([[[0.0, 0.0], [8.0, 8.0]]])
    images = torch.stack([full_square(), full_square()])[None]
    _, y = render(images, torch.tensor([[3, 7]]), depths, corners, CANVAS)
    seg, depth = y["segmentation"][0], y["depth"][0, 0]
    overlap = (slice(12, 20), slice(12, 20))
    expected = (3, 1.0 - RELIEF) if front == 0 else (7, 0.9 - RELIEF)
    assert (seg[overlap] == expected[0]).all()
    torch.testing.assert_close(depth[overlap], torch.full((8, 8), expected[1]))


def test_floor_depth_and_normals_follow_the_plane():
    # No digit in sight (its box is outside the canvas): floor everywhere.
    images = full_square()[None, None]
    _, y = render(images, torch.tensor([[1]]), torch.tensor([[1.0]]),
                  torch.tensor([[[100.0, 100.0]]]), CANVAS)  # fmt: skip
    rows = np.linspace(FLOOR_TOP, FLOOR_BOTTOM, CANVAS)
    np.testing.assert_allclose(y["depth"][0, 0].numpy(), np.repeat(rows[:, None], CANVAS, 1),
                               rtol=1e-6)  # fmt: skip
    assert (y["segmentation"] == BACKGROUND).all()
    # Interior rows: dD/dy per pixel is the slope, times (0.75 canvas / D) in scene units.
    slope = (FLOOR_BOTTOM - FLOOR_TOP) / (CANVAS - 1)
    for r in (1, CANVAS // 2, CANVAS - 2):
        dy = slope * 0.75 * CANVAS / rows[r]
        expected = np.array([0.0, dy, 1.0]) / np.hypot(dy, 1.0)
        np.testing.assert_allclose(y["normal"][0, :, r, 5].numpy(), expected, atol=1e-5)


def test_void_pixels_have_no_depth_or_normal_and_valid_normals_are_unit(mnist_root):
    data = load_dense_multi_mnist(30, 10, seed=0, root=mnist_root)
    y = data.train.targets
    void = y["segmentation"] == -1
    assert void.any()
    assert (y["depth"][:, 0][void] == 0).all() and (y["depth"][:, 0][~void] > 0).all()
    norms = y["normal"].norm(dim=1)
    assert (norms[void] == 0).all()
    valid = norms > 0
    torch.testing.assert_close(norms[valid], torch.ones_like(norms[valid]))
    digit = (y["segmentation"] >= 0) & (y["segmentation"] < BACKGROUND)
    d = y["depth"][:, 0][digit]
    assert float(d.min()) >= NEAR - RELIEF - 1e-6 and float(d.max()) <= FAR + 1e-6


def test_an_empty_split_is_refused_in_one_line():
    with pytest.raises(ValueError, match="leave an empty split"):
        load_dense_multi_mnist(5, 10)
