"""The parameter-level Gramian without the Jacobian: ``K = G G^T`` accumulated layer by layer.

For a layer that computes ``Y = X W^T + b`` from rows ``X`` (R x in), task t's gradient of
``W`` is ``dY_t^T X``, so

    K_W[s, t] = <dY_s^T X, dY_t^T X> = <(X X^T) dY_s, dY_t>,     K_b[s, t] = (1^T dY_s) . (1^T dY_t)

needs only the per-task output gradients ``dY`` (T x R x out) and the rows ``X``, never the
``T x out x in`` block of the Jacobian. The ``dY`` are taken by one backward per task (or one
batched backward) that stops at the layers' outputs (``GradientEdge``), so the weights' own
gradients are never computed; ``X`` is read from the tensors autograd saved for the backward
of the layer's node, so nothing has to be hooked before the forward. Every ``dY`` is the true
per-task gradient at that layer, through everything above it (nested layers included).

Rules, keyed by the autograd node that reads the parameter:

- ``AddmmBackward0`` / ``MmBackward0`` (``nn.Linear``, ``F.linear``, ``x @ W``): the rows
  above; ``alpha`` and ``beta`` of ``addmm`` are honoured.
- ``ConvolutionBackward0`` (``nn.Conv2d``, not transposed, one group): the same with the
  unfolded input (im2col), one row per batch element and output position.
- ``EmbeddingBackward0`` (``nn.Embedding``): task t's gradient is ``dY_t`` scattered onto the
  looked-up rows, kept compact on the U distinct rows of the batch; for ``sparse=True`` the
  combination is a sparse gradient on those rows, as the embedding's own backward gives.
- per-feature parameters (``LayerNorm``, ``BatchNorm``, ``GroupNorm`` affine): their T rows
  are ``T x D`` numbers, as small as a bias, so they are taken from autograd directly.

Each Linear/Conv layer takes the rows route only where it is cheaper (estimated flops:
``R^2 in + T R^2 out + T^2 R out`` against the Jacobian block's ``T R out in + T^2 out in``)
and its ``R x R`` product ``X X^T`` is no larger than the block it replaces; otherwise its
parameters' T rows are taken from autograd (the Jacobian path for that layer alone). A
parameter read by a node without a rule, or by more than one node (tied weights), also takes
the autograd route: exact, but its rows are materialised, which :class:`LayerwiseGramian` reports
so that the caller can warn or refuse.

The step's memory peaks in the deepest passes, where the activation gradients of the lowest
layers coexist with every piece held so far. Where the parameters taken from autograd lie below
the rows-route layers (a CNN's convolutions on the Jacobian path under a Linear), their passes
run first and the layers' ``dY`` are taken afterwards, in passes that stop at the layers, so
that the ``dY`` are not held at that peak; this repeats the work above the layers (the heads),
and is done only where that work is small (:func:`_capture_apart`).

The combination ``sum_t a_t g_t`` is formed from the same pieces (``(sum_t a_t dY_t)^T X``), so
the shared parameters need no further backward.

Hooks are honoured exactly. A parameter with a gradient hook (``param.register_hook``) takes the
autograd route, where autograd applies the hook to each task's gradient. A tensor hook on a
layer's output (``y.register_hook``, e.g. gradient reversal) runs as a pre-hook of the layer's
node; autograd's capture of ``GradientEdge(node, 0)`` happens before such hooks whenever the
node also has to run for a requested input below it, so each layer's ``dY`` is read by a
pre-hook of its node registered here (which runs after the tensor hooks), and from the capture
only where the node does not run (autograd then applies the tensor hooks to the capture).
Where the ``dY`` are taken in passes of their own, the hooks above the layers run in both sets
of passes (as they run in each task's pass): the gradients are the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.nn import functional

from taskbalance.engine.jacobian import (
    JacobianMode,
    Workspace,
    batched_grads,
    batching_pays_off,
    dense_or_refuse,
    seed_one,
    warn_batching_fallback,
    weighted_rows,
)

GramianPath = Literal["auto", "jacobian", "layerwise"]
"""How the parameter-level Gramian is formed: from the Jacobian's blocks, layer by layer
(:class:`LayerwiseGramian`), or ``"auto"``: layer by layer when that saves work."""

_PER_FEATURE = frozenset(
    {"NativeLayerNormBackward0", "NativeBatchNormBackward0", "NativeGroupNormBackward0"}
)
"""Nodes whose parameters are per-feature vectors: their T gradient rows are cheap to keep."""


_TASK_CHUNK = 4
"""Tasks per product with ``X X^T`` when forming a layer's share of ``K``."""


