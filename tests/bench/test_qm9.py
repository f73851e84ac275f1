"""QM9 on a tiny wheel holding qm9_part{1,2,3}.csv in qm9pack's column layout (random molecules)."""

import ast
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from support.qm9_files import Z, molecules, wheel
from taskbalance.bench.data import load_qm9
from taskbalance.bench.data import qm9 as qm9_module
from taskbalance.bench.data.qm9 import (
    ANGSTROM_TO_BOHR,
    HARTREE_TO_EV,
    PARTS,
    TARGETS,
    coulomb_descriptors,
)


@pytest.fixture
def frame() -> pd.DataFrame:
    return molecules(40, seed=0)


@pytest.fixture
def cache_dir(use_archive, frame: pd.DataFrame) -> Path:
    return use_archive("qm9", wheel(frame))


def reference_descriptor(atoms: list[str], xyz: np.ndarray) -> np.ndarray:
    """Straightforward loop version (Rupp et al. 2012), padded to 29 atoms."""
    z = np.array([Z[a] for a in atoms], float)
    r = xyz * ANGSTROM_TO_BOHR
    m = np.zeros((29, 29))
    for i in range(len(z)):
        for j in range(len(z)):
            m[i, j] = 0.5 * z[i] ** 2.4 if i == j else z[i] * z[j] / np.linalg.norm(r[i] - r[j])
    eig = np.linalg.eigvalsh(m)
    eig = eig[np.argsort(-np.abs(eig), kind="stable")]
    return np.concatenate([eig, [atoms.count(e) for e in Z]])


def test_descriptors_agree_with_a_loop_implementation(frame: pd.DataFrame) -> None:
    atoms = [ast.literal_eval(e) for e in frame["Elements"]]
    xyz = [np.array(ast.literal_eval(p)) for p in frame["XYZ_Ang"]]
    got = coulomb_descriptors(
        frame["N_atoms"].to_numpy(), np.concatenate(atoms), np.concatenate(xyz)
    )
    assert got.shape == (40, 34) and got.dtype == np.float32
    for k in range(len(frame)):
        expected = reference_descriptor(atoms[k], xyz[k])
        # Sorting by |eigenvalue| may order exact ties differently; compare as sorted magnitudes
        # plus the exact atom counts.
        np.testing.assert_allclose(
            np.sort(got[k, :29]), np.sort(expected[:29]), rtol=1e-4, atol=1e-4
        )
        assert np.all(np.diff(np.abs(got[k, :29])) <= 1e-4)
        np.testing.assert_array_equal(got[k, 29:], expected[29:])


def test_unknown_element_is_refused() -> None:
    with pytest.raises(ValueError, match="unexpected elements"):
        coulomb_descriptors(np.array([1]), np.array(["S"]), np.zeros((1, 3)))


def test_splits_targets_and_units(cache_dir: Path, frame: pd.DataFrame) -> None:
    data = load_qm9(n_train=30, n_val=5, cache_dir=cache_dir)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 5, 5)
    assert data.task_names == (
        "mu",
        "alpha",
        "homo",
        "lumo",
        "r2",
        "zpve",
        "U0",
        "U",
        "H",
        "G",
        "cv",
    )
    assert all(
        t.kind == "regression" and t.metric == "mae" and not t.higher_is_better for t in data.tasks
    )
    assert data.task("homo").unit == "eV" and data.task("cv").unit == "cal/mol/K"
    assert "not a graph network" in data.description
    assert abs(float(data.train.y["U0"].mean())) < 1e-5
    # Undo the standardisation: the pooled values are the CSV values in the documented units.
    for name, (column, _, factor) in TARGETS.items():
        mean, std = data.target_stats[name]
        pooled = torch.cat([s.y[name] for s in (data.train, data.val, data.test)]).double()
        original = np.sort(pooled.numpy() * std + mean)
        np.testing.assert_allclose(
            original, np.sort(frame[column].to_numpy() * factor), rtol=1e-5, atol=1e-5
        )
    # Energies in eV as in PyTorch Geometric (1 hartree = 27.2114 eV), other units unchanged.
    in_ev = {"homo", "lumo", "zpve", "U0", "U", "H", "G"}
    assert {k for k, (_, _, f) in TARGETS.items() if f != 1} == in_ev
    assert {data.task(k).unit for k in in_ev} == {"eV"} and abs(HARTREE_TO_EV - 27.2114) < 1e-4


