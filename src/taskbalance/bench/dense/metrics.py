"""Dense-prediction metrics, accumulated over a whole split (never averaged per batch).

Each metric is an accumulator: ``update(output, target)`` once per batch, ``compute()`` at the
end, returning ``{metric name: value}``. Sums and counts are kept in 64 bits on the batches'
device, so the result does not depend on how the split was cut into batches.

* :class:`SegmentationMetric` (Long et al. 2015; the standard of MTAN and LibMTL): a confusion
  matrix of argmax predictions against labels, void pixels (label < 0, ``-1`` in the public
  copies) left out. ``miou``: the mean over classes of ``TP / (TP + FP + FN)``; a class with an
  empty union (neither labelled nor predicted anywhere in the split) has no IoU and is left out
  of the mean (as ``nanmean`` would), a class predicted but never labelled counts as 0.
  ``pixel_acc``: correct / labelled pixels.
* :class:`DepthMetric` (Eigen et al. 2014): on valid pixels (target > 0; the copies mark a
  missing depth by 0), ``abs_err = mean |d - d*|`` and ``rel_err = mean |d - d*| / d*``.
* :class:`NormalMetric` (Eigen & Fergus 2015): the angle between the predicted normal (scaled
  to unit length) and the target, in degrees, on valid pixels (target not the zero vector):
  ``mean``, ``median``, and the shares of pixels with an angle below 11.25, 22.5 and 30
  degrees (``within_11.25``, ``within_22.5``, ``within_30``).

The median of the angles over a whole split is taken from a histogram of 0.001-degree bins
(180,000 int64 counts, 1.4 MB), not from the angles themselves: keeping every angle of the
NYUv2 test split would hold ~72 million floats (~290 MB) per evaluation, and the histogram's
median is within half a bin (0.0005 degree) of the exact one, far below the two decimals papers
print. The mean and the threshold shares are exact (sums and counts, not read off the bins).

MTAN's and LibMTL's code marks valid depth by ``target != 0`` and valid normals by a nonzero
*sum* of the three components; here a depth must be positive and a normal must have a nonzero
*length*: the same pixels on the public copies (depths are never negative there, and a unit
normal whose components sum to zero exactly does not occur in practice), but no valid normal
is dropped by accident.

:data:`HIGHER_IS_BETTER` gives each metric's direction, for Delta m.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

#: Whether a larger value of each dense metric is better (the signs of Delta m).
HIGHER_IS_BETTER: dict[str, bool] = {
    "miou": True,
    "pixel_acc": True,
    "abs_err": False,
    "rel_err": False,
    "mean": False,
    "median": False,
    "within_11.25": True,
    "within_22.5": True,
    "within_30": True,
}
#: The angle thresholds, in degrees, of the normal metric's shares.
NORMAL_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
#: Histogram bins per degree for the median angle.
BINS_PER_DEGREE = 1000


def _same_batch(output: Tensor, target: Tensor, what: str) -> None:
    if output.shape[0] != target.shape[0] or output.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"{what}: output {tuple(output.shape)} and target {tuple(target.shape)} disagree"
        )


class SegmentationMetric:
    """mIoU and pixel accuracy of ``num_classes``-way segmentation (see the module docstring).

    ``update(logits, labels)`` takes logits ``(B, C, H, W)`` and int labels ``(B, H, W)``
    (negative: void).

    >>> m = SegmentationMetric(2)
    >>> logits = torch.tensor([[[[1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]]]])  # predicts 0, 1, 1
    >>> m.update(logits, torch.tensor([[[0, 1, -1]]]))
    >>> m.compute()
    {'miou': 1.0, 'pixel_acc': 1.0}
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.confusion: Tensor | None = None  # rows: label, columns: prediction

    def update(self, output: Tensor, target: Tensor) -> None:
        """Add a batch: logits ``(B, C, H, W)``, labels ``(B, H, W)``."""
        c = self.num_classes
        if output.dim() != 4 or output.shape[1] != c:
            raise ValueError(f"segmentation: expected logits (B, {c}, H, W), got "
                             f"{tuple(output.shape)}")  # fmt: skip
        _same_batch(output, target, "segmentation")
        labels = target.long().flatten()
        keep = labels >= 0
        labels = labels[keep]
        if labels.numel() and int(labels.max()) >= c:
            raise ValueError(f"segmentation: label {int(labels.max())} for {c} classes")
        predicted = output.argmax(dim=1).flatten()[keep]
        counts = torch.bincount(labels * c + predicted, minlength=c * c).reshape(c, c)
        self.confusion = counts if self.confusion is None else self.confusion + counts

    def compute(self) -> dict[str, float]:
        """``{"miou": ..., "pixel_acc": ...}`` over every batch so far."""
        if self.confusion is None or int(self.confusion.sum()) == 0:
            raise ValueError("segmentation: no labelled pixel")
        h = self.confusion.double()
        hits = h.diagonal()
        union = h.sum(0) + h.sum(1) - hits
        present = union > 0
        return {
            "miou": float((hits[present] / union[present]).mean()),
            "pixel_acc": float(hits.sum() / h.sum()),
        }


