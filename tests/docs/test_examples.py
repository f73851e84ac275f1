"""Every Python example the documentation site shows runs, without a warning (a diff: its
new side).

The site's pages are the Markdown files under docs/ (the generated method pages included, as
the generator makes them now), README.md and CHANGELOG.md, which the site includes. The pages
written for the site (docs/site, docs/api, the generated ones) must hold complete programs;
the README and the method notes may show a fragment of a training loop, which runs after a
prelude that defines the model, one batch and its losses (tests/docs/run_blocks.py).
"""

import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sitegen

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
STANDALONE = (DOCS / "site", DOCS / "api")


def _pages() -> list[tuple[str, str, bool]]:
    """(name, Markdown text, whether its examples must stand alone) for every page."""
    pages = [
        (f"docs/_generated/{path}", text, True) for path, text in sitegen.generated_pages().items()
    ]
    for path in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.rglob("*.md"))]:
        if {"_build", "_generated"} & set(path.relative_to(ROOT).parts):
            continue
        standalone = path == DOCS / "index.md" or any(d in path.parents for d in STANDALONE)
        pages.append((path.relative_to(ROOT).as_posix(), path.read_text("utf-8"), standalone))
    return pages


BLOCKS = [
    {"id": f"{name}:{number}", "code": code, "prelude": not standalone}
    for name, text, standalone in _pages()
    for number, code in enumerate(sitegen.examples(text), start=1)
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("examples")
    (folder / "in.json").write_text(json.dumps(BLOCKS), encoding="utf-8")
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("run_blocks.py")), "in.json", "out.json"],
        cwd=folder,
        check=True,
        timeout=240,
    )
    return json.loads((folder / "out.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("block", BLOCKS, ids=[block["id"] for block in BLOCKS])
def test_example_runs(outcomes, block):
    if outcomes[block["id"]] is not None:
        pytest.fail(f"{block['id']} failed:\n{outcomes[block['id']]}", pytrace=False)


def test_every_method_page_has_an_example():
    from taskbalance import list_methods

    with_example = {block["id"].split(":")[0] for block in BLOCKS}
    missing = [n for n in list_methods() if f"docs/_generated/methods/{n}.md" not in with_example]
    assert not missing


def _documented(kind, name):
    """The object an autodoc directive names and what it renders with ``:members:``: for a
    module, the names in ``__all__`` (or the public names it defines); for a class, its public
    attributes. autodoc imports the integrations with their frameworks mocked; here they are
    installed (the test extra)."""
    if kind == "module":
        module = importlib.import_module(name)
        yield module
        names = getattr(module, "__all__", None) or [
            member
            for member, obj in vars(module).items()
            if not member.startswith("_") and getattr(obj, "__module__", None) == name
        ]
        objects = [getattr(module, member) for member in names]
    else:
        module_name, _, attribute = name.rpartition(".")
        objects = [getattr(importlib.import_module(module_name), attribute)]
    for obj in objects:
        yield obj
        if inspect.isclass(obj):
            yield from (v for k, v in vars(obj).items() if not k.startswith("_"))


def test_docstrings_on_the_site_show_no_code_that_does_not_run():
    """A docstring's code belongs in a doctest (run by --doctest-modules), not in a ``::``
    literal block, which nothing runs; the site renders every docstring autodoc documents."""
    literal = re.compile(r"::\s*$", re.MULTILINE)
    offenders = [
        f"{name}: {getattr(obj, '__qualname__', obj)}"
        for kind, name in sitegen.autodoc_targets(sitegen.generated_pages())
        for obj in _documented(kind, name)
        if (
            inspect.ismodule(obj)
            or inspect.isroutine(obj)
            or inspect.isclass(obj)
            or isinstance(obj, property)
        )
        and literal.search(obj.__doc__ or "")
    ]
    assert not offenders
