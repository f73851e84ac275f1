"""NYUv2 and Cityscapes from the preprocessed ``.npy`` copies the user already holds.

Neither data set can be fetched here (no package registry carries them), so ``root`` must point
at a copy in the layout of the preprocessed releases of MTAN (Liu et al., CVPR 2019, "End-to-End
Multi-Task Learning with Attention") that LibMTL, Nash-MTL, FAMO and most papers since read:
one file per image and target, numbered from 0::

    root/train/image/0.npy  1.npy ...     float, (H, W, 3), RGB in [0, 1]
    root/train/label/0.npy ...            float or int, (H, W): class index, -1 = void
    root/train/depth/0.npy ...            float, (H, W, 1): depth, 0 = missing
    root/train/normal/0.npy ...           float, (H, W, 3): unit normal, (0, 0, 0) = missing
    root/val/...                          the same folders for the test images

* **NYUv2** (Silberman et al., ECCV 2012; 13 classes of Couprie et al. 2013; normals of Eigen &
  Fergus 2015): ``image``, ``label``, ``depth``, ``normal``; 795 training and 654 test images
  of 288 x 384 in the MTAN copy.
* **Cityscapes** (Cordts et al., CVPR 2016): ``image``, ``depth`` (MTAN's inverse depth, 0 =
  missing) and the 7-class labels, in ``label_7/`` (MTAN's release, which also has
  ``label_2/`` and ``label_19/``: ``classes=2`` or ``19`` reads those) or ``label/`` (LibMTL's
  repackaging of the 7-class one); 2,975 training and 500 test images of 128 x 256 (MTAN's
  smaller release, the one LibMTL and Nash-MTL use) or 256 x 512 (its larger one).

Images are read as they are stored (no normalisation, as in MTAN's and LibMTL's code) and
channels moved first: inputs ``(N, 3, H, W)`` float32; targets ``segmentation`` ``(N, H, W)``
int64, ``depth`` ``(N, 1, H, W)`` and ``normal`` ``(N, 3, H, W)`` float32. Everything is loaded
into memory once (about 4.5 GB for NYUv2, 1.6 GB for the 128 x 256 Cityscapes).

Splits: the copies have a ``train`` and a ``val`` folder and the papers report on ``val``, so
``val/`` is the **test** split here; the validation split (model selection) is a seeded
``val_size`` images held out of ``train/`` (default a tenth, at least one), which the papers'
own code does not have (MTAN averages its last ten epochs on the test images, LibMTL keeps the
best test epoch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from taskbalance.bench.data.types import split_indices
from taskbalance.bench.problem import TensorData

Kind = Literal["segmentation", "depth", "normal"]
PathLike = str | os.PathLike[str]


class LayoutError(ValueError):
    """``root`` does not hold the preprocessed layout (a missing folder or file, a gap in the
    numbering, a wrong shape or label); the message is one line naming the file or folder."""


@dataclass(frozen=True)
class DenseTarget:
    """One dense task: its name, what it predicts, and the model's output channels for it
    (classes for segmentation, 1 for depth, 3 for normals).

    >>> DenseTarget("segmentation", "segmentation", 13).channels
    13
    """

    name: str
    kind: Kind
    channels: int


@dataclass(frozen=True)
class DenseData:
    """Dense data: tasks, train / val / test :class:`~taskbalance.bench.problem.TensorData`
    (items ``(image, {task: target})``), and what the data are.

    >>> x = torch.zeros(2, 1, 4, 4)
    >>> split = TensorData(x, {"depth": torch.ones(2, 1, 4, 4)})
    >>> d = DenseData("toy", (DenseTarget("depth", "depth", 1),), split, split, split, "", "")
    >>> d.task_names, d.in_channels
    (('depth',), 1)
    """

    name: str
    targets: tuple[DenseTarget, ...]
    train: TensorData
    val: TensorData
    test: TensorData
    description: str
    licence: str

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names, in order."""
        return tuple(t.name for t in self.targets)

    @property
    def in_channels(self) -> int:
        """Channels of the input images."""
        return int(self.train.inputs.shape[1])


@dataclass(frozen=True)
class _Layout:
    name: str
    targets: tuple[DenseTarget, ...]
    folders: dict[str, tuple[str, ...]]  # per task: the folder names it may be stored under
    description: str
    licence: str


def _nyuv2() -> _Layout:
    return _Layout(
        "nyuv2",
        (
            DenseTarget("segmentation", "segmentation", 13),
            DenseTarget("depth", "depth", 1),
            DenseTarget("normal", "normal", 3),
        ),
        {"segmentation": ("label",), "depth": ("depth",), "normal": ("normal",)},
        "NYUv2 (Silberman et al. 2012) as preprocessed for MTAN (Liu et al. 2019): 13-class "
        "segmentation, depth, surface normals (Eigen & Fergus 2015)",
        "NYU Depth Dataset V2: see its authors' terms of use",
    )


def _cityscapes(classes: int) -> _Layout:
    if classes not in (2, 7, 19):
        raise ValueError(f"cityscapes: classes must be 2, 7 or 19, got {classes}")
    labels = (f"label_{classes}", "label") if classes == 7 else (f"label_{classes}",)
    return _Layout(
        "cityscapes",
        (DenseTarget("segmentation", "segmentation", classes), DenseTarget("depth", "depth", 1)),
        {"segmentation": labels, "depth": ("depth",)},
        f"Cityscapes (Cordts et al. 2016) as preprocessed for MTAN (Liu et al. 2019): "
        f"{classes}-class segmentation, inverse depth",
        "Cityscapes: its licence (non-commercial research use), see its authors' terms",
    )


