"""The documentation site builds with no warning, and its generated pages follow the code."""

import subprocess
import sys
from pathlib import Path

import pytest
import sitegen

ROOT = Path(__file__).resolve().parents[2]


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(ROOT / "docs"),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert build.returncode == 0, build.stderr
    assert not build.stderr.strip(), build.stderr
    from taskbalance import list_methods

    pages = tmp_path / "html" / "_generated" / "methods"
    assert sorted(p.stem for p in pages.glob("*.html")) == sorted([*list_methods(), "index"])
    assert (tmp_path / "html" / "_images" / sitegen.DIAGNOSTICS_FIGURE).is_file()


def test_the_figures_page_shows_every_committed_png_by_folder(tmp_path, monkeypatch):
    for picture in ["qm9/bars.png", "qm9/heat.png", "census/bars.png"]:
        (tmp_path / picture).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / picture).write_bytes(b"")
    monkeypatch.setattr(sitegen, "FIGURES", tmp_path)
    page = sitegen.figures_page()
    assert page.index("## `census`") < page.index("census/bars.png") < page.index("## `qm9`")
    assert "(../../benchmarks/results/qm9/heat.png)" in page


def test_the_figures_page_says_so_when_no_figure_is_committed(tmp_path, monkeypatch):
    monkeypatch.setattr(sitegen, "FIGURES", tmp_path)
    assert "No figure is committed yet." in sitegen.figures_page()


def test_every_top_level_name_links_to_its_documented_entry():
    import taskbalance

    table = sitegen.toplevel_table(sitegen.documented_modules(sitegen.generated_pages()))
    assert all(f"`taskbalance.{name}`" in table for name in taskbalance.__all__)
    with pytest.raises(LookupError, match="documented by no automodule"):
        sitegen.toplevel_table([])
