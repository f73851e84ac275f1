"""Where a step's small values are worked on: on the host, or where the tensors live.

On the CPU the host *is* the device: the T x T Gramian, the solve, the checks and the record
are cheapest as float64 numpy on a few numbers (0.5-3 us an operation against torch's 2-9 us
of dispatch). On an accelerator every value read back to the host (``.item()``, ``.cpu()``, a
numpy solve, ``bool(tensor)``) makes the host wait until the device has finished everything
queued, and leaves the device idle while the host solves and queues the rest of the step. So
a step whose tensors live on an accelerator keeps its Gramian, its solve (the batched torch
solvers of :mod:`taskbalance.methods._device_solvers`), its weights and its record there, and
reads nothing back unless a check the user asked for needs it (see ``on_nonfinite``).

The meta device counts as an accelerator: a step run on meta tensors fails at the first value
it reads, which is how the tests prove the accelerator path reads none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor

__all__ = ["device_resident", "on_accelerator"]

_forced = [False]


def on_accelerator(tensor: Tensor) -> bool:
    """Whether ``tensor``'s step takes the accelerator path (no value read back to the host):
    true off the CPU, and on the CPU inside :func:`device_resident`.

    >>> import torch
    >>> on_accelerator(torch.zeros(1)), on_accelerator(torch.zeros(1, device="meta"))
    (False, True)
    """
    return _forced[0] or tensor.device.type != "cpu"


@contextlib.contextmanager
def device_resident(enabled: bool = True) -> Iterator[None]:
    """Run the accelerator path on CPU tensors: the same solvers and checks as on a GPU, with
    values one can compare with the host path (tests, and users checking that the two agree).

    >>> import torch
    >>> with device_resident():
    ...     on_accelerator(torch.zeros(1))
    True
    """
    previous = _forced[0]
    _forced[0] = enabled
    try:
        yield
    finally:
        _forced[0] = previous
