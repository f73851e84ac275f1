"""Per-coordinate state of Jacobian methods (ExcessMTL's accumulators, MoCo's tracked
gradients): a T x n buffer whose width n is only known at the first step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class CoordinateState(nn.Module):
    """Mixin for a method with one T x n buffer, named by ``coordinate_buffer``, that starts
    with width 0 and takes the Jacobian's width (and dtype) at the first step."""

    coordinate_buffer: ClassVar[str]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # A saved state has its width already: adopt it before the ordinary loading.
        key = prefix + self.coordinate_buffer
        if key in state_dict:
            current = getattr(self, self.coordinate_buffer)
            setattr(
                self,
                self.coordinate_buffer,
                torch.empty_like(state_dict[key], device=current.device),
            )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def coordinate_state(self, jacobian: Tensor, initial: Callable[[Tensor], Tensor]) -> Tensor:
        """The buffer, created as ``initial(jacobian)`` at the first step.

        Raises:
            ValueError: a Jacobian of another width than the state's (at feature level, a
                change of batch size).
        """
        state = getattr(self, self.coordinate_buffer)
        if state.shape[1] == 0:
            state = initial(jacobian)
            setattr(self, self.coordinate_buffer, state)
        elif state.shape != jacobian.shape:
            raise ValueError(
                f"{type(self).__name__} keeps per-coordinate state of width {state.shape[1]}, got "
                f"gradients of width {jacobian.shape[1]}; at feature level the batch size must "
                "stay fixed (e.g. drop_last=True), or use level='parameter'"
            )
        return state
