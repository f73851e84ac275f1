"""Walks of the autograd graph: which leaves a loss reaches, and whether it reaches a tensor.

Autograd has no public "list the leaves of this graph" call; these walks follow
``grad_fn.next_functions`` down to the ``AccumulateGrad`` nodes, whose ``variable`` is the leaf.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from torch import Tensor
from torch.autograd.graph import Node, get_gradient_edge


def _walk(roots: Iterable[Tensor], stop: set[Node]) -> Iterator[Node]:
    """Every node reachable from the roots' grad_fn, not descending below nodes in ``stop``."""
    pending = [root.grad_fn for root in roots if root.grad_fn is not None]
    seen: set[Node] = set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        if node in stop:
            continue
        pending.extend(child for child, _ in node.next_functions if child is not None)


def leaf_tensors(roots: Iterable[Tensor], exclude: Iterable[Tensor] = ()) -> list[Tensor]:
    """The leaf tensors requiring grad that the roots depend on, minus ``exclude``.

    Used at parameter level to find the heads' (and the method's own) parameters: they receive
    an ordinary backward, while the shared parameters receive the method's combination.

    >>> import torch
    >>> w = torch.ones(2, requires_grad=True)
    >>> [t is w for t in leaf_tensors([(w * 3).sum()])]
    [True]
    """
    excluded = {id(t) for t in exclude}
    leaves = []
    for node in _walk(roots, stop=set()):
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in excluded:
            leaves.append(variable)
    return leaves


def reaches(root: Tensor, targets: Iterable[Tensor]) -> bool:
    """Whether ``root`` depends, through the autograd graph, on any of ``targets``.

    >>> import torch
    >>> w, v = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    >>> reaches((w * 2).sum(), [w]), reaches((w * 2).sum(), [v])
    (True, False)
    """
    wanted = {get_gradient_edge(t).node for t in targets}
    return any(node in wanted for node in _walk([root], stop=wanted))


def inputs_reached(root: Tensor, targets: Sequence[Tensor]) -> set[int]:
    """The positions of the ``targets`` that ``root`` depends on (the walk stops at them).

    Targets are told apart by their gradient edge (node and output slot), so two outputs of
    one node (``z1, z2 = z.chunk(2)``) are two targets.

    >>> import torch
    >>> x = torch.ones(4, requires_grad=True)
    >>> a, b = (x * 2).chunk(2)
    >>> inputs_reached(a.sum(), [a, b]), inputs_reached((a * b).sum(), [a, b])
    ({0}, {0, 1})
    """
    wanted: dict[tuple[Node, int], int] = {}
    for i, target in enumerate(targets):
        edge = get_gradient_edge(target)
        wanted[(edge.node, edge.output_nr)] = i
    if root.grad_fn is None:
        return set()
    found: set[int] = set()
    start = (root.grad_fn, root.output_nr)
    if start in wanted:
        return {wanted[start]}
    pending, seen = [root.grad_fn], {root.grad_fn}
    while pending:
        node = pending.pop()
        for child, slot in node.next_functions:
            if child is None:
                continue
            index = wanted.get((child, slot))
            if index is not None:
                found.add(index)
            elif child not in seen:
                seen.add(child)
                pending.append(child)
    return found
