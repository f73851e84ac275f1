"""Run the site's Python examples in one fresh interpreter: ``python run_blocks.py IN OUT``.

IN is a JSON list of ``{"id", "code", "prelude"}``; OUT receives ``{id: None or traceback}``.
One process for every block keeps the cost of importing torch to once, and keeps what the
examples change globally (torch's compile settings, the working directory) out of the test
session. Each block gets a fresh namespace and working directory, and any warning is an error:
an example that warns shows the reader a problem.
"""

import contextlib
import io
import json
import linecache
import os
import sys
import tempfile
import traceback
import warnings

PRELUDE = """
import torch
from torch import nn

import taskbalance

torch.manual_seed(0)
model = nn.Module()
model.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
model.heads = nn.ModuleDict({"seg": nn.Linear(8, 1), "depth": nn.Linear(8, 1)})
loss_fn = {"seg": nn.functional.mse_loss, "depth": nn.functional.mse_loss}
x, ys = torch.randn(16, 4), {"seg": torch.randn(16, 1), "depth": torch.randn(16, 1)}
loader = [(x, ys)]
z = model.trunk(x)
losses = {t: loss_fn[t](model.heads[t](z), ys[t]) for t in ("seg", "depth")}
method = taskbalance.IMTLL(tasks=["seg", "depth"])
"""
"""What a fragment of a training loop (a README snippet) may take as given: a two-task model
with ``trunk`` and ``heads``, one batch, its ``losses``, a loss-level ``method``."""


def run(block: dict) -> str | None:
    # Tracebacks then quote the example's lines, not only their numbers.
    linecache.cache[block["id"]] = (len(block["code"]), None, block["code"].splitlines(True), "")
    namespace = {"__name__": "__main__"}
    with tempfile.TemporaryDirectory() as work, contextlib.chdir(work):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("error")
                if block["prelude"]:
                    exec(compile(PRELUDE, "<prelude>", "exec"), namespace)
                exec(compile(block["code"], block["id"], "exec"), namespace)
        except BaseException:
            return traceback.format_exc()
    return None


def main() -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    with open(sys.argv[1], encoding="utf-8") as file:
        blocks = json.load(file)
    results = {block["id"]: run(block) for block in blocks}
    with open(sys.argv[2], "w", encoding="utf-8") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main()
