"""The documentation site's generated pages, written by conf.py before Sphinx reads the sources.

Pages that would otherwise be hand copies of the code are generated, so that they cannot drift:

- one page per registered method, from the registry and the class attributes (paper, needs,
  levels, state, hyperparameters with their defaults), a runnable example built for the
  method's level, and the module's and class's docstrings (formula, cost, choices);
- the methods' overview table;
- the benchmark figures: every PNG committed under benchmarks/results/ (none is an empty list,
  not a broken build);
- the diagnostics plot, drawn by running the example on the diagnostics page.

The tests import this module too (tests/docs/), to run every example the site shows.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import re
import runpy
import shutil
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
GENERATED = DOCS / "_generated"
FIGURES = ROOT / "benchmarks" / "results"
DIAGNOSTICS_PAGE = DOCS / "site" / "diagnostics.md"
DIAGNOSTICS_FIGURE = "diagnostics.png"
"""The file the diagnostics page's example writes; the page shows it from _generated/."""

# The seed methods lead the overview; the baselines follow in name order.
SEED_METHODS = ("imtl_l", "imtl_g", "imtl", "emtl")
# The hand-written notes, searched for a heading that names a method (`name`).
NOTES = (
    "methods.md",
    "methods/seed_adatask_emtl.md",
    "methods/loss_baselines.md",
    "methods/gradient_baselines.md",
)
NEEDS = {
    "losses": "the losses only (loss level): one ordinary backward",
    "gramian": "the T x T Gramian of the per-task gradients",
    "jacobian": "the T x n Jacobian of the per-task gradients",
}
AUTODOC = re.compile(r"^\s*\.\. auto(module|class|function):: ([\w.]+)", re.MULTILINE)
FENCE = re.compile(r"^```(python|diff)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def examples(markdown: str) -> list[str]:
    """The Python code a Markdown text shows, in order: its ```python blocks, and the new side
    of its ```diff blocks (the README shows its main example as a change to a training loop)."""
    return [
        code if language == "python" else _after(code) for language, code in FENCE.findall(markdown)
    ]


def _after(diff: str) -> str:
    """The lines a diff keeps or adds, without their markers."""
    return "".join(line[1:] or "\n" for line in diff.splitlines(True) if line[:1] in " +\n")


def ordered_methods() -> list[str]:
    """Registry names: the seed methods first, then the baselines in name order."""
    from taskbalance import list_methods

    names = list_methods()
    return [n for n in SEED_METHODS if n in names] + [n for n in names if n not in SEED_METHODS]


def method_example(name: str) -> str:
    """A runnable example of one method: a tiny two-task network trained for three steps.

    The call follows the method's default level: ``features=z`` at feature level,
    ``shared=trunk`` at parameter level, neither for a loss-level method. A method that must be
    told the losses after the step (FAMO's ``update``) gets that call too.
    """
    from taskbalance.methods.registry import method_class

    cls = method_class(name)
    build = f'taskbalance.get_method("{name}", tasks=2)'
    shared = {
        "feature": "features=z",
        "parameter": "shared=trunk",
        None: "",
    }[cls.default_level]
    after = ""
    if callable(getattr(cls, "update", None)):
        after = (
            "    with torch.no_grad():  # the losses at the new parameters, same batch\n"
            "        method.update([loss_fn(head(trunk(x)), y) for head, y in zip(heads, ys)])\n"
        )
    return (
        "import torch\n"
        "from torch import nn\n"
        "\n"
        "import taskbalance\n"
        "\n"
        "torch.manual_seed(0)\n"
        "trunk = nn.Sequential(nn.Linear(4, 16), nn.ReLU())\n"
        "heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])\n"
        "loss_fn = nn.functional.mse_loss\n"
        f"method = {build}\n"
        "optimizer = torch.optim.SGD(\n"
        '    [{"params": [*trunk.parameters(), *heads.parameters()]}, method.param_group()],\n'
        "    lr=0.05,\n"
        ")\n"
        "x, ys = torch.randn(32, 4), torch.randn(2, 32, 1)\n"
        "for step in range(3):\n"
        "    z = trunk(x)\n"
        "    losses = [loss_fn(head(z), y) for head, y in zip(heads, ys)]\n"
        "    optimizer.zero_grad()\n"
        f"    info = method.backward(losses{', ' + shared if shared else ''})\n"
        "    optimizer.step()\n"
        f"{after}"
        'print("weights", info.weights)\n'
    )


def _title(module_doc: str) -> str:
    """The method's display name: the module docstring's text before its first colon."""
    return module_doc.split(":", 1)[0].strip()


def _notes_page(name: str) -> str | None:
    """The hand-written notes page with a heading naming the method, relative to docs/."""
    heading = re.compile(rf"^#+ .*`{re.escape(name)}`", re.MULTILINE)
    for page in NOTES:
        if heading.search((DOCS / page).read_text(encoding="utf-8")):
            return page
    return None


def _default(argument: str, value: object, default_level: str | None) -> str:
    """A hyperparameter's default as the table shows it."""
    if value is inspect.Parameter.empty:
        return "required"
    if argument == "level" and value is None:
        return f'`None`: `"{default_level}"`'
    return f"`{value!r}`"


def method_page(name: str) -> str:
    """The Markdown page of one method."""
    from taskbalance.methods.registry import hyperparameters, method_class

    cls = method_class(name)
    module = importlib.import_module(cls.__module__)
    levels = ", ".join(
        f"**{level}** (default)" if level == cls.default_level else level for level in cls.levels
    )
    rows = [
        ("registry name", f'`{name}`: `taskbalance.get_method("{name}", ...)`'),
        ("class", f"{{py:class}}`{cls.__module__}.{cls.__name__}`"),
        ("paper", cls.paper),
        ("needs", NEEDS[cls.requires.value]),
        ("levels", levels or "none: a loss-level method"),
        ("per-task state", "yes: build it with `tasks=`" if cls.stateful else "none"),
    ]
    lines = [f"# {_title(module.__doc__)} (`{name}`)", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    lines += ["", "## Hyperparameters", "", "| argument | default |", "|---|---|"]
    lines += [
        f"| `{arg}` | {_default(arg, value, cls.default_level)} |"
        for arg, value in hyperparameters(name).items()
    ]
    lines += ["", "The class's docstring below says what each one does.", ""]
    notes = _notes_page(name)
    if notes:
        lines += [
            f"More notes, with the tests that hold the choices: [](../../{notes}).",
            "",
        ]
    lines += ["## Example", "", "```python", method_example(name).rstrip(), "```", ""]
    lines += [
        "## Formula, cost and choices",
        "",
        "```{eval-rst}",
        f".. automodule:: {cls.__module__}",
        "   :members:",
        "   :show-inheritance:",
        "```",
        "",
    ]
    return "\n".join(lines)


def methods_index() -> str:
    """The overview page: one row per method, and the table of contents of their pages."""
    from taskbalance.methods.registry import method_class

    names = ordered_methods()
    lines = [
        "# Method pages",
        "",
        "Every method the registry knows (`taskbalance.list_methods()`), one page each: the",
        "paper, what it needs from the gradient engine, its levels, hyperparameters, a runnable",
        "example, and the formula, cost and choices from its docstrings. AdaTask is an",
        "optimizer, not a method: [its page](../../site/adatask.md).",
        "",
        "| method | paper | needs | default level |",
        "|---|---|---|---|",
    ]
    for name in names:
        cls = method_class(name)
        title = _title(importlib.import_module(cls.__module__).__doc__)
        lines.append(
            f"| [{title}]({name}.md) | {cls.paper} | {cls.requires.value} "
            f"| {cls.default_level or '-'} |"
        )
    lines += ["", "```{toctree}", ":hidden:", "", *names, "```", ""]
    return "\n".join(lines)


def figures_page() -> str:
    """The benchmark figures page: every PNG under benchmarks/results/, by folder."""
    lines = [
        "# Benchmark figures",
        "",
        "Every figure committed under `benchmarks/results/`, by result folder; the tables and",
        "how they were made are on the [results](../results.md) and",
        "[benchmark protocol](../benchmarks.md) pages.",
        "",
    ]
    pictures = sorted(FIGURES.rglob("*.png"))
    if not pictures:
        lines.append("No figure is committed yet.")
    folder = None
    for picture in pictures:
        relative = picture.relative_to(FIGURES)
        if relative.parent != folder:
            folder = relative.parent
            lines += [f"## `{folder.as_posix()}`", ""]
        lines += [f"![{relative.as_posix()}](../../benchmarks/results/{relative.as_posix()})", ""]
    return "\n".join(lines)


def draw_diagnostics_figure(target: Path) -> None:
    """Run the diagnostics page's first example, which saves its plot, and keep the plot."""
    (example,) = examples(DIAGNOSTICS_PAGE.read_text(encoding="utf-8"))[:1]
    with tempfile.TemporaryDirectory() as work:
        script = Path(work) / "example.py"
        script.write_text(example, encoding="utf-8")
        cwd = Path.cwd()
        os.chdir(work)  # the example writes its figure next to itself, as a user's script would
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its printout is for the reader
                runpy.run_path(str(script), run_name="__main__")
        finally:
            os.chdir(cwd)
        shutil.copyfile(Path(work) / DIAGNOSTICS_FIGURE, target)


def _write(path: Path, text: str) -> None:
    """Write only when the text changed, so that Sphinx does not reread unchanged pages."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def generated_pages() -> dict[str, str]:
    """Every generated Markdown page, by its path relative to _generated/."""
    pages = {"methods/index.md": methods_index(), "figures.md": figures_page()}
    pages |= {f"methods/{name}.md": method_page(name) for name in ordered_methods()}
    return pages


def autodoc_targets(pages: dict[str, str]) -> list[tuple[str, str]]:
    """What the site's autodoc directives document, as ``(kind, dotted name)`` with kind
    ``module``, ``class`` or ``function``, from the hand-written pages and the generated
    ``pages`` (by their path relative to _generated/)."""
    texts = [
        p.read_text(encoding="utf-8")
        for p in sorted(DOCS.rglob("*.md"))
        if "_build" not in p.parts and GENERATED not in p.parents
    ]
    return [target for text in [*texts, *pages.values()] for target in AUTODOC.findall(text)]


def documented_modules(pages: dict[str, str]) -> list[str]:
    """The modules an ``automodule`` directive documents (see :func:`autodoc_targets`)."""
    return [name for kind, name in autodoc_targets(pages) if kind == "module"]


def toplevel_table(modules: list[str]) -> str:
    """A table of ``taskbalance.__all__``: each name linked to the documented module that
    exports it (by ``__all__``, or by defining it), the first in ``modules`` order."""
    import taskbalance

    lines = ["| name | documented as |", "|---|---|"]
    for name in taskbalance.__all__:
        obj = getattr(taskbalance, name)
        for module_name in modules:
            module = importlib.import_module(module_name)
            exported = getattr(module, "__all__", None)
            defined = getattr(obj, "__module__", None) == module_name
            if getattr(module, name, None) is obj and (name in exported if exported else defined):
                lines.append(f"| `taskbalance.{name}` | {{py:obj}}`{module_name}.{name}` |")
                break
        else:
            raise LookupError(f"taskbalance.{name} is documented by no automodule of the site")
    return "\n".join(lines) + "\n"


def write_all() -> None:
    """Write the generated pages and the diagnostics figure into docs/_generated/."""
    pages = generated_pages()
    for relative, text in pages.items():
        _write(GENERATED / relative, text)
    # Not a page of its own (.inc): the API reference's index includes it.
    _write(GENERATED / "api_toplevel.inc", toplevel_table(documented_modules(pages)))
    # A method removed from the registry must not leave its old page behind.
    for stale in (GENERATED / "methods").glob("*.md"):
        if f"methods/{stale.name}" not in pages:
            stale.unlink()
    draw_diagnostics_figure(GENERATED / DIAGNOSTICS_FIGURE)