class UncoveredLayerError(ValueError):
    """The layerwise Gramian was forced, but a shared parameter is read by a layer it has no
    rule for. The message names the autograd node (the layer type) and the parameter."""


@dataclass
class _Rows:
    """A layer ``Y = alpha X W^T + beta b`` read as rows ``X`` (R x in)."""

    node: Node
    weight: int
    bias: int | None
    num_rows: int
    make_rows: Callable[[], Tensor]
    """Builds ``X`` from the node's saved tensors (only for a layer on the rows route)."""
    to_rows: Callable[[Tensor], Tensor]
    """Reshapes the output gradient ``(k, *Y.shape)`` to ``(k, R, out)``."""
    weight_shape: torch.Size
    transposed: bool
    """Whether ``W`` (out x in) enters as ``W^T``; otherwise the parameter is ``in x out``."""
    alpha: float = 1.0
    beta: float = 1.0
    rows: Tensor | None = None

    def route(self, num_tasks: int, force: bool) -> Literal["rows", "block"]:
        """The rows route where it is cheaper in flops (or forced), and only where the
        ``R x R`` product ``X X^T`` is no larger than the Jacobian block it replaces."""
        numel = self.weight_shape.numel()
        r = self.num_rows
        fan_out = self.weight_shape[0] if self.transposed else self.weight_shape[-1]
        fan_in = numel // fan_out
        if r * r > num_tasks * numel:
            return "block"
        by_rows = r * r * fan_in + num_tasks * r * r * fan_out + num_tasks**2 * r * fan_out
        by_block = num_tasks * r * numel + num_tasks**2 * numel
        return "rows" if force or by_rows < by_block else "block"


@dataclass
class _Embedding:
    """An embedding lookup ``Y = W[indices]``; gradients kept on the distinct rows only."""

    node: Node
    weight: int
    unique: Tensor
    inverse: Tensor
    scale: Tensor | None
    """Per distinct row: 0 for the padding index, ``1 / count`` under scale_grad_by_freq."""
    weight_shape: torch.Size
    sparse: bool
    """``nn.Embedding(sparse=True)``: the update is a sparse gradient on the looked-up rows."""
    padding: int


@dataclass(frozen=True)
class Uncovered:
    """A shared parameter whose T gradient rows the layerwise path has to materialise."""

    index: int
    shape: tuple[int, ...]
    reason: str

    def describe(self, names: Sequence[str] | None = None) -> str:
        """The parameter (by name when ``names`` are given, else by position) and why."""
        which = f"'{names[self.index]}'" if names else f"#{self.index}"
        return f"shared parameter {which} (shape {self.shape}): {self.reason}"


@dataclass
class LayerPlan:
    """How each shared parameter's share of ``K`` is formed in one step.

    Attributes:
        rows: Linear/Conv layers on the rows route.
        embeddings: embedding layers (compact on the batch's distinct rows).
        direct: indices of parameters whose T rows are taken from autograd.
        uncovered: the parameters among ``direct`` that no rule covers.
        capture_apart: take the layers' output gradients (``rows``, ``embeddings``) in passes
            of their own, after those of the ``direct`` rows (see :func:`_capture_apart`).
    """

    rows: list[_Rows]
    embeddings: list[_Embedding]
    direct: list[int]
    uncovered: list[Uncovered]
    capture_apart: bool = False

    @property
    def saves_work(self) -> bool:
        """Whether some layer avoids its Jacobian block (else the Jacobian path is as cheap)."""
        return bool(self.rows or self.embeddings)


