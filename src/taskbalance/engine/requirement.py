"""What a method asks of the engine: how much per-task gradient information, and where."""

from __future__ import annotations

import enum
from typing import Literal

Level = Literal["feature", "parameter"]
"""Where per-task gradients are taken: w.r.t. the shared representation z, or the parameters."""


class Requirement(enum.Enum):
    """What a method needs from the gradient engine, from cheapest to dearest."""

    LOSSES = "losses"
    """The loss values only: one ordinary backward pass."""
    GRAMIAN = "gramian"
    """The T x T Gramian of the per-task gradients (at feature or parameter level)."""
    JACOBIAN = "jacobian"
    """The T x n matrix of per-task gradients itself."""
