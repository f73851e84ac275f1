"""A warning for the classic bug of the methods with parameters of their own: an optimizer
built without ``method.parameters()``, so that the parameters get gradients and never move."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from taskbalance.engine.placement import on_accelerator

STALE_CALLS = 20
"""Steps of gradients without a change after which the warning is given (once)."""


class StaleWatch:
    """Call once per step with the parameter; warns once after :data:`STALE_CALLS` steps in
    which it had a non-zero gradient but did not change. Not on an accelerator, where the
    comparison would read the parameter back every step.

    >>> watch = StaleWatch("IMTLL", "loss scales")
    >>> watch(nn.Parameter(torch.zeros(2)))
    """

    def __init__(self, owner: str, what: str) -> None:
        self.owner = owner
        self.what = what
        self.last: Tensor | None = None
        self.calls = 0

    def __call__(self, parameter: nn.Parameter) -> None:
        if on_accelerator(parameter):
            return
        current = parameter.detach()
        if self.last is not None and parameter.grad is not None:
            unchanged = torch.equal(current, self.last) and bool(parameter.grad.any())
            self.calls = self.calls + 1 if unchanged else 0
            if self.calls == STALE_CALLS:
                warnings.warn(
                    f"{self.owner}: the {self.what} have received gradients for {STALE_CALLS} "
                    "steps but never changed; add method.parameters() (or "
                    "method.param_group()) to your optimizer",
                    RuntimeWarning,
                    stacklevel=6,
                )
        self.last = current.clone()