class DepthMetric:
    """Absolute and relative depth error on valid pixels (target > 0).

    ``update(output, target)``: predictions and targets of the same shape, ``(B, 1, H, W)`` or
    ``(B, H, W)``.

    >>> m = DepthMetric()
    >>> m.update(torch.tensor([[[1.0, 3.0, 9.0]]]), torch.tensor([[[2.0, 3.0, 0.0]]]))
    >>> m.compute()
    {'abs_err': 0.5, 'rel_err': 0.25}
    """

    def __init__(self) -> None:
        self.sums: Tensor | None = None  # abs error, rel error, valid pixels

    def update(self, output: Tensor, target: Tensor) -> None:
        """Add a batch."""
        if output.shape != target.shape:
            raise ValueError(f"depth: output {tuple(output.shape)} and target "
                             f"{tuple(target.shape)} disagree")  # fmt: skip
        valid = target > 0
        d, t = output[valid].double(), target[valid].double()
        err = (d - t).abs()
        count = torch.full((), float(t.numel()), dtype=torch.float64, device=t.device)
        sums = torch.stack([err.sum(), (err / t).sum(), count])
        self.sums = sums if self.sums is None else self.sums + sums

    def compute(self) -> dict[str, float]:
        """``{"abs_err": ..., "rel_err": ...}`` over every batch so far."""
        if self.sums is None or float(self.sums[2]) == 0:
            raise ValueError("depth: no valid pixel")
        abs_sum, rel_sum, n = self.sums.tolist()
        return {"abs_err": abs_sum / n, "rel_err": rel_sum / n}


def angles_degrees(output: Tensor, target: Tensor) -> Tensor:
    """Per-pixel angles (degrees, float64) between predicted and target normals, on the pixels
    where the target is not the zero vector; both are ``(B, 3, H, W)``, the prediction need not
    have unit length. ``atan2(|a x b|, a . b)``: accurate near 0 and 180 degrees, where
    ``acos`` is not.

    >>> angles_degrees(torch.tensor([[[[2.0]], [[0.0]], [[0.0]]]]),
    ...                torch.tensor([[[[0.0]], [[1.0]], [[0.0]]]]))
    tensor([90.], dtype=torch.float64)
    """
    if output.dim() != 4 or output.shape[1] != 3 or output.shape != target.shape:
        raise ValueError(f"normal: expected output and target (B, 3, H, W), got "
                         f"{tuple(output.shape)} and {tuple(target.shape)}")  # fmt: skip
    a = output.double().movedim(1, -1)
    b = target.double().movedim(1, -1)
    valid = b.norm(dim=-1) > 0
    a, b = a[valid], b[valid]
    cross = torch.linalg.cross(a, b).norm(dim=-1)
    return torch.rad2deg(torch.atan2(cross, (a * b).sum(-1)))