#: The share of the free memory the T x n Jacobian may take before ``"auto"`` avoids it: the rest
#: of the step (activations, their gradients, the optimizer) needs the remainder.
JACOBIAN_MEMORY_SHARE = 0.5


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``: CUDA's free memory, or the host's available memory on Linux
    (``None`` where it cannot be read: the Jacobian is then assumed to fit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def jacobian_fits(num_tasks: int, params: Sequence[Tensor]) -> bool:
    """Whether the ``T x n`` Jacobian of ``params`` takes at most :data:`JACOBIAN_MEMORY_SHARE`
    of the free memory of their device.

    >>> jacobian_fits(3, [torch.zeros(10)])
    True
    """
    size = num_tasks * sum(p.numel() * p.element_size() for p in params)
    free = available_memory(params[0].device) if params else None
    return free is None or size <= JACOBIAN_MEMORY_SHARE * free


def plan_layers(outputs: Sequence[Tensor], params: Sequence[Tensor], force: bool) -> LayerPlan:
    """Find, from the autograd graph of ``outputs``, the rule for every shared parameter.

    Args:
        outputs: the T task losses.
        params: the shared parameters (leaves).
        force: put every covered Linear/Conv layer on the rows route, whatever it costs
            (as long as its ``R x R`` product fits in its block's size).
    """
    num_tasks = len(outputs)
    consumers = _consumers(outputs)
    index = {get_gradient_edge(p).node: i for i, p in enumerate(params)}
    layers: dict[Node, dict[str, int]] = {}
    direct: list[int] = []
    uncovered: list[Uncovered] = []
    for accumulator, i in index.items():
        readers = consumers.get(accumulator, [])
        if not readers:
            continue  # no task reaches it: its gradient is None, as on the Jacobian path
        if _hooked(params[i]):
            direct.append(i)  # autograd applies the hook to each task's gradient
            continue
        found = _role(readers, consumers)
        if found is not None:
            node, role = found
            layers.setdefault(node, {})[role] = i
            continue
        direct.append(i)
        names = sorted({type(node).__name__ for node, _ in readers})
        if len(readers) > 1:
            reason = f"read by {len(readers)} autograd nodes ({', '.join(names)})"
        elif names[0] in _PER_FEATURE:
            continue  # covered: per-feature rows are as cheap as a bias's
        else:
            reason = f"read by {names[0]}, for which the layerwise Gramian has no rule"
        uncovered.append(Uncovered(i, tuple(params[i].shape), reason))
    plan = LayerPlan([], [], direct, uncovered)
    for node, roles in layers.items():
        _add_layer(plan, node, roles, params, num_tasks, force)
    plan.capture_apart = _capture_apart(outputs, consumers, plan, params)
    return plan


def _hooked(param: Tensor) -> bool:
    """Whether ``param`` has gradient hooks (``register_hook``), which only autograd applies."""
    return bool(param._backward_hooks)


def _consumers(outputs: Sequence[Tensor]) -> dict[Node, list[tuple[Node, int]]]:
    """For every node of the graph, the nodes that read it and at which input slot."""
    consumers: dict[Node, list[tuple[Node, int]]] = {}
    pending = [out.grad_fn for out in outputs if out.grad_fn is not None]
    seen = set(pending)
    while pending:
        node = pending.pop()
        for slot, (child, _) in enumerate(node.next_functions):
            if child is None:
                continue
            consumers.setdefault(child, []).append((node, slot))
            if child not in seen:
                seen.add(child)
                pending.append(child)
    return consumers


#: The most backward work, as a share of the passes that take the ``direct`` rows, that the
#: passes taking the layers' output gradients apart may repeat.
CAPTURE_APART_SHARE = 0.1


def _capture_apart(
    outputs: Sequence[Tensor],
    consumers: dict[Node, list[tuple[Node, int]]],
    plan: LayerPlan,
    params: Sequence[Tensor],
) -> bool:
    """Whether the layers' output gradients are better taken in passes of their own.

    The peak of the step is reached in the deepest passes, where the activation gradients of the
    lowest layers (full resolution under a CNN's first convolutions) coexist with everything
    held so far. When the ``direct`` parameters lie below the rows-route layers (convolutions
    on the Jacobian path under a Linear, say), running their passes first, and then passes that
    stop at the layers' outputs, keeps the layers' ``T`` output gradients out of that peak. The
    second set of passes repeats the work above the layers (the heads, mostly), so it is taken
    only where that is at most :data:`CAPTURE_APART_SHARE` of the first set's work, counted as
    the gradient numbers each node receives, times the tasks whose pass runs it.
    """
    layers = {layer.node for layer in (*plan.rows, *plan.embeddings)}
    accumulators = {get_gradient_edge(params[i]).node for i in plan.direct}
    if not layers or not accumulators:
        return False
    # Tasks reaching each node (a bit per task), in topological order from the losses.
    tasks: dict[Node, int] = {}
    for t, out in enumerate(outputs):
        if out.grad_fn is not None:
            tasks[out.grad_fn] = tasks.get(out.grad_fn, 0) | 1 << t
    waiting = {node: len(readers) for node, readers in consumers.items()}
    order = [node for node in tasks if node not in waiting]
    for node in order:  # grows while it is walked
        for child, _ in node.next_functions:
            if child is None:
                continue
            tasks[child] = tasks.get(child, 0) | tasks[node]
            waiting[child] -= 1
            if not waiting[child]:
                order.append(child)
    # A pass runs a node when a requested gradient lies below it.
    above_layers: dict[Node, bool] = {}
    above_accumulators: dict[Node, bool] = {}
    capture = deep = 0
    for node in reversed(order):
        children = [child for child, _ in node.next_functions if child is not None]
        above_layers[node] = any(c in layers or above_layers[c] for c in children)
        above_accumulators[node] = any(c in accumulators or above_accumulators[c] for c in children)
        if above_layers[node] or above_accumulators[node]:
            work = tasks[node].bit_count() * _received(node)
            capture += work if above_layers[node] else 0
            deep += work if above_accumulators[node] else 0
    return deep > 0 and capture <= CAPTURE_APART_SHARE * deep


def _received(node: Node) -> int:
    """How many gradient numbers ``node`` receives in one pass (none counted where torch does
    not expose its inputs' metadata: with none counted anywhere, the passes are not split)."""
    total = 0
    for meta in getattr(node, "_input_metadata", ()):
        size = 1
        for extent in meta.shape:
            size *= extent
        total += size
    return total


def _role(
    readers: list[tuple[Node, int]], consumers: dict[Node, list[tuple[Node, int]]]
) -> tuple[Node, str] | None:
    """The layer node reading a parameter and the parameter's role there, if a rule exists."""
    if len(readers) != 1:
        return None
    node, slot = readers[0]
    name = type(node).__name__
    if name == "TBackward0":  # W^T fed to a matmul, as F.linear does
        above = consumers.get(node, [])
        if len(above) == 1:
            matmul, matmul_slot = above[0]
            kind = type(matmul).__name__
            if (kind, matmul_slot) in (("AddmmBackward0", 2), ("MmBackward0", 1)):
                return matmul, "weight_t"
        return None
    roles = {
        ("AddmmBackward0", 0): "bias",
        ("AddmmBackward0", 2): "weight",
        ("MmBackward0", 1): "weight",
        ("ConvolutionBackward0", 1): "weight_t",
        ("ConvolutionBackward0", 2): "bias",
        ("EmbeddingBackward0", 0): "table",
    }
    role = roles.get((name, slot))
    return None if role is None else (node, role)


def _add_layer(
    plan: LayerPlan,
    node: Node,
    roles: dict[str, int],
    params: Sequence[Tensor],
    num_tasks: int,
    force: bool,
) -> None:
    kind = type(node).__name__
    members = sorted(roles.values())
    if kind == "EmbeddingBackward0":
        plan.embeddings.append(_embedding(node, roles["table"], params))
        return
    if "weight" not in roles and "weight_t" not in roles:
        plan.direct.extend(members)  # a bias alone: its T rows are as small as the Gramian's work
        return
    layer = _rows(node, roles, params)
    if layer is None:
        what = {
            "ConvolutionBackward0": "a transposed, grouped or non-2-D convolution",
            "AddmmBackward0": "an addmm whose first argument is not a bias over the rows",
        }[kind]
        reason = f"read by {kind} ({what}), which has no rule"
        _uncover(plan, members, params, reason)
        return
    if layer.route(num_tasks, force) == "rows":
        layer.rows = layer.make_rows()
        plan.rows.append(layer)
    else:
        plan.direct.extend(members)


def _uncover(plan: LayerPlan, members: list[int], params: Sequence[Tensor], reason: str) -> None:
    plan.direct.extend(members)
    plan.uncovered.extend(Uncovered(i, tuple(params[i].shape), reason) for i in members)


def _rows(node: Node, roles: dict[str, int], params: Sequence[Tensor]) -> _Rows | None:
    kind = type(node).__name__
    weight = roles.get("weight_t", roles.get("weight"))
    assert weight is not None  # a bias alone never reaches here
    shape = params[weight].shape
    transposed = "weight_t" in roles
    if kind == "AddmmBackward0":
        size = node._saved_mat1_sym_sizes[0]
        rows = node._saved_mat1
        alpha, beta = float(node._saved_alpha), float(node._saved_beta)
        bias = roles.get("bias")
        fan_out = shape[0] if transposed else shape[-1]
        if bias is not None and params[bias].numel() != fan_out:
            return None  # addmm's first argument is a matrix, not a bias broadcast over rows
        return _Rows(node, weight, bias, size, lambda: rows, _same, shape, transposed, alpha, beta)
    if kind == "MmBackward0":
        size = node._saved_self_sym_sizes[0]
        rows = node._saved_self
        return _Rows(node, weight, None, size, lambda: rows, _same, shape, transposed)
    # ConvolutionBackward0
    if node._saved_transposed or node._saved_groups != 1 or len(shape) != 4:
        return None
    image = node._saved_input
    stride, padding, dilation = node._saved_stride, node._saved_padding, node._saved_dilation
    positions = 1
    for size, k, s, p, d in zip(image.shape[2:], shape[2:], stride, padding, dilation, strict=True):
        positions *= (size + 2 * p - d * (k - 1) - 1) // s + 1

    def unfold() -> Tensor:
        unfolded = functional.unfold(image, shape[2:], dilation, padding, stride)
        # (B, C kh kw, L) -> one row per batch element and output position (row-major)
        return unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])

    def to_rows(dy: Tensor) -> Tensor:
        return dy.flatten(3).transpose(2, 3).reshape(dy.shape[0], -1, dy.shape[2])

    bias = roles.get("bias")
    return _Rows(node, weight, bias, image.shape[0] * positions, unfold, to_rows, shape, True)


