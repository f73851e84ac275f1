"""Dense metrics against independent computations: hand-worked cases, numpy per-pixel loops and
scikit-learn's confusion matrix; void pixels, empty classes, and batch-split invariance."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from taskbalance.bench.dense.metrics import (
    HIGHER_IS_BETTER,
    DepthMetric,
    NormalMetric,
    SegmentationMetric,
    depth_loss,
    normal_loss,
    segmentation_loss,
)


def float32(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).float()


def one_hot_logits(predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """Logits ``(B, C, H, W)`` whose argmax is ``predicted`` ``(B, H, W)``."""
    return torch.nn.functional.one_hot(predicted, classes).permute(0, 3, 1, 2).float()


def reference_segmentation(pred: np.ndarray, label: np.ndarray, classes: int) -> dict:
    """Per-class loops over the labelled pixels; IoU of classes with an empty union skipped."""
    keep = label >= 0
    p, t = pred[keep], label[keep]
    ious = []
    for c in range(classes):
        inter = sum(1 for a, b in zip(p, t, strict=True) if a == c and b == c)
        union = sum(1 for a, b in zip(p, t, strict=True) if a == c or b == c)
        if union:
            ious.append(inter / union)
    return {"miou": float(np.mean(ious)), "pixel_acc": float(np.mean(p == t))}


def test_segmentation_hand_worked_case_with_void_and_an_empty_class():
    # Labelled pixels (label, prediction): (0,0) (0,1) (1,1) (2,2) (2,0); the void pixel is
    # predicted 0 and must not enter class 0's union; class 3 appears nowhere.
    labels = torch.tensor([[[0, 0, 1], [-1, 2, 2]]])
    predicted = torch.tensor([[[0, 1, 1], [0, 2, 0]]])
    metric = SegmentationMetric(4)
    metric.update(one_hot_logits(predicted, 4), labels)
    out = metric.compute()
    assert out["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3, abs=1e-12)
    assert out["pixel_acc"] == pytest.approx(3 / 5, abs=1e-12)


def test_a_class_predicted_but_never_labelled_counts_as_zero():
    metric = SegmentationMetric(3)
    metric.update(one_hot_logits(torch.tensor([[[0, 2]]]), 3), torch.tensor([[[0, 0]]]))
    # class 0: 1 / 2, class 2: 0 / 1, class 1: empty union, left out
    assert metric.compute()["miou"] == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_segmentation_matches_sklearn_and_loops_over_batches(seed):
    rng = np.random.default_rng(seed)
    classes = 5
    label = rng.integers(-1, classes - 1, size=(6, 7, 9))  # class 4 never labelled; void = -1
    pred = rng.integers(0, classes, size=label.shape)
    metric = SegmentationMetric(classes)
    for part in np.array_split(np.arange(6), 3):  # three batches of two images
        metric.update(one_hot_logits(torch.from_numpy(pred[part]), classes),
                      torch.from_numpy(label[part]))  # fmt: skip
    keep = label >= 0
    expected_confusion = confusion_matrix(label[keep], pred[keep], labels=range(classes))
    np.testing.assert_array_equal(metric.confusion.numpy(), expected_confusion)
    expected = reference_segmentation(pred, label, classes)
    assert metric.compute() == pytest.approx(expected, abs=1e-12)


def test_segmentation_refuses_a_label_beyond_the_classes_and_an_all_void_split():
    metric = SegmentationMetric(2)
    with pytest.raises(ValueError, match="label 2 for 2 classes"):
        metric.update(torch.zeros(1, 2, 1, 1), torch.tensor([[[2]]]))
    metric.update(torch.zeros(1, 2, 1, 1), torch.tensor([[[-1]]]))
    with pytest.raises(ValueError, match="no labelled pixel"):
        metric.compute()


@pytest.mark.parametrize("seed", range(5))
def test_depth_matches_a_per_pixel_loop(seed):
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.5, 5.0, size=(4, 1, 5, 6))
    target[rng.random(target.shape) < 0.3] = 0.0  # missing depth
    output = target + rng.normal(0, 0.7, size=target.shape)
    abs_sum = rel_sum = n = 0.0
    for d, t in zip(output.ravel(), target.ravel(), strict=True):
        if t != 0:
            abs_sum += abs(d - t)
            rel_sum += abs(d - t) / t
            n += 1
    metric = DepthMetric()
    for part in (slice(0, 1), slice(1, 4)):
        metric.update(float32(output[part]), float32(target[part]))
    out = metric.compute()
    assert out["abs_err"] == pytest.approx(abs_sum / n, rel=1e-6)
    assert out["rel_err"] == pytest.approx(rel_sum / n, rel=1e-6)


def test_depth_with_no_valid_pixel_is_an_error():
    metric = DepthMetric()
    metric.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="no valid pixel"):
        metric.compute()


def reference_normals(output: np.ndarray, target: np.ndarray) -> dict:
    """arccos of the dot product of unit vectors, pixel by pixel; numpy's median."""
    angles = []
    for b in range(output.shape[0]):
        for i in range(output.shape[2]):
            for j in range(output.shape[3]):
                t = target[b, :, i, j]
                if not t.any():
                    continue
                p = output[b, :, i, j] / np.linalg.norm(output[b, :, i, j])
                cos = np.clip(p @ (t / np.linalg.norm(t)), -1.0, 1.0)
                angles.append(math.degrees(math.acos(cos)))
    a = np.array(angles)
    return {"mean": a.mean(), "median": np.median(a), "within_11.25": np.mean(a < 11.25),
            "within_22.5": np.mean(a < 22.5), "within_30": np.mean(a < 30)}  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
