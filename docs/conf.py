"""Sphinx configuration of the documentation site.

Build it with ``sphinx-build -W -b html docs docs/_build/html`` (``-W``: a warning fails the
build, as in the test suite). The pages are Markdown (MyST); the API reference is generated
from the docstrings by autodoc, whose Google-style sections napoleon reads.
"""

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))

import sitegen  # noqa: E402  (found through the path set just above)

import taskbalance  # noqa: E402

project = "taskbalance"
author = "the taskbalance authors"
copyright = "2026, the taskbalance authors"
release = version = taskbalance.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"taskbalance {release}"

# Anchors for "##" and "###" headings, so that a link to a section (results.md#qm9) resolves.
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}
# An override without a docstring (``extra_repr``, a class attribute such as ``name``) would
# repeat torch's or the base class's text on every method page.
autodoc_inherit_docstrings = False
# The integrations' frameworks stand in as mocks while autodoc imports those modules: the build
# then needs neither installed (the README's command installs only the docs extra).
autodoc_mock_imports = ["lightning", "pytorch_lightning", "transformers"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False

sitegen.write_all()


def _formulas_verbatim(app, what, name, obj, options, lines):
    """Show the docstrings' indented formula blocks verbatim.

    The docstrings set formulas apart as an indented block after a blank line (plain text,
    readable in ``help()``); reStructuredText would parse them as block quotes, where ``|x|``
    is a substitution and ``*`` emphasis. A bare ``::`` paragraph before such a block, which
    renders as nothing, makes it a literal block. Runs after napoleon (priority 600), whose
    sections are by then field lists, or directives (``.. attribute::``) whose indented body
    is left alone.
    """
    result = []
    for i, line in enumerate(lines):
        paragraph = _last_paragraph(result)
        if (
            line.strip()
            and i > 0
            and not lines[i - 1].strip()
            and _indent(line) > _content_indent(paragraph[-1])
            and not paragraph[-1].rstrip().endswith("::")
            and not paragraph[0].lstrip().startswith(".. ")
        ):
            result += ["::", ""]
        result.append(line)
    lines[:] = result


def _last_paragraph(lines):
    """The last run of non-blank lines (``[""]`` when there is none)."""
    end = len(lines)
    while end and not lines[end - 1].strip():
        end -= 1
    start = end
    while start and lines[start - 1].strip():
        start -= 1
    return lines[start:end] or [""]


def _indent(line):
    return len(line) - len(line.lstrip())


def _content_indent(line):
    """Where the text of a line starts, past a list marker (``- ``, ``1. ``)."""
    stripped = line.lstrip()
    for marker in ("- ", "* ", "+ "):
        if stripped.startswith(marker):
            return _indent(line) + len(marker)
    number, dot, _ = stripped.partition(". ")
    if dot and number.isdigit():
        return _indent(line) + len(number) + 2
    return _indent(line)


PARAM = re.compile(r"(\s*:param )([^:]+)(:.*)")


def _escape_starred_parameters(app, what, name, obj, options, lines):
    """Escape the stars of a combined ``*args, **kwargs`` entry of an Args section.

    napoleon escapes ``*args`` and ``**kwargs`` given as separate entries, but in a combined
    one it leaves ``**`` as it is, which reStructuredText reads as the start of bold text.
    """
    for i, line in enumerate(lines):
        match = PARAM.fullmatch(line)
        if match:
            names = re.sub(r"(?<!\\)\*", r"\\*", match.group(2))
            lines[i] = match.group(1) + names + match.group(3)


LINK = re.compile(r"\]\(([^)#:\s]+)\)")


def _repository_links(app, relative_path, parent_docname, content):
    """Keep the included files' links to repository files (not pages) pointing at them.

    README.md links source files relative to the repository root; included into a page in
    another folder, those paths would point nowhere. Each such link is made relative to the
    including page, where MyST turns a link to an existing file into a download of it. Links
    to pages (``.md``) are left to the include's ``relative-docs`` option.
    """
    included = (Path(app.srcdir) / relative_path).resolve().parent
    including = (Path(app.srcdir) / app.env.docname).parent

    def rewrite(match):
        target = included / match.group(1)
        if target.suffix == ".md" or not target.exists():
            return match.group(0)
        return f"]({os.path.relpath(target, including)})"

    content[0] = LINK.sub(rewrite, content[0])


def setup(app):
    app.connect("autodoc-process-docstring", _formulas_verbatim, priority=600)
    app.connect("autodoc-process-docstring", _escape_starred_parameters, priority=600)
    app.connect("include-read", _repository_links)
