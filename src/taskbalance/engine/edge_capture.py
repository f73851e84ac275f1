"""The feature level in ONE backward: every task's gradient at z read off the edges into z, and
the method's combination put in place of z's gradient, inside the same backward call.

At feature level the heads are usually disjoint: each task's loss reaches the features z only
through nodes of its own head. The gradient that such a node sends along its edge into z is
then that task's gradient alone, so a hook on each of those nodes reads all T rows of the
z-Jacobian while the total loss is back-propagated through the heads. The engine runs z's own
node only once every edge into it has delivered, so by then the rows are complete: a hook on z
turns them into the method's combination, which is what the trunk is back-propagated with. A
feature-level step thus makes the one backward call of ``sum(losses).backward()``: the heads
are back-propagated once (not T + 1 times), and the heads' parameters are accumulated by the
engine itself, with their hooks, as in a plain backward.

It applies when z is one tensor, every task reaches it, every node with an edge into z is
reached from one task only, and z carries no gradient hook of its own (which the per-task
passes would apply to each row); otherwise :func:`backward_through_heads` runs nothing and the
caller takes the per-task passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.graph import Node, get_gradient_edge

Edge = tuple[int, int]
"""(task, index among the node's next functions)."""


def _scan(
    total: Tensor, outputs: Sequence[Tensor], feature: Tensor
) -> dict[Node, list[Edge]] | None:
    """The nodes with an edge into ``feature``, with their edges, in one walk per task and one
    for the rest of ``total``'s graph; ``None`` when such a node is reached from two tasks (its
    gradient would mix them) or from outside the tasks."""
    edge = get_gradient_edge(feature)
    target = (edge.node, edge.output_nr)
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
                if child is target[0] and slot == target[1]:
                    if task < 0 or owner.setdefault(node, task) != task:
                        return None
                    edges.setdefault(node, []).append((task, index))
                elif child not in seen:
                    seen.add(child)
                    pending.append(child)
        if task >= 0:
            visited |= seen
    return edges


def backward_through_heads(
    total: Tensor,
    outputs: Sequence[Tensor],
    feature: Tensor,
    substitute: Callable[[Tensor], Tensor],
    retain_graph: bool = False,
) -> bool:
    """Back-propagate ``total`` once, with ``substitute(block)`` in place of the gradient that
    reaches ``feature``, ``block`` being the ``(T, *feature.shape)`` gradients of ``outputs``
    (the per-task terms of ``total``) at ``feature``, read on the way. Returns ``False``, having
    run nothing, where the rows cannot be told apart by task (see the module docstring).

    An error raised by ``substitute`` leaves the backward unfinished: gradients of what lies
    between ``feature`` and the losses (the heads) may already be written, nothing below
    ``feature`` is. The rows stay valid after the engine sums them into ``feature``'s
    gradient: held here, they are not the engine's to accumulate into in place.

    >>> z = torch.ones(2, requires_grad=True) * 1.0
    >>> w = torch.ones(1, requires_grad=True)
    >>> losses = [(2 * z).sum() * w, (3 * z).sum()]
    >>> seen = []
    >>> backward_through_heads(sum(losses), losses, z, lambda block: seen.append(block) or block[0])
    True
    >>> seen[0], w.grad
    (tensor([[2., 2.],
            [3., 3.]]), tensor([4.]))
    """
    if feature._backward_hooks or total.grad_fn is None:
        return False
    edges = _scan(total, outputs, feature)
    if edges is None or {task for found in edges.values() for task, _ in found} != set(
        range(len(outputs))
    ):
        return False
    rows: dict[int, Tensor] = {}

    def capture(found: list[Edge]) -> Callable:
        def hook(grad_inputs, _grad_outputs):
            for task, index in found:
                grad = grad_inputs[index]
                if grad is not None:
                    rows[task] = grad if task not in rows else rows[task] + grad

        return hook

    def replace(_grad: Tensor) -> Tensor:
        if len(rows) < len(outputs):  # a task whose edges carried no gradient: a zero row
            zero = torch.zeros_like(feature)
            rows.update({task: zero for task in range(len(outputs)) if task not in rows})
        return substitute(torch.stack([rows[task] for task in range(len(outputs))]))

    handles = [node.register_hook(capture(found)) for node, found in edges.items()]
    handles.append(feature.register_hook(replace))
    try:
        total.backward(retain_graph=retain_graph)
    finally:
        for handle in handles:
            handle.remove()
    return True
