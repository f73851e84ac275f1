"""Read-only diagnostics: what the engine computed, turned into the quantities the seed papers
argue with (EMTL's ``r_t``, AdaTask's AU, IMTL's equal projections, gradient conflict), a
sampled recorder with a tidy table, and plots.
"""

from taskbalance.diagnostics.au import AdamAU, AUTracker
from taskbalance.diagnostics.plots import plot_recorder
from taskbalance.diagnostics.quantities import (
    conflict_rate,
    cosines_from,
    gramian_from,
    projections,
    relative_contributions,
    spread,
)
from taskbalance.diagnostics.recorder import COLUMNS, Recorder

__all__ = [
    "COLUMNS",
    "AUTracker",
    "AdamAU",
    "Recorder",
    "conflict_rate",
    "cosines_from",
    "gramian_from",
    "plot_recorder",
    "projections",
    "relative_contributions",
    "spread",
]