def _same(grad: Tensor) -> Tensor:
    return grad


def _embedding(node: Node, weight: int, params: Sequence[Tensor]) -> _Embedding:
    indices = node._saved_indices.reshape(-1)
    unique, inverse, counts = torch.unique(indices, return_inverse=True, return_counts=True)
    scale = None
    padding = node._saved_padding_idx
    if node._saved_scale_grad_by_freq or padding >= 0:
        dtype = params[weight].dtype
        scale = (
            1.0 / counts.to(dtype)
            if node._saved_scale_grad_by_freq
            else torch.ones(len(unique), dtype=dtype, device=unique.device)
        )
        scale = torch.where(unique == padding, 0.0, scale)
    shape = params[weight].shape
    return _Embedding(node, weight, unique, inverse, scale, shape, node._saved_sparse, padding)


class LayerwiseGramian:
    """``K`` of the per-task gradients of ``outputs`` w.r.t. ``params``, layer by layer.

    Holds, per rows-route layer, the T output gradients ``dY`` (``T x R x out``) and, per
    embedding, the T gradients on the distinct rows, instead of the Jacobian's blocks; the
    parameters of ``plan.direct`` keep their T rows as on the Jacobian path.

    >>> lin = torch.nn.Linear(3, 2)
    >>> x = torch.randn(4, 3)
    >>> losses = [lin(x).sum(), lin(x).pow(2).sum()]
    >>> params = list(lin.parameters())
    >>> layerwise = LayerwiseGramian(losses, params, plan_layers(losses, params, force=True))
    >>> layerwise.gramian.shape
    torch.Size([2, 2])
    """

    def __init__(
        self,
        outputs: Sequence[Tensor],
        params: Sequence[Tensor],
        plan: LayerPlan,
        mode: JacobianMode = "auto",
        workspace: Workspace | None = None,
    ) -> None:
        self.params = tuple(params)
        self.plan = plan
        self.num_tasks = len(outputs)
        self._out_grads: list[Tensor | None] = []
        self._table_grads: list[Tensor | None] = []
        self._direct: list[Tensor | None] = []
        self._collect(outputs, mode, workspace or Workspace())
        self.gramian = self._gramian()

    def _collect(self, outputs: Sequence[Tensor], mode: JacobianMode, workspace: Workspace) -> None:
        plan = self.plan
        nodes = [layer.node for layer in (*plan.rows, *plan.embeddings)]
        edges: list[GradientEdge | Tensor] = [GradientEdge(node, 0) for node in nodes]
        edges += [self.params[i] for i in plan.direct]
        num_rows, num_tables = len(plan.rows), len(plan.embeddings)
        compact: list[Tensor | None] = [None] * len(edges)
        # The direct rows first where the layers' output gradients are taken apart, so that the
        # deepest passes run before those gradients are held (see _capture_apart).
        layers, rest = range(len(nodes)), range(len(nodes), len(edges))
        groups = [rest, layers] if plan.capture_apart else [range(len(edges))]
        batched = mode == "batched" or (mode == "auto" and batching_pays_off(outputs[0].device))
        for group in groups:
            batched = self._passes(outputs, edges, nodes, group, mode, batched, compact, workspace)
        self._out_grads = compact[:num_rows]
        self._table_grads = compact[num_rows : num_rows + num_tables]
        self._direct = compact[num_rows + num_tables :]

    def _passes(
        self,
        outputs: Sequence[Tensor],
        edges: list[GradientEdge | Tensor],
        nodes: list[Node],
        group: range,
        mode: JacobianMode,
        batched: bool,
        compact: list[Tensor | None],
        workspace: Workspace,
    ) -> bool:
        """Every task's gradients at ``edges[group]``, stored into ``compact``: one batched
        backward, or one backward per task. Returns whether batching is still to be tried
        (not after it has failed once and warned)."""
        wanted = [edges[j] for j in group]
        # The layers' edges come first: the group's own layer nodes are a slice of ``nodes``.
        with _AfterTensorHooks(nodes[group.start : group.stop], len(outputs)) as hooks:
            if batched:
                try:
                    grads = hooks.read(batched_grads(outputs, wanted))
                except RuntimeError as error:
                    if mode == "batched" and not isinstance(error, _UnbatchingError):
                        raise
                    warn_batching_fallback(error)
                else:
                    self._store(slice(None), grads, group.start, compact, workspace)
                    return True
            one = seed_one(outputs[0])
            for t, out in enumerate(outputs):
                # Passed straight in, a task's raw gradients are freed as they are stored, so
                # they are not alive during the next task's backward beside the stored ones.
                grads = hooks.read(_task_grads(out, wanted, one))
                self._store(slice(t, t + 1), grads, group.start, compact, workspace)
        return False

    def _store(
        self,
        tasks: slice,
        grads: list[Tensor | None],
        start: int,
        compact: list[Tensor | None],
        workspace: Workspace,
    ) -> None:
        """Fold one pass's gradients (``(k, ...)`` per edge, from edge ``start`` on) into rows
        ``tasks`` of their compact form, allocating each block of ``T`` rows on first use."""
        plan = self.plan
        num_rows, num_tables = len(plan.rows), len(plan.embeddings)
        for j in range(start, start + len(grads)):
            grad, grads[j - start] = grads[j - start], None  # dropped once folded
            if grad is None:
                continue
            if j < num_rows:
                value = plan.rows[j].to_rows(grad)
            elif j < num_rows + num_tables:
                value = self._scatter(plan.embeddings[j - num_rows], grad)
            else:
                value = dense_or_refuse(grad, plan.direct[j - num_rows - num_tables])
            block = compact[j]
            if block is None:
                shape = (self.num_tasks, *value.shape[1:])
                block = compact[j] = workspace.buffer(j, shape, value).zero_()
            block[tasks] = value

    @staticmethod
    def _scatter(layer: _Embedding, grad: Tensor) -> Tensor:
        """``(k, *indices.shape, dim)`` output gradients summed onto the distinct rows."""
        flat = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        table = flat.new_zeros(flat.shape[0], len(layer.unique), flat.shape[-1])
        table.index_add_(1, layer.inverse, flat)
        return table if layer.scale is None else table * layer.scale[:, None]

    def _gramian(self) -> Tensor:
        num = self.num_tasks
        terms: list[Tensor] = []
        for layer, dy in zip(self.plan.rows, self._out_grads, strict=True):
            if dy is None:
                continue
            dy = _upcast(dy)
            x = _upcast(layer.rows)  # set for every layer on the rows route
            if layer.weight is not None:
                outer = (layer.alpha**2) * (x @ x.T)  # R x R: all the layer's input needs
                flat = dy.reshape(num, -1)
                # (X X^T) dY_s for a few tasks at a time: the temporary stays a fraction of dY.
                rows = [
                    torch.matmul(outer, chunk).reshape(len(chunk), -1) @ flat.T
                    for chunk in dy.split(_TASK_CHUNK)
                ]
                terms.append(torch.cat(rows) if len(rows) > 1 else rows[0])
            if layer.bias is not None:
                sums = dy.sum(dim=1) * layer.beta
                terms.append(sums @ sums.T)
        for block in (*self._table_grads, *self._direct):
            if block is not None:
                rows = _upcast(block).reshape(num, -1)
                terms.append(rows @ rows.T)
        if not terms:
            raise ValueError("no task depends on any of the inputs: the Jacobian is empty")
        return torch.stack(terms).sum(dim=0) if len(terms) > 1 else terms[0]

    @property
    def held_numel(self) -> int:
        """How many numbers the per-task pieces hold (the Jacobian path holds ``T n``)."""
        pieces = (*self._out_grads, *self._table_grads, *self._direct)
        return sum(piece.numel() for piece in pieces if piece is not None)

    def combine(self, weights: Tensor) -> list[Tensor | None]:
        """``sum_t weights[t] g_t`` per shared parameter (``None`` where no task reaches it)."""
        update: list[Tensor | None] = [None] * len(self.params)
        for layer, dy in zip(self.plan.rows, self._out_grads, strict=True):
            if dy is None:
                continue
            mixed = weighted_rows(weights, dy)  # R x out
            if layer.weight is not None:
                grad = mixed.T @ layer.rows if layer.transposed else layer.rows.T @ mixed
                update[layer.weight] = (grad * layer.alpha).reshape(layer.weight_shape)
            if layer.bias is not None:
                bias_shape = self.params[layer.bias].shape  # (out,) or (1, out)
                update[layer.bias] = (mixed.sum(dim=0) * layer.beta).reshape(bias_shape)
        for layer, table in zip(self.plan.embeddings, self._table_grads, strict=True):
            if table is None:
                continue
            rows = weighted_rows(weights, table)
            if layer.sparse:
                update[layer.weight] = _sparse_rows(layer, rows)
                continue
            full = table.new_zeros(layer.weight_shape)
            full.index_add_(0, layer.unique, rows)
            update[layer.weight] = full
        for i, block in zip(self.plan.direct, self._direct, strict=True):
            if block is not None:
                update[i] = weighted_rows(weights, block)
        return update


