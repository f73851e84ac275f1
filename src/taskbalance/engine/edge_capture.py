"""Every task's gradient at the shared features from ONE backward pass.

At feature level the heads are usually disjoint: each task's loss reaches the features z only
through nodes of its own head. The gradient that such a node sends along its edge into z is
then that task's gradient alone, so one backward of the total loss down to z, with a hook on
each of those nodes, yields all T rows of the z-Jacobian and the heads' own gradients: the
heads are back-propagated once, not T + 1 times, and the trunk's backward that follows starts
at z with the method's combination.

It applies when every task reaches z, every node with an edge into z is reached from one task
only, and z carries no gradient hook of its own (which the per-task passes would apply to each
row); otherwise :func:`heads_pass` returns ``None`` and the caller takes the per-task passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import Node, get_gradient_edge

Edge = tuple[int, int, int]
"""(task, index among the node's next functions, feature index)."""


_ACCUMULATE = torch._C._functions.AccumulateGrad
"""The node type through which a leaf receives its gradient (``node.variable`` is the leaf)."""


def _scan(
    total: Tensor, outputs: Sequence[Tensor], features: Sequence[Tensor]
) -> tuple[dict[Node, list[Edge]], list[Tensor]] | None:
    """The nodes with an edge into a feature (with their edges), and the leaves that ``total``
    reaches without going through the features (the heads', the method's), in one walk per
    task and one for the rest of ``total``'s graph; ``None`` when a node with an edge into a
    feature is reached from two tasks (its gradient would mix them)."""
    wanted = {}
    for f, z in enumerate(features):
        edge = get_gradient_edge(z)
        wanted[(edge.node, edge.output_nr)] = f
    owner: dict[Node, int] = {}
    edges: dict[Node, list[Edge]] = {}
    visited: set[Node] = set()
    for task, root in [*enumerate(outputs), (-1, total)]:
        if root.grad_fn is None or root.grad_fn in visited:
            continue
        # Task walks see their own subgraph; the last walk (task -1) only what they missed.
        seen = {root.grad_fn} if task >= 0 else visited
        seen.add(root.grad_fn)
        pending = [root.grad_fn]
        while pending:
            node = pending.pop()
            for index, (child, slot) in enumerate(node.next_functions):
                if child is None:
                    continue
                feature = wanted.get((child, slot))
                if feature is not None:
                    if task < 0 or owner.setdefault(node, task) != task:
                        return None
                    edges.setdefault(node, []).append((task, index, feature))
                elif child not in seen:
                    seen.add(child)
                    pending.append(child)
        if task >= 0:
            visited |= seen
    return edges, [node.variable for node in visited if type(node) is _ACCUMULATE]


@dataclass
class HeadsPass:
    """What one backward of the total loss down to the features computed: each task's
    gradient at the features, and the gradients of the leaves above them (not yet written)."""

    blocks: list[Tensor | None]
    leaves: list[Tensor]
    leaf_grads: tuple[Tensor | None, ...]


def heads_pass(
    total: Tensor, outputs: Sequence[Tensor], features: Sequence[Tensor]
) -> HeadsPass | None:
    """One backward of ``total`` to the features and to the leaves above them (the heads, the
    method's parameters), reading every task's row of the features' Jacobian off the edges
    into them on the way; ``None`` when a task reaches no feature or the edges cannot be told
    apart by task (see the module docstring). ``outputs``: the per-task terms whose gradients
    form the rows. The graph is retained for the trunk's backward.

    >>> z = torch.ones(2, requires_grad=True) * 1.0
    >>> w = torch.ones(1, requires_grad=True)
    >>> losses = [(2 * z).sum() * w, (3 * z).sum()]
    >>> done = heads_pass(sum(losses), losses, [z])
    >>> done.blocks[0], done.leaf_grads[0]
    (tensor([[2., 2.],
            [3., 3.]]), tensor([4.]))
    """
    if any(z._backward_hooks for z in features) or total.grad_fn is None:
        return None
    scanned = _scan(total, outputs, features)
    if scanned is None:
        return None
    edges, leaves = scanned
    if {task for node_edges in edges.values() for task, _, _ in node_edges} != set(
        range(len(outputs))
    ):
        return None
    rows: list[dict[int, Tensor]] = [{} for _ in features]

    def capture(node_edges: list[Edge]):
        def hook(grad_inputs, _grad_outputs):
            for task, index, feature in node_edges:
                grad = grad_inputs[index]
                if grad is not None:
                    row = rows[feature]
                    row[task] = grad if task not in row else row[task] + grad

        return hook

    handles = [node.register_hook(capture(node_edges)) for node, node_edges in edges.items()]
    try:
        grads = torch.autograd.grad(
            total, [*leaves, *features], retain_graph=True, allow_unused=True
        )
    finally:
        for handle in handles:
            handle.remove()
    blocks: list[Tensor | None] = []
    for z, row in zip(features, rows, strict=True):
        if not row:
            blocks.append(None)
            continue
        if len(row) < len(outputs):  # a task whose edges carried no gradient: a zero row
            zero = torch.zeros_like(z)
            row = {task: row.get(task, zero) for task in range(len(outputs))}
        blocks.append(torch.stack([row[task] for task in range(len(outputs))]))
    return HeadsPass(blocks, leaves, grads[: len(leaves)])