def _indices(folder: Path, layout: _Layout) -> list[int]:
    """The sample numbers in ``folder`` (files ``<i>.npy``), which must be 0 .. n-1."""
    names = sorted(p.stem for p in folder.glob("*.npy")) if folder.is_dir() else []
    if not names:
        raise LayoutError(
            f"{layout.name}: {folder} has no .npy files; expected the preprocessed MTAN/LibMTL "
            f"copy ({'/'.join(('image', *(f[0] for f in layout.folders.values())))} under "
            "train/ and val/, files 0.npy, 1.npy, ...; see docs/dense.md)"
        )
    if not all(n.isdigit() for n in names) or sorted(map(int, names)) != list(range(len(names))):
        raise LayoutError(f"{layout.name}: the files in {folder} are not numbered 0 .. "
                                f"{len(names) - 1} (found e.g. {names[:3]})")  # fmt: skip
    return list(range(len(names)))


def _task_folder(split: Path, task: str, layout: _Layout) -> Path:
    for name in layout.folders[task]:
        if (split / name).is_dir():
            return split / name
    raise LayoutError(
        f"{layout.name}: {split} has no {' or '.join(layout.folders[task])} folder for task "
        f"{task!r} (see docs/dense.md for the expected layout)"
    )


def _read(path: Path, size: tuple[int, ...], channels: int | None) -> np.ndarray:
    """One array, checked to be ``(*size, channels)`` (``size`` alone when ``channels`` is None;
    a 2-D depth map counts as one channel), channels moved first."""
    array = np.load(path)
    if channels is not None and array.ndim == 2:
        array = array[..., None]
    expected = size if channels is None else (*size, channels)
    if array.shape != expected:
        raise LayoutError(f"{path} has shape {array.shape}; expected {expected}")
    return array if channels is None else np.moveaxis(array, -1, 0)


def _read_split(split: Path, layout: _Layout) -> TensorData:
    index = _indices(split / "image", layout)
    folders = {t.name: _task_folder(split, t.name, layout) for t in layout.targets}
    for task, folder in folders.items():
        if _indices(folder, layout) != index:
            raise LayoutError(f"{layout.name}: {folder} (task {task!r}) does not hold one "
                                    f"file per image of {split / 'image'}")  # fmt: skip
    size = tuple(np.load(split / "image" / "0.npy").shape[:2])
    images = torch.from_numpy(
        np.stack([_read(split / "image" / f"{i}.npy", size, 3) for i in index]).astype(np.float32)
    )
    targets: dict[str, Tensor] = {}
    for t in layout.targets:
        channels = None if t.kind == "segmentation" else t.channels
        stack = np.stack([_read(folders[t.name] / f"{i}.npy", size, channels) for i in index])
        if t.kind == "segmentation":
            labels = np.rint(stack).astype(np.int64)
            labels[labels < 0] = -1
            if labels.max() >= t.channels:
                raise LayoutError(f"{layout.name}: {folders[t.name]} has label {labels.max()} for "
                                 f"{t.channels} classes")  # fmt: skip
            targets[t.name] = torch.from_numpy(labels)
        else:
            targets[t.name] = torch.from_numpy(stack.astype(np.float32))
    return TensorData(images, targets)


def _load(layout: _Layout, root: PathLike, val_size: int | None, seed: int) -> DenseData:
    base = Path(root).expanduser()
    if not base.is_dir():
        raise LayoutError(f"{layout.name}: root {base} is not a folder (give root= the "
                                "folder of the preprocessed copy; see docs/dense.md)")  # fmt: skip
    train_all = _read_split(base / "train", layout)
    test = _read_split(base / "val", layout)
    n = len(train_all)
    n_val = max(1, n // 10) if val_size is None else val_size
    if not 1 <= n_val < n:
        raise ValueError(f"{layout.name}: val_size={n_val} must leave both splits non-empty "
                         f"({n} training images)")  # fmt: skip
    train_index, val_index = split_indices(n, (n - n_val, n_val), seed)
    train, val = (train_all.batch(i.sort().values) for i in (train_index, val_index))
    h, w = train_all.inputs.shape[-2:]
    description = (
        f"{layout.description}; {h} x {w}; {n - n_val} / {n_val} / {len(test)} train / val / "
        f"test images (val: seed-{seed} held-out part of train/, test: the copy's val/)"
    )
    return DenseData(
        layout.name,
        layout.targets,
        TensorData(*train),
        TensorData(*val),
        test,
        description,
        layout.licence,
    )


def load_nyuv2(root: PathLike, *, val_size: int | None = None, seed: int = 0) -> DenseData:
    """NYUv2 (13-class segmentation, depth, normals) from the preprocessed copy at ``root``.

    ``val_size`` training images (default a tenth) held out by ``seed`` form the validation
    split; ``root/val`` is the test split. Raises :class:`LayoutError` (one line, naming the
    folder or file) when ``root`` does not hold the layout of the module docstring.

    >>> load_nyuv2("/nowhere")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    taskbalance.bench.dense.scenes.LayoutError: nyuv2: root /nowhere is not a folder ...
    """
    return _load(_nyuv2(), root, val_size, seed)


def load_cityscapes(
    root: PathLike, *, classes: int = 7, val_size: int | None = None, seed: int = 0
) -> DenseData:
    """Cityscapes (``classes``-class segmentation, inverse depth) from the preprocessed copy at
    ``root``; splits as :func:`load_nyuv2`.

    >>> load_cityscapes("/nowhere", classes=5)
    Traceback (most recent call last):
    ...
    ValueError: cityscapes: classes must be 2, 7 or 19, got 5
    """
    return _load(_cityscapes(classes), root, val_size, seed)
