"""A tiny QM9 wheel: random molecules in qm9pack's CSV layout
(``qm9pack/data/qm9_part{1,2,3}.csv``), for tests that read QM9 through the real loader."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd

from taskbalance.bench.data.qm9 import PARTS, TARGETS

Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}


def molecules(n: int, seed: int) -> pd.DataFrame:
    """``n`` random molecules of 2-6 atoms (H, C, N, O, F) with random targets, seeded."""
    rng = np.random.default_rng(seed)
    records = []
    for k in range(n):
        atoms = list(rng.choice(list(Z), size=rng.integers(2, 7)))
        xyz = rng.normal(scale=1.5, size=(len(atoms), 3)).round(6)
        record = {
            "XYZ_file": f"dsgdb9nsd_{k:06d}.xyz", "Index": k + 1, "SMILES": "C",
            "N_atoms": len(atoms),
            "Stoichiometry": str([atoms.count(e) for e in Z]).replace(" ", ""),
            "Elements": "[" + ",".join(f"'{a}'" for a in atoms) + "]",
            "XYZ_Ang": "[" + ",".join("[" + ",".join(map(str, p)) + "]" for p in xyz) + "]",
        }  # fmt: skip
        record |= {column: rng.normal() for column, _, _ in TARGETS.values()}
        records.append(record)
    return pd.DataFrame(records)


def wheel(frame: pd.DataFrame) -> bytes:
    """A zip with ``frame`` cut into the three CSV parts where the qm9pack wheel holds them."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("qm9pack/__init__.py", "")
        for part, chunk in zip(PARTS, np.array_split(np.arange(len(frame)), 3), strict=True):
            z.writestr(f"qm9pack/data/{part}", frame.iloc[chunk].to_csv(index=False))
    return buf.getvalue()
