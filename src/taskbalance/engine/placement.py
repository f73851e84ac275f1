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
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["HostGramian", "device_resident", "on_accelerator", "to_host", "to_tensor"]

_forced = [False]


def on_accelerator(tensor: Tensor) -> bool:
    """Whether ``tensor``'s step takes the accelerator path (no value read back to the host):
    true off the CPU, and on the CPU inside :func:`device_resident`.

    >>> import torch
    >>> on_accelerator(torch.zeros(1)), on_accelerator(torch.zeros(1, device="meta"))
    (False, True)
    """
    return _forced[0] or tensor.device.type != "cpu"


def to_host(tensor: Tensor) -> np.ndarray:
    """The host path's view of a small tensor: ``tensor`` as a float64 numpy array on the
    host (no copy for a CPU float64 tensor).

    >>> import torch
    >>> to_host(torch.tensor([1.0, 2.0])).dtype
    dtype('float64')
    """
    # Chained positional conversions, each a no-op when it has nothing to do: the keyword form
    # of .to() costs several microseconds of argument parsing on every step.
    return tensor.detach().cpu().double().numpy()


_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def to_tensor(array: np.ndarray, like: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """The way back from :func:`to_host`: ``array`` as a tensor of ``dtype`` on ``like``'s
    device (sharing ``array``'s memory where it already has that dtype, on the CPU).

    >>> to_tensor(np.ones(2), torch.zeros(1))
    tensor([1., 1.], dtype=torch.float64)
    """
    numpy_dtype = _NUMPY_DTYPES.get(dtype)
    if like.device.type == "cpu" and numpy_dtype is not None:
        # numpy's cast and a zero-copy wrap: about 3 us, where .to(dtype) takes about 14.
        return torch.from_numpy(np.ascontiguousarray(array, dtype=numpy_dtype))
    return torch.from_numpy(np.ascontiguousarray(array)).to(like.device, dtype)


@dataclass(frozen=True)
class HostGramian:
    """The T x T Gramian ``K = G G^T`` of a CPU step on the host, as its norms and cosines
    (``K = diag(norms) cosines diag(norms)``), for a method's ``host_weights``: the step
    computes these for its record anyway, so a method's host solve starts from them instead of
    converting tensors back and forth (tens of microseconds a step on a small model). Float64;
    the method must not edit them.

    Attributes:
        norms: ``||g_t|| = sqrt(K_tt)``, every one finite and positive (a step whose Gramian
            has a zero or non-finite gradient calls ``shared_weights`` instead).
        cosines: ``K_st / (||g_s|| ||g_t||)``.
        eps: the machine epsilon of the dtype ``K`` was computed in, the unit of a solve's
            rank cut-off.
    """

    norms: np.ndarray
    cosines: np.ndarray
    eps: float


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