def test_normals_match_a_per_pixel_loop(seed):
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(3, 3, 6, 5))
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    target[:, :, rng.random((6, 5)) < 0.2] = 0.0  # invalid pixels
    output = 2.5 * target + rng.normal(0, 0.6, size=target.shape)  # not unit length
    metric = NormalMetric()
    for part in (slice(0, 2), slice(2, 3)):
        metric.update(float32(output[part]), float32(target[part]))
    out = metric.compute()
    expected = reference_normals(output.astype(np.float32), target.astype(np.float32))
    # The median is read off 0.001-degree bins: within half a bin of numpy's (+ rounding).
    assert out["median"] == pytest.approx(expected.pop("median"), abs=6e-4)
    assert {k: out[k] for k in expected} == pytest.approx(expected, abs=1e-4)


def test_normal_median_of_an_even_count_is_the_mean_of_the_two_middle_angles():
    up = torch.tensor([0.0, 0.0, 1.0])
    tilted = [torch.tensor([math.sin(math.radians(a)), 0.0, math.cos(math.radians(a))])
              for a in (10.0, 20.0, 40.0, 80.0)]  # fmt: skip
    metric = NormalMetric()
    metric.update(torch.stack(tilted).T.reshape(1, 3, 1, 4), up.repeat(4, 1).T.reshape(1, 3, 1, 4))
    assert metric.compute()["median"] == pytest.approx(30.0, abs=6e-4)


def test_normal_shares_split_angles_on_either_side_of_each_threshold():
    up = torch.tensor([0.0, 0.0, 1.0])
    angles = (11.2, 11.3, 22.4, 22.6, 29.9, 30.1)
    out = torch.stack([torch.tensor([math.sin(math.radians(a)), 0.0, math.cos(math.radians(a))])
                       for a in angles]).T.reshape(1, 3, 1, 6)  # fmt: skip
    metric = NormalMetric()
    metric.update(out, up.repeat(6, 1).T.reshape(1, 3, 1, 6))
    result = metric.compute()
    shares = [result[k] for k in ("within_11.25", "within_22.5", "within_30")]
    assert shares == [1 / 6, 3 / 6, 5 / 6]


def test_every_metric_computed_has_a_direction():
    seg, depth, normal = SegmentationMetric(2), DepthMetric(), NormalMetric()
    seg.update(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long))
    depth.update(torch.ones(1, 1, 1), torch.ones(1, 1, 1))
    normal.update(torch.ones(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    names = [name for m in (seg, depth, normal) for name in m.compute()]
    assert sorted(names) == sorted(HIGHER_IS_BETTER)


def test_losses_skip_void_and_invalid_pixels():
    logits = torch.tensor([[[[5.0, 0.0]], [[0.0, 5.0]]]], requires_grad=True)
    loss = segmentation_loss(logits, torch.tensor([[[0, -1]]]))  # pixel 2 is void
    expected = torch.nn.functional.cross_entropy(logits[..., :1], torch.tensor([[[0]]]))
    assert float(loss.detach()) == pytest.approx(float(expected.detach()))
    assert float(depth_loss(torch.tensor([1.0, 100.0]), torch.tensor([3.0, 0.0]))) == 2.0
    out = torch.tensor([[[[1.0, 7.0]], [[0.0, 7.0]], [[0.0, 7.0]]]])
    target = torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 0.0]]]])  # pixel 2 invalid
    assert float(normal_loss(out, target)) == pytest.approx(1.0)


@pytest.mark.parametrize("loss, target", [
    (segmentation_loss, torch.full((1, 2, 2), -1)),
    (depth_loss, torch.zeros(1, 2, 2)),
    (normal_loss, torch.zeros(1, 3, 2, 2)),
])  # fmt: skip
def test_a_batch_without_valid_pixels_gives_a_zero_loss_attached_to_the_model(loss, target):
    channels = 3 if loss is not depth_loss else 1
    output = torch.randn(1, channels, 2, 2, requires_grad=True)
    value = loss(output if loss is not depth_loss else output[:, 0], target)
    value.backward()
    assert float(value.detach()) == 0.0 and torch.equal(output.grad, torch.zeros_like(output))
