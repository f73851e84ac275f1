"""The tests of the documentation site import its generator, docs/sitegen.py, as Sphinx's
conf.py does: from the docs folder put on the path."""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
if str(DOCS) not in sys.path:
    sys.path.insert(0, str(DOCS))