def _sparse_rows(layer: _Embedding, rows: Tensor) -> Tensor:
    """The update of a sparse embedding as its own backward gives it: a sparse gradient on the
    looked-up rows, the padding row left out (so that SparseAdam touches exactly those rows)."""
    keep = layer.unique != layer.padding
    indices, values = layer.unique[keep], rows[keep]
    # torch.unique sorted the rows and made them distinct: the tensor is coalesced as built.
    return torch.sparse_coo_tensor(
        indices[None], values, layer.weight_shape, check_invariants=False, is_coalesced=True
    )


def _upcast(tensor: Tensor) -> Tensor:
    """Half precision is upcast for the Gramian, as on the Jacobian path."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class _UnbatchingError(RuntimeError):
    """A gradient seen inside the batched backward could not be read out of it."""


class _AfterTensorHooks:
    """The gradients arriving at ``nodes`` after the tensor hooks of their outputs have run.

    A pre-hook on each node records the gradient it is called with (tensor hooks run first);
    a node that does not run in a pass leaves the gradient captured by autograd, to which
    autograd then applies the tensor hooks itself. Inside the batched backward the pre-hook
    sees a (legacy) batched tensor, which is unwrapped to ``(T, *shape)``.
    """

    def __init__(self, nodes: Sequence[Node], batch: int) -> None:
        self._nodes = nodes
        self._batch = batch
        self._seen: dict[int, Tensor] = {}
        self._failure: Exception | None = None
        self._handles: list = []

    def __enter__(self) -> _AfterTensorHooks:
        self._handles = [
            node.register_prehook(self._recorder(j)) for j, node in enumerate(self._nodes)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _recorder(self, j: int) -> Callable[[tuple[Tensor | None, ...]], None]:
        def record(grad_outputs: tuple[Tensor | None, ...]) -> None:
            grad = grad_outputs[0]
            if grad is None:
                return
            try:
                self._seen[j] = _unbatched(grad, self._batch)
            except Exception as error:  # any failure means: take the loop instead
                self._failure = error

        return record

    def read(self, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """``grads`` of one pass, with the recorded post-hook gradients in place."""
        seen, self._seen = self._seen, {}
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise _UnbatchingError(f"a layer's gradient could not be unbatched ({failure})")
        return [seen.get(j, grad) if j < len(self._nodes) else grad for j, grad in enumerate(grads)]


def _unbatched(grad: Tensor, batch: int) -> Tensor:
    """``grad`` as ``(k, *shape)``: k = 1 in a per-task pass, ``batch`` inside the batched backward
    (``is_grads_batched`` runs under torch's legacy vmap, whose current level is one below
    the next one it would open)."""
    if not torch._C._functorch.is_legacy_batchedtensor(grad):
        return grad.unsqueeze(0)
    level = torch._C._vmapmode_increment_nesting() - 1
    torch._C._vmapmode_decrement_nesting()
    return torch._remove_batch_dim(grad, level, batch, 0)


def _task_grads(
    output: Tensor, edges: list[GradientEdge | Tensor], one: Tensor
) -> list[Tensor | None]:
    grads = torch.autograd.grad(
        output, edges, grad_outputs=one, retain_graph=True, allow_unused=True
    )
    return [None if g is None else g.unsqueeze(0) for g in grads]
