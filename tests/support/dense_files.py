"""Tiny NYUv2 / Cityscapes copies in the preprocessed MTAN/LibMTL layout, written to a folder
(random values, a few images): what the dense loaders read, built in a test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Folders per data set: the image and each target, with its per-pixel channels (None: a map).
LAYOUTS = {
    "nyuv2": {"image": 3, "label": None, "depth": 1, "normal": 3},
    "cityscapes": {"image": 3, "label_7": None, "depth": 1},
}


def write_scenes(
    root: Path,
    name: str,
    sizes: tuple[int, int] = (6, 3),
    shape: tuple[int, int] = (8, 16),
    classes: int = 13,
    seed: int = 0,
    folders: dict[str, int | None] | None = None,
) -> Path:
    """Write ``sizes`` = (train, val) samples of ``shape`` under ``root/train`` and
    ``root/val`` in the layout of data set ``name``; returns ``root``. Labels hold -1 (void)
    on about a tenth of the pixels, depths 0 and normals (0, 0, 0) (missing) likewise."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), sizes, strict=True):
        for folder, channels in (folders or LAYOUTS[name]).items():
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                missing = rng.random(shape) < 0.1
                if channels is None:  # labels, stored as float as in the copies
                    array = rng.integers(0, classes, size=shape).astype(np.float64)
                    array[missing] = -1.0
                elif folder == "image":
                    array = rng.random((*shape, channels))
                elif folder == "normal":
                    array = rng.normal(size=(*shape, channels))
                    array /= np.linalg.norm(array, axis=-1, keepdims=True)
                    array[missing] = 0.0
                else:
                    array = rng.uniform(0.5, 10.0, size=(*shape, channels))
                    array[missing] = 0.0
                np.save(root / split / folder / f"{i}.npy", array)
    return root