def test_splits_disjoint_and_deterministic(cache_dir: Path) -> None:
    a = load_qm9(n_train=30, n_val=5, cache_dir=cache_dir, seed=0)
    b = load_qm9(n_train=30, n_val=5, cache_dir=cache_dir, seed=0)
    c = load_qm9(n_train=30, n_val=5, cache_dir=cache_dir, seed=1)
    keys = [set(s.y["mu"].tolist()) for s in (a.train, a.val, a.test)]  # mu is a.s. unique
    assert sum(map(len, keys)) == 40 and not (keys[0] & keys[1] or keys[0] & keys[2])
    assert torch.equal(a.test.x, b.test.x)
    assert not torch.equal(a.test.y["mu"], c.test.y["mu"])
    with pytest.raises(ValueError, match="leaves no test molecules"):
        load_qm9(n_train=35, n_val=5, cache_dir=cache_dir)


def test_descriptor_cache_makes_the_second_load_skip_parsing(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_qm9(n_train=30, n_val=5, cache_dir=cache_dir)
    cached = list(cache_dir.glob("qm9_descriptors_v1_*.npz"))
    assert len(cached) == 1 and not list(cache_dir.glob("*.part"))

    def no_parsing(*args, **kwargs):
        raise AssertionError("the CSV files were read again")

    monkeypatch.setattr(qm9_module, "_read_frames", no_parsing)
    second = load_qm9(n_train=30, n_val=5, cache_dir=cache_dir)
    assert torch.equal(first.train.x, second.train.x)


def test_root_folder_with_the_csv_parts(frame: pd.DataFrame, cache_dir: Path, tmp_path) -> None:
    root = tmp_path / "qm9"
    root.mkdir()
    with zipfile.ZipFile(io.BytesIO(wheel(frame))) as z:
        for part in PARTS:
            (root / part).write_bytes(z.read(f"qm9pack/data/{part}"))
    from_root = load_qm9(n_train=30, n_val=5, root=root, cache_dir=tmp_path / "c")
    from_archive = load_qm9(n_train=30, n_val=5, cache_dir=cache_dir)
    assert torch.equal(from_root.val.x, from_archive.val.x)
    assert len(list((tmp_path / "c").glob("qm9_descriptors_v1_*.npz"))) == 1


def test_a_cache_that_differs_from_the_reference_is_computed_again_with_a_warning(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first = load_qm9(n_train=30, n_val=5, cache_dir=cache_dir)
    (cached,) = cache_dir.glob("qm9_descriptors_v1_*.npz")
    with np.load(cached) as npz:
        features, targets = npz["features"], npz["targets"]
    np.savez(cached, features=features + 1, targets=targets)  # a stale cache from other code
    sha = qm9_module.CARRIERS["qm9"].sha256
    monkeypatch.setitem(
        qm9_module.REFERENCE_DESCRIPTORS, sha, qm9_module._digest(features, targets)
    )
    capsys.readouterr()
    again = load_qm9(n_train=30, n_val=5, cache_dir=cache_dir)
    assert torch.equal(first.train.x, again.train.x)
    assert "computing them again" in capsys.readouterr().err
    monkeypatch.setitem(qm9_module.REFERENCE_DESCRIPTORS, sha, "0" * 64)
    cached.unlink()
    load_qm9(n_train=30, n_val=5, cache_dir=cache_dir)
    assert "will not match the documented tables" in capsys.readouterr().err
