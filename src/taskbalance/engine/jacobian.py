"""Per-task gradients: the one place where the Jacobian and its Gramian are formed.

The Jacobian is kept as one block per input tensor, ``block[t] = d loss_t / d input`` of shape
``(T, *input.shape)``, exactly as autograd returns it: no ``T x n`` concatenation is made for
methods that need only the Gramian ``K = sum_blocks B B^T`` or a weighted sum of the rows.
A future distributed all-reduce of the Jacobian (or of the Gramian) belongs here and only here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

JacobianMode = Literal["auto", "batched", "loop"]
Blocks = list[Tensor | None]


class SparseGradientError(ValueError):
    """A shared tensor gets a sparse gradient (``nn.Embedding(sparse=True)``), which a row of the
    ``T x n`` Jacobian cannot hold. The message says which input and what to use instead.

    Attributes:
        index: the position of that tensor among the inputs (``-1`` when unknown).
    """

    def __init__(self, message: str, index: int = -1) -> None:
        super().__init__(message)
        self.index = index


def sparse_gradient_message(which: str | None) -> str:
    """Why a sparse gradient is refused, and what to do, for the shared parameter described by
    ``which`` (a name or a position; ``None`` when autograd did not say which)."""
    subject = "a shared parameter" if which is None else f"shared parameter {which}"
    return (
        f"{subject} gets a sparse gradient (nn.Embedding(sparse=True)), which "
        "the per-task Jacobian cannot hold. Gramian methods take it exactly with "
        "gramian_path='auto' or 'layerwise' (a sparse update on the looked-up rows); "
        "otherwise use nn.Embedding(sparse=False) or level='feature'"
    )


def dense_or_refuse(grad: Tensor, index: int) -> Tensor:
    """``grad`` itself, or :class:`SparseGradientError` naming input ``index`` if it is sparse.

    >>> dense_or_refuse(torch.ones(2), 0)
    tensor([1., 1.])
    """
    if grad.layout != torch.strided:
        raise SparseGradientError(sparse_gradient_message(f"#{index}"), index)
    return grad


_warned_fallback = False


class Workspace:
    """Buffers for the stacked per-task gradients, reused from one step to the next.

    On CPU, a fresh ``T x n`` buffer every step costs page faults comparable to the backward
    passes themselves (a profile of the benchmarks/step_time.py MLP at T = 3: forward, per-task
    gradients and stacking took 8.0 ms into fresh memory, 4.2 ms into reused memory). Blocks
    written into a workspace are overwritten by the next step, so only callers that do not hand
    the blocks out use one.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, Tensor] = {}
        self._matrix: Tensor | None = None
        self._filled: list | None = None
        """The block list that the loop last wrote into ``_matrix``, all of it."""

    def views(self, num_tasks: int, inputs: Sequence[Tensor]) -> list[Tensor] | None:
        """One ``(T, *input.shape)`` view per input into a single ``T x n`` matrix (so that a
        Jacobian method gets the matrix without a copy), or ``None`` when the inputs do not
        share a dtype and device."""
        like = inputs[0]
        if any(t.dtype != like.dtype or t.device != like.device for t in inputs):
            return None
        sizes = [t.numel() for t in inputs]
        matrix = self.buffer(-1, (num_tasks, sum(sizes)), like)
        self._matrix, self._filled = matrix, None
        parts = matrix.split(sizes, dim=1)
        return [part.view(num_tasks, *t.shape) for part, t in zip(parts, inputs, strict=True)]

    def matrix_of(self, blocks: list) -> Tensor | None:
        """The ``T x n`` matrix that ``blocks`` are views of, if the loop filled it whole."""
        return self._matrix if self._filled is blocks else None

    def filled(self, blocks: list) -> None:
        """Record that ``blocks`` (views from :meth:`views`) now hold the whole matrix."""
        self._filled = blocks

    def buffer(self, index: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised buffer of ``shape`` with ``like``'s dtype and device."""
        buffer = self._buffers.get(index)
        if (
            buffer is None
            or buffer.shape != shape
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            buffer = like.new_empty(shape)
            self._buffers[index] = buffer
        return buffer


def task_jacobian(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    mode: JacobianMode = "auto",
    workspace: Workspace | None = None,
) -> Blocks:
    """The gradient of every task loss w.r.t. every input, one block per input.

    Args:
        outputs: the T task losses, each a scalar tensor with its own graph. Pass them
            separately, not stacked: a stacked vector ties every task's backward to every
            head, so each per-task pass would visit all T heads.
        inputs: the tensors to differentiate with respect to (shared parameters, or the
            shared representation z).
        mode: ``"loop"`` runs T ordinary backward passes, each visiting only its own task's
            subgraph; ``"batched"`` differentiates all T losses in one vectorised backward
            (``torch.autograd.grad(..., is_grads_batched=True)``), which visits every head T
            times; ``"auto"`` is the loop on CPU, where it measured faster at every T
            (benchmarks/step_time.py), and the batched call elsewhere, falling back to the
            loop, with one warning, where an operation of the model has no batching rule.
        workspace: where the loop stacks the per-task gradients (reused across steps); the
            blocks then live in it and are overwritten by the next call that uses it.

    Returns:
        For each input, a tensor of shape ``(T, *input.shape)``, or ``None`` when no task
        depends on that input. The graph is retained for the caller's later backward.

    >>> x = torch.ones(3, requires_grad=True)
    >>> task_jacobian([x.sum(), (2 * x).sum()], [x])[0]
    tensor([[1., 1., 1.],
            [2., 2., 2.]])
    """
    if mode not in ("auto", "batched", "loop"):
        raise ValueError(f"jacobian mode must be 'auto', 'batched' or 'loop', got {mode!r}")
    try:
        if mode == "batched" or (mode == "auto" and batching_pays_off(outputs[0].device)):
            try:
                return batched_grads(outputs, inputs)
            except RuntimeError as error:
                if mode == "batched":
                    raise
                warn_batching_fallback(error)
        return _loop(outputs, inputs, workspace)
    except RuntimeError as error:
        if "donated buffers" in str(error):
            raise RuntimeError(_DONATED_BUFFERS) from error
        raise


_DONATED_BUFFERS = (
    "per-task gradients need one backward per task through the same graph "
    "(retain_graph=True), which a torch.compile'd module refuses while it donates its "
    "buffers. Either set torch._functorch.config.donated_buffer = False before compiling, "
    "or use level='feature' so that the per-task passes run through the heads only"
)


def batching_pays_off(device: torch.device) -> bool:
    """On CPU the loop measured faster than vmap; elsewhere batching saves kernel launches."""
    return device.type != "cpu"


def batched_grads(outputs: Sequence[Tensor], inputs: Sequence) -> Blocks:
    """The gradients of every output w.r.t. ``inputs`` (tensors or autograd ``GradientEdge``s)
    in one batched backward: one block ``(T, *input.shape)`` per input (``None`` where no
    output reaches it)."""
    num_tasks = len(outputs)
    basis = torch.eye(num_tasks, dtype=outputs[0].dtype, device=outputs[0].device)
    try:
        grads = torch.autograd.grad(
            [output.reshape(()) for output in outputs],
            inputs,
            grad_outputs=list(basis.unbind(dim=1)),
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except NotImplementedError as error:  # a sparse gradient has no batching rule
        if "Sparse" not in str(error):
            raise
        raise SparseGradientError(sparse_gradient_message(None)) from None
    return [None if g is None else dense_or_refuse(g, i) for i, g in enumerate(grads)]


def _loop(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], workspace: Workspace | None
) -> Blocks:
    # Each task's gradients are copied into their row as soon as they exist, so that at most
    # one task's gradients live beside the Jacobian (peak memory about (1 + 1/T) times it).
    num_tasks = len(outputs)
    views = None if workspace is None else workspace.views(num_tasks, inputs)
    blocks: Blocks = [None] * len(inputs)
    one = seed_one(outputs[0])
    for task, output in enumerate(outputs):
        grads = torch.autograd.grad(
            output, inputs, grad_outputs=one, retain_graph=True, allow_unused=True
        )
        for i, grad in enumerate(grads):
            block = blocks[i]
            if grad is None:
                if block is not None:
                    block[task].zero_()
                continue
            grad = dense_or_refuse(grad, i)
            if block is None:
                block = grad.new_empty((num_tasks, *grad.shape)) if views is None else views[i]
                block[:task].zero_()  # the earlier tasks did not reach this input
                blocks[i] = block
            block[task].copy_(grad)
        del grads
    if views is not None and workspace is not None:
        for block, view in zip(blocks, views, strict=True):
            if block is None:
                view.zero_()  # no task reaches it: zeros in the matrix, None as a block
        workspace.filled(blocks)
    return blocks


def seed_one(output: Tensor) -> Tensor:
    """The seed ``d loss / d loss = 1``, made once for every task's pass (autograd would
    otherwise allocate one per pass)."""
    return torch.ones((), dtype=output.dtype, device=output.device)


def warn_batching_fallback(error: RuntimeError) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            "taskbalance: the batched per-task backward failed, so per-task gradients are "
            f"computed by a loop of backward passes from now on (slower). Cause: {error}. "
            "Pass jacobian_mode='loop' to silence this warning.",
            RuntimeWarning,
            stacklevel=3,
        )


def gramian(blocks: Blocks, num_tasks: int) -> Tensor:
    """``K = G G^T`` from the Jacobian's blocks, summed block by block (no concatenation).

    Computed in float32 at least (half-precision gradients are upcast), because the methods'
    solves are ill-conditioned in half precision.

    >>> gramian([torch.tensor([[1.0, 0.0], [1.0, 1.0]])], 2)
    tensor([[1., 1.],
            [1., 2.]])
    """
    result: Tensor | None = None
    for block in blocks:
        if block is None:
            continue
        rows = block.reshape(num_tasks, -1)
        if rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.float()
        product = rows @ rows.T
        result = product if result is None else result + product
    if result is None:
        raise ValueError("no task depends on any of the inputs: the Jacobian is empty")
    return result


def combine(weights: Tensor, blocks: Blocks) -> list[Tensor | None]:
    """The weighted sum of the task gradients, ``sum_t weights[t] * block[t]``, per block.

    >>> combine(torch.tensor([1.0, 2.0]), [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), None])
    [tensor([1., 2.]), None]
    """
    return [None if block is None else weighted_rows(weights, block) for block in blocks]


def weighted_rows(weights: Tensor, block: Tensor) -> Tensor:
    """``sum_t weights[t] block[t]`` as one matrix-vector product (no tensordot wrapper)."""
    if weights.dtype != block.dtype:  # a no-op .to() still costs microseconds of dispatch
        weights = weights.to(block.dtype)
    return (weights @ block.reshape(block.shape[0], -1)).reshape(block.shape[1:])


def to_matrix(
    blocks: Blocks, inputs: Sequence[Tensor], num_tasks: int, workspace: Workspace | None = None
) -> Tensor:
    """The Jacobian as one ``(T, n)`` matrix (zeros where a block is ``None``): a copy, made
    only for methods that need the rows themselves, and for reductions across ranks; no copy
    when the blocks are the views of ``workspace``'s matrix that the loop filled.

    >>> to_matrix([torch.ones(2, 2), None], [torch.ones(2), torch.ones(1)], 2)
    tensor([[1., 1., 0.],
            [1., 1., 0.]])
    """
    whole = None if workspace is None else workspace.matrix_of(blocks)
    if whole is not None:
        return whole
    return torch.cat(
        [
            torch.zeros(num_tasks, t.numel(), dtype=t.dtype, device=t.device)
            if b is None
            else b.reshape(num_tasks, -1)
            for t, b in zip(inputs, blocks, strict=True)
        ],
        dim=1,
    )


def from_matrix(matrix: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Split a ``(T, n)`` matrix, or an ``(n,)`` vector, back into one block per input.

    >>> [b.shape for b in from_matrix(torch.zeros(2, 3), [torch.ones(2), torch.ones(1)])]
    [torch.Size([2, 2]), torch.Size([2, 1])]
    """
    lead = matrix.shape[:-1]
    parts = matrix.split([t.numel() for t in inputs], dim=-1)
    return [part.reshape(*lead, *t.shape) for part, t in zip(parts, inputs, strict=True)]
