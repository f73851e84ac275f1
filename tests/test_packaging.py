"""Packaging: ``python -m build`` makes an sdist and, from it, a wheel that installs into a fresh
virtual environment and works there.

The build runs without isolation (the installed setuptools, no download) and the fresh
environment sees the already installed torch and numpy through a path file instead of
installing them: the check is of the package's own files and metadata, offline and fast.
"""

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy
import pytest
import torch

import taskbalance

ROOT = Path(__file__).resolve().parents[1]
SMOKE = """
import importlib.metadata, sys
from pathlib import Path

import torch
import taskbalance

assert Path(taskbalance.__file__).is_relative_to(sys.prefix), taskbalance.__file__
assert importlib.metadata.version("taskbalance") == taskbalance.__version__
torch.manual_seed(0)
trunk, heads = torch.nn.Linear(3, 4), torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in "ab")
z = trunk(torch.randn(8, 3))
losses = {t: head(z).pow(2).mean() for t, head in zip("ab", heads)}
info = taskbalance.IMTL(tasks=["a", "b"]).backward(losses, features=z)
assert torch.isclose(info.gradient_weights.sum(), torch.tensor(1.0)), info
# The command-line entry point, as the installed metadata declares it (one process fewer than
# running the generated script).
(script,) = importlib.metadata.entry_points(group="console_scripts", name="taskbalance")
assert script.load()(["methods"]) == 0
print("smoke ok", taskbalance.__version__)
"""


def _run(*command, **options) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, **options)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT))
    return out


def test_the_sdist_and_the_wheel_carry_the_version_and_the_project_files(dist):
    version = taskbalance.__version__
    with tarfile.open(dist / f"taskbalance-{version}.tar.gz") as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {
        "CHANGELOG.md",
        "docs/conf.py",
        "tests/test_packaging.py",
        "src/taskbalance/py.typed",
    } <= names
    assert not [name for name in names if "__pycache__" in name or "/_generated/" in name]
    with zipfile.ZipFile(dist / f"taskbalance-{version}-py3-none-any.whl") as wheel:
        metadata = wheel.read(f"taskbalance-{version}.dist-info/METADATA").decode()
        assert "taskbalance/py.typed" in wheel.namelist()
    assert f"Version: {version}\n" in metadata
    assert "Requires-Dist: torch>=2.2\n" in metadata


def test_the_wheel_installs_in_a_fresh_venv_and_passes_a_smoke_test(dist, tmp_path):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    wheel = next(dist.glob("*.whl"))
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel))  # fmt: skip
    # torch and numpy as installed here: plain paths in a .pth file, so that the path files
    # beside them (this checkout's editable install) are not read.
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    found = {str(Path(module.__file__).parents[1]) for module in (torch, numpy)}
    (Path(purelib.stdout.strip()) / "installed_here.pth").write_text("\n".join(sorted(found)))
    output = _run(python, "-c", SMOKE, cwd=tmp_path).stdout
    assert "imtl_g" in output
    assert "smoke ok" in output