class NormalMetric:
    """Mean and median angle error and the shares within 11.25, 22.5 and 30 degrees.

    ``update(output, target)``: ``(B, 3, H, W)`` each; a zero target vector marks an invalid
    pixel. See the module docstring for the histogram behind the median.

    >>> m = NormalMetric()
    >>> up, side = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])
    >>> out = torch.stack([up, up, side]).T.reshape(1, 3, 1, 3)
    >>> m.update(out, torch.stack([up, up, up]).T.reshape(1, 3, 1, 3))
    >>> {k: round(v, 2) for k, v in m.compute().items()}
    {'mean': 30.0, 'median': 0.0, 'within_11.25': 0.67, 'within_22.5': 0.67, 'within_30': 0.67}
    """

    def __init__(self) -> None:
        self.count = 0
        self.total: Tensor | None = None  # sum of angles (float64)
        self.below: Tensor | None = None  # pixels under each threshold
        self.histogram: Tensor | None = None

    def update(self, output: Tensor, target: Tensor) -> None:
        """Add a batch."""
        angles = angles_degrees(output, target)
        bins = 180 * BINS_PER_DEGREE
        index = (angles * BINS_PER_DEGREE).long().clamp_(0, bins - 1)
        hist = torch.bincount(index, minlength=bins)
        thresholds = torch.tensor(NORMAL_THRESHOLDS, dtype=angles.dtype, device=angles.device)
        below = (angles.unsqueeze(1) < thresholds).sum(0)
        self.count += angles.numel()
        if self.histogram is None:
            self.total, self.below, self.histogram = angles.sum(), below, hist
        else:
            self.total = self.total + angles.sum()
            self.below = self.below + below
            self.histogram = self.histogram + hist

    def compute(self) -> dict[str, float]:
        """The five normal metrics over every batch so far."""
        if self.count == 0 or self.histogram is None:
            raise ValueError("normal: no valid pixel")
        cumulative = self.histogram.cumsum(0)
        # numpy's median: the middle sorted value, or the mean of the two middle ones.
        middle = [(self.count - 1) // 2, self.count // 2]
        centres = [(int(torch.searchsorted(cumulative, k, right=True)) + 0.5) / BINS_PER_DEGREE
                   for k in middle]  # fmt: skip
        out = {"mean": float(self.total) / self.count, "median": sum(centres) / 2}
        for t, n in zip(NORMAL_THRESHOLDS, self.below.tolist(), strict=True):
            out[f"within_{t:g}"] = n / self.count
        return out


def segmentation_loss(output: Tensor, target: Tensor) -> Tensor:
    """Pixel-wise cross-entropy over the labelled pixels (label < 0: void, skipped).

    A batch with no labelled pixel gives ``0 * output.sum()``: zero, still attached to the model.

    >>> float(segmentation_loss(torch.zeros(1, 2, 1, 2), torch.tensor([[[1, -1]]])))  # log 2
    0.6931471824645996
    """
    labels = target.long().clamp_min(-1)
    if not bool((labels >= 0).any()):
        return output.sum() * 0.0
    return F.cross_entropy(output, labels, ignore_index=-1)


def depth_loss(output: Tensor, target: Tensor) -> Tensor:
    """L1 on the valid pixels (target > 0), the loss of MTAN and LibMTL.

    >>> float(depth_loss(torch.tensor([[[1.0, 5.0]]]), torch.tensor([[[2.0, 0.0]]])))
    1.0
    """
    valid = target > 0
    if not bool(valid.any()):
        return output.sum() * 0.0
    return (output[valid] - target[valid]).abs().mean()


def normal_loss(output: Tensor, target: Tensor) -> Tensor:
    """``1 - cos`` between the predicted normal (scaled to unit length) and the target, averaged
    over valid pixels (target not the zero vector), the loss of MTAN and LibMTL.

    >>> float(normal_loss(torch.tensor([[[[3.0]], [[0.0]], [[0.0]]]]),
    ...                   torch.tensor([[[[1.0]], [[0.0]], [[0.0]]]])))
    0.0
    """
    valid = target.norm(dim=1) > 0
    if not bool(valid.any()):
        return output.sum() * 0.0
    unit = F.normalize(output, dim=1)
    return 1.0 - (unit * target).sum(1)[valid].mean()


#: Per kind of dense target, its per-pixel loss.
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "segmentation": segmentation_loss,
    "depth": depth_loss,
    "normal": normal_loss,
}
#: Per kind of dense target, the names its accumulator's ``compute()`` returns, in the papers'
#: column order (NYUv2: 2 + 2 + 5 = the nine of the tables; Cityscapes: 2 + 2).
METRICS: dict[str, tuple[str, ...]] = {
    "segmentation": ("miou", "pixel_acc"),
    "depth": ("abs_err", "rel_err"),
    "normal": ("mean", "median", *(f"within_{t:g}" for t in NORMAL_THRESHOLDS)),
}
