"""Applying a method in the user's loop: one call that fills ``.grad``.

One step, for losses ``L_t``, a method's loss weights ``L'_t = w_t L_t + c_t`` and, for
gradient-level methods, shared weights ``a``:

- loss level: one ordinary backward of ``sum_t L'_t``;
- feature level: the T gradients of ``w_t L_t`` w.r.t. the shared representation z (through the
  heads only), the method's ``a`` from their Gramian, and a backward of ``sum_t L'_t`` in
  which a hook replaces the gradient arriving at z by ``sum_t a_t dL'_t/dz``. The heads and the
  method's parameters thus get the gradient of their own ``L'_t``, and the trunk one backward
  of the combination. Where the heads are disjoint, all of it is one backward call (the rows
  are read on the way through the heads, :mod:`taskbalance.engine.edge_capture`); otherwise T
  per-task passes through the heads come first;
- parameter level: the T gradients of ``w_t L_t`` w.r.t. the shared parameters, the method's
  ``a``, ``sum_t a_t g_t`` written into the shared ``.grad``, and one backward of
  ``sum_t L'_t`` restricted to everything else (heads, the method's parameters).

Like ``Tensor.backward``, ``.grad`` is accumulated into, never overwritten.

Under torch.distributed (``sync``), the method sees the whole batch: the losses and the
Gramian (feature level) or the Jacobian (parameter level) are reduced over the ranks, and each
rank writes gradients whose average over the ranks, as DistributedDataParallel (or the user's
own all-reduce) computes it, is the single-process update on the joined batch. The method's
own parameters are not in the user's DDP model, so their gradients are averaged here.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from taskbalance.distributed import Reducer, initialised, reducer
from taskbalance.engine import (
    JacobianMode,
    SparseGradientError,
    TaskLosses,
    Workspace,
    check_finite_losses,
    collect_losses,
    combine,
    from_matrix,
    gramian,
    inputs_reached,
    leaf_tensors,
    reaches,
    task_jacobian,
    to_matrix,
    unique_tensors,
)
from taskbalance.engine.edge_capture import backward_through_heads
from taskbalance.engine.gramian_path import (
    GramianPath,
    LayerwiseGramian,
    UncoveredLayerError,
    jacobian_fits,
    plan_layers,
)
from taskbalance.engine.jacobian import sparse_gradient_message
from taskbalance.engine.placement import HostGramian, on_accelerator, to_host, to_tensor
from taskbalance.engine.requirement import Level, Requirement
from taskbalance.errors import InvalidLossError, NonFiniteLossError
from taskbalance.fsdp import (
    FSDP1_REFUSED,
    ShardedJacobian,
    is_fsdp1,
    is_sharded,
    refuse_fsdp1,
    units_held,
)

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch.amp import GradScaler

    from taskbalance.engine.losses import LossesLike


class Balancer(Protocol):
    """What a step needs of a balancing method; :class:`taskbalance.Method` is one. Declared
    here so that the step depends on this interface and not on the methods package (which
    imports the step to offer ``method.backward``)."""

    requires: Requirement
    level: Level | None
    skipped_steps: int

    @property
    def task_names(self) -> tuple[str, ...] | None:
        """The bound task names, ``None`` before the first step."""

    @property
    def unit_loss_weights(self) -> bool:
        """Whether the loss weights are ones by construction."""

    def bind_tasks(self, names: tuple[str, ...], named: bool) -> None:
        """Fix the task names at the first step; check them at later ones."""

    def loss_weights(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        """The loss-level weights ``w_t`` and offsets ``c_t``."""

    def check_losses(self, losses: Tensor) -> None:
        """Raise on weighted losses the gradient level cannot take, before any backward."""

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """The weights ``a`` of the per-task gradients, from their Gramian."""

    def aggregate(self, losses: Tensor, jacobian: Tensor) -> Tensor:
        """The shared update from the ``T x n`` Jacobian."""

    def parameters(self) -> Iterable[nn.Parameter]:
        """The method's own trainable parameters."""


@dataclass(frozen=True)
class StepInfo:
    """What one step computed, detached: for logging and diagnostics, at no extra cost.

    Attributes:
        tasks: the task names, in the order of every vector here.
        losses: the raw task losses ``L_t``, shape ``(T,)`` (averaged over the ranks under
            torch.distributed).
        loss_weights: the loss-level weights ``w_t`` (ones for a method without any).
        gradient_weights: the weights ``a_t`` the method gave the per-task gradients of the
            shared part; ``None`` for loss-level and Jacobian methods.
        grad_norms: ``||grad (w_t L_t)||`` at the method's level; ``None`` when the engine did
            not compute per-task gradients (loss-level methods).
        cosines: the T x T cosines between the per-task gradients (0 where a gradient is
            zero); ``None`` when not computed.
        level: ``"feature"``, ``"parameter"``, or ``None`` for loss-level methods.
        skipped: the step was skipped because a loss was not finite
            (``on_nonfinite="skip"``): nothing was back-propagated, ``loss_weights`` are zeros.
    """

    tasks: tuple[str, ...]
    losses: Tensor
    loss_weights: Tensor
    gradient_weights: Tensor | None = None
    grad_norms: Tensor | None = None
    cosines: Tensor | None = None
    level: str | None = None
    skipped: bool = False

    @property
    def weights(self) -> Tensor:
        """The total weight of each raw task gradient in the shared update: ``a_t * w_t``."""
        if self.gradient_weights is None:
            return self.loss_weights
        return self.gradient_weights * self.loss_weights


@dataclass
class _Prepared:
    """The losses of one step, checked and weighted by the method's loss level."""

    losses: TaskLosses
    seen: Tensor
    """The losses the method sees: the local ones, or their mean over the ranks."""
    loss_weights: Tensor
    total: Tensor
    """``S sum_t L'_t``: what everything that is not shared is trained on."""
    reducer: Reducer | None
    scale: float
    """A GradScaler's loss scale ``S`` (1 without one): back-propagated values carry it."""
    unit: bool = False
    """The loss weights are ones by construction (the method has no loss level)."""

    @functools.cached_property
    def weighted_values(self) -> Tensor:
        """``w_t L_t``, detached: the losses a gradient-level method is shown (made once a
        step: the loss checks and the method's solve both read it)."""
        return self.seen if self.unit else (self.loss_weights * self.seen).detach()

    def weighted_tasks(self) -> list[Tensor]:
        """``S w_t L_t`` task by task, each in its own task's graph only (no stack that would
        tie every task's backward to every head): what per-task gradients are taken of."""
        if self.unit and self.scale == 1:
            return [loss if loss.dim() == 0 else loss.reshape(()) for loss in self.losses.tensors]
        weights = self.loss_weights * self.scale if self.scale != 1 else self.loss_weights
        pairs = zip(weights.unbind(), self.losses.tensors, strict=True)
        return [weight * loss.reshape(()) for weight, loss in pairs]


def _prepare(
    method: Balancer,
    losses: LossesLike,
    ranks: Reducer | None,
    scaler: GradScaler | None = None,
    check_finite: bool = True,
) -> _Prepared:
    checked = collect_losses(losses, method.task_names, check_finite=check_finite and not ranks)
    seen = checked.values.detach()
    if ranks is not None:
        # Reduced before the finiteness check, so that a NaN on one rank stops every rank
        # instead of leaving the others waiting in the next collective.
        seen = ranks.mean(seen)
        if check_finite:
            check_finite_losses(checked.names, seen)
    method.bind_tasks(checked.names, checked.from_mapping)
    unit = method.unit_loss_weights
    if unit:  # no multiplication by ones on the per-step path
        loss_weights, total = torch.ones_like(seen), checked.values.sum()
    else:
        loss_weights, offsets = method.loss_weights(seen)
        if loss_weights.shape != seen.shape:
            raise RuntimeError(
                f"{type(method).__name__}.loss_weights returned shape "
                f"{tuple(loss_weights.shape)} for {seen.numel()} tasks"
            )
        scaled = loss_weights * checked.values
        total = scaled.sum() if offsets is None else (scaled + offsets).sum()
    scale = 1.0
    if scaler is not None and scaler.is_enabled():
        total = scaler.scale(total)  # also starts the scaler's bookkeeping for scaler.step
        scale = scaler.get_scale()
    prepared = _Prepared(checked, seen, loss_weights, total, ranks, scale, unit)
    if method.requires is not Requirement.LOSSES and not on_accelerator(seen):
        method.check_losses(prepared.weighted_values)
    return prepared


_WORKSPACES: weakref.WeakKeyDictionary[Balancer, Workspace] = weakref.WeakKeyDictionary()
"""One Jacobian workspace per method, freed with it."""


@dataclass
class _SharedUpdate:
    """The combination for the shared part, one tensor per input (z's or the parameters')."""

    inputs: tuple[Tensor, ...]
    update: list[Tensor | None]
    weights: Tensor | None
    norms: Tensor | None
    cosines: Tensor | None


def _shared_update(
    method: Balancer,
    prepared: _Prepared,
    inputs: tuple[Tensor, ...],
    mode: JacobianMode,
    path: GramianPath = "auto",
    module: nn.Module | Iterable[Tensor] | Tensor | None = None,
    captured: list[Tensor | None] | None = None,
) -> _SharedUpdate:
    """``captured``: the per-task blocks at the features when the step's one backward
    (:func:`backward_through_heads`) has read them."""
    num_tasks = len(prepared.losses.names)
    ranks = prepared.reducer
    feature_level = method.level == "feature"
    if feature_level and len(inputs) > 1 and captured is None:
        _check_common_features(prepared.losses, inputs)
    if method.requires is Requirement.GRAMIAN:
        layerwise = _layerwise(method, prepared, inputs, mode, path, module)
        if layerwise is not None:
            return _gramian_update(method, prepared, inputs, layerwise.gramian, layerwise.combine)
    # The blocks never leave this step, so they may live in the method's reused workspace.
    workspace = _WORKSPACES.setdefault(method, Workspace())
    try:
        blocks = (
            task_jacobian(prepared.weighted_tasks(), inputs, mode, workspace)
            if captured is None
            else captured
        )
    except SparseGradientError as error:
        names = _trainable_names(module)
        if names is None or error.index < 0:
            raise
        raise SparseGradientError(sparse_gradient_message(f"'{names[error.index]}'")) from None
    if ranks is None and all(block is None for block in blocks):
        raise InvalidLossError(
            f"no task loss depends on the {_describe(method)}: pass the tensors the heads read"
        )
    if ranks is not None and not feature_level:
        # g_t = (1/R) sum_r g_t^r: the Gramian needs products across ranks, so the Jacobian
        # itself is averaged; every rank then holds, and writes, the same global update.
        blocks = list(from_matrix(ranks.mean(to_matrix(blocks, inputs, num_tasks)), inputs))
    if method.requires is Requirement.GRAMIAN:
        gram = gramian(blocks, num_tasks)
        if ranks is not None and feature_level:
            gram = ranks.sum(gram) / ranks.world_size**2  # K = (1/R^2) sum_r K^r
        return _gramian_update(
            method, prepared, inputs, gram, lambda a: combine(a, blocks), captured is not None
        )
    matrix = to_matrix(blocks, inputs, num_tasks, workspace)
    if ranks is not None and feature_level:
        # The global z is the concatenation of the shards' z^r; dL_t/dz^r = (1/R) dL_t^r/dz^r.
        matrix = torch.cat(ranks.gather(matrix / ranks.world_size), dim=1)
    if prepared.scale != 1:
        matrix = matrix / prepared.scale
    gram = matrix @ matrix.T
    # A NaN or an infinity in a row reaches that row's squared norm: the diagonal stands in for
    # a pass over the T x n matrix (11 ms at T = 32 on the benchmark MLP), which only a
    # non-finite diagonal then needs (an overflow of a finite gradient's square goes on).
    if not _all_finite(gram.diagonal()) and not _finite_or_overflow(prepared, matrix):
        return _SharedUpdate(inputs, combine(torch.ones(num_tasks), blocks), None, *_NO_NORMS)
    norms = _norms(gram)
    _check_reachable(method, prepared.losses, norms, inputs)
    cosines = _cosines(gram, norms)
    flat = method.aggregate(prepared.weighted_values, matrix).detach()
    if prepared.scale != 1:
        flat = flat * prepared.scale
    if flat.shape != (matrix.shape[1],) or not _all_finite(flat):
        raise RuntimeError(f"{type(method).__name__}.aggregate returned a bad update")
    if ranks is not None and feature_level:
        # This rank's share of the global z-update, times R because the ranks' trunk
        # gradients are averaged afterwards.
        share = flat.numel() // ranks.world_size
        start = ranks.rank * share
        flat = flat[start : start + share] * ranks.world_size
    return _SharedUpdate(inputs, list(from_matrix(flat, inputs)), None, norms, cosines)


def _gramian_update(
    method: Balancer,
    prepared: _Prepared,
    inputs: tuple[Tensor, ...],
    gram: Tensor,
    combination: Callable[[Tensor], list[Tensor | None]],
    reached: bool = False,
) -> _SharedUpdate:
    """The method's weights from the Gramian of the (loss-scaled) per-task gradients, and
    ``combination(a)``, the weighted sum of the per-task gradients, as the update.
    ``reached``: every task is known to reach the inputs (the one backward found its edges
    into z), so the accelerator path need not walk the graph to check it."""
    if prepared.scale != 1:
        gram = gram / prepared.scale**2
    if on_accelerator(gram):
        weights, norms, cosines = _device_weights(method, prepared, inputs, gram, reached)
        return _SharedUpdate(inputs, combination(weights), weights, norms, cosines)
    # The T x T checks, the record and (for a method with a host form) the solve on the host:
    # one round trip, and numpy's operations on a few numbers cost 0.5-3 us where torch's
    # dispatch costs 2-9.
    host = to_host(gram)
    squared_norms = np.diagonal(host)
    # One sum finds a NaN or an infinity anywhere (a sum of finite products computed in at
    # most float32 is finite in float64), one minimum a zero gradient.
    if not (np.isfinite(host.sum()) and squared_norms.min() > 0):
        return _unhealthy_update(method, prepared, inputs, gram, combination)
    host_norms = np.sqrt(squared_norms)
    # The record first: a method may edit the Gramian tensor it is given in place.
    cosines = host / np.outer(host_norms, host_norms)
    norms = to_tensor(host_norms, gram, gram.dtype)
    cosines_tensor = to_tensor(cosines, gram, gram.dtype)
    num_tasks = len(prepared.losses.names)
    host_weights = getattr(method, "host_weights", None)
    if host_weights is None:
        weights = method.shared_weights(prepared.weighted_values, gram).detach()
        _check_weights(method, weights, num_tasks)
    else:
        host_gram = HostGramian(host_norms, cosines, torch.finfo(gram.dtype).eps)
        values = host_weights(prepared.weighted_values, host_gram)
        _check_weights(method, values, num_tasks)
        weights = to_tensor(values, gram, gram.dtype)
    return _SharedUpdate(inputs, combination(weights), weights, norms, cosines_tensor)


def _unhealthy_update(
    method: Balancer,
    prepared: _Prepared,
    inputs: tuple[Tensor, ...],
    gram: Tensor,
    combination: Callable[[Tensor], list[Tensor | None]],
) -> _SharedUpdate:
    """:func:`_gramian_update` for a Gramian with a non-finite entry (an overflow under a
    GradScaler goes through unweighted, anything else raises) or a zero gradient (legitimate
    unless the task never reaches the inputs)."""
    if not _finite_or_overflow(prepared, gram):
        return _SharedUpdate(inputs, combination(torch.ones_like(gram[0])), None, *_NO_NORMS)
    _check_reachable(method, prepared.losses, _norms(gram), inputs)
    weights = method.shared_weights(prepared.weighted_values, gram).detach()
    _check_weights(method, weights, len(prepared.losses.names))
    norms = _norms(gram)
    return _SharedUpdate(inputs, combination(weights), weights, norms, _cosines(gram, norms))


def _device_weights(
    method: Balancer, prepared: _Prepared, inputs: tuple[Tensor, ...], gram: Tensor, reached: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The weights, norms and cosines of :func:`_gramian_update` with nothing read back from the
    device: they stay there (the record is read when the user reads it). The checks that need
    values are left out: a task whose loss does not reach the inputs is found from the graph
    instead of from a zero norm, and non-finite gradients reach ``.grad`` as in a plain
    backward (a GradScaler's own device-side check then skips the step)."""
    for index, loss in enumerate(() if reached else prepared.losses.tensors):
        if not reaches(loss, inputs):
            name = prepared.losses.names[index]
            raise InvalidLossError(
                f"the loss of task '{name}' does not depend on the {_describe(method)}", task=name
            )
    weights = method.shared_weights(prepared.weighted_values, gram).detach()
    if weights.shape != (len(prepared.losses.names),):
        raise RuntimeError(
            f"{type(method).__name__} produced weights of shape {tuple(weights.shape)} for "
            f"{len(prepared.losses.names)} tasks"
        )
    norms = _norms(gram)
    return weights, norms, _cosines(gram, norms)


_LAYER_WORKSPACES: weakref.WeakKeyDictionary[Balancer, Workspace] = weakref.WeakKeyDictionary()
"""One workspace per method for the layerwise Gramian's compact per-task gradients."""

_warned_uncovered: set[str] = set()


def _layerwise(
    method: Balancer,
    prepared: _Prepared,
    params: tuple[Tensor, ...],
    mode: JacobianMode,
    path: GramianPath,
    module: nn.Module | Iterable[Tensor] | Tensor | None,
) -> LayerwiseGramian | None:
    """The layerwise Gramian when ``path`` asks for it or ``"auto"`` finds it saves work;
    ``None`` for the Jacobian path. ``module``: what the user passed as ``shared``, to name
    an uncovered parameter when it is a module."""
    if path not in ("auto", "jacobian", "layerwise"):
        raise ValueError(f"gramian_path must be 'auto', 'jacobian' or 'layerwise', got {path!r}")
    if path == "jacobian" or method.level == "feature":
        return None
    if prepared.reducer is not None:
        if path == "layerwise":
            raise ValueError(
                "gramian_path='layerwise' cannot run under torch.distributed: the parameter-level "
                "Gramian needs the Jacobian averaged over the ranks (use level='feature' for a "
                "T x T reduction)"
            )
        return None
    # "auto" also takes the layerwise path, every covered layer by rows, when the Jacobian would
    # not fit in memory, even where the blocks cost fewer flops.
    outputs = prepared.weighted_tasks()
    too_big = path == "auto" and not jacobian_fits(len(outputs), params)
    plan = plan_layers(outputs, params, force=path == "layerwise" or too_big)
    if plan.uncovered:
        listed = "; ".join(item.describe(_trainable_names(module)) for item in plan.uncovered)
        if path == "layerwise":
            raise UncoveredLayerError(
                f"gramian_path='layerwise': {listed}. Use gramian_path='auto' to take such "
                "parameters' gradient rows from autograd (exact, their rows materialised)"
            )
        if not plan.saves_work:
            return None
        if listed not in _warned_uncovered:
            _warned_uncovered.add(listed)
            warnings.warn(
                f"taskbalance: the layerwise Gramian materialises the per-task gradient rows of "
                f"{listed} (exact; pass gramian_path='jacobian' to silence this warning)",
                RuntimeWarning,
                stacklevel=4,
            )
    elif not plan.saves_work:
        return None
    workspace = _LAYER_WORKSPACES.setdefault(method, Workspace())
    return LayerwiseGramian(outputs, params, plan, mode, workspace)


def _trainable_names(module: nn.Module | Iterable[Tensor] | Tensor | None) -> list[str] | None:
    """The names of a shared module's trainable parameters, in the order the engine holds them
    (``None`` when the shared part was not given as a module)."""
    if not isinstance(module, nn.Module):
        return None
    return [name for name, param in module.named_parameters() if param.requires_grad]


_NO_NORMS = (None, None)


def _finite_or_overflow(prepared: _Prepared, values: Tensor) -> bool:
    """Whether the per-task gradients are finite. Under a GradScaler an overflow is expected
    now and then: the step goes through unweighted, so that the overflow reaches ``.grad``,
    ``scaler.step`` skips the step and the scale is lowered; the method's state is not touched.
    Without one it is an error, never a silent NaN."""
    if _all_finite(values):
        return True
    if prepared.scale != 1:
        return False
    raise FloatingPointError(
        "the per-task gradients are not finite (overflow in the model's backward?); with "
        "mixed precision, pass scaler=<your torch.amp.GradScaler> to backward"
    )


def _all_finite(values: Tensor) -> bool:
    """One read of ``values`` and no temporary (NaN and infinities reach the extremes):
    ``isfinite(values).all()`` on a T x n Jacobian measured slower than the T backward
    passes themselves (its elementwise temporaries)."""
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _describe(method: Balancer) -> str:
    return "features z" if method.level == "feature" else "shared parameters"


def _norms(gram: Tensor) -> Tensor:
    """The per-task gradient norms (the Gramian carries no graph: no detach needed)."""
    return gram.diagonal().clamp_min(0).sqrt()


def _cosines(gram: Tensor, norms: Tensor) -> Tensor:
    """The T x T cosines, 0 where a gradient is zero."""
    outer = norms[:, None] * norms[None, :]
    return torch.where(outer > 0, gram / outer.clamp_min(torch.finfo(gram.dtype).tiny), 0.0)


def _check_reachable(
    method: Balancer, losses: TaskLosses, norms: Tensor, inputs: tuple[Tensor, ...]
) -> None:
    """A zero gradient is legitimate; a task whose loss never reaches the inputs is a bug."""
    if bool((norms > 0).all()):
        return
    for index in (norms == 0).nonzero().flatten().tolist():
        if not reaches(losses.tensors[index], inputs):
            name = losses.names[index]
            raise InvalidLossError(
                f"the loss of task '{name}' does not depend on the {_describe(method)}",
                task=name,
            )


def _check_common_features(losses: TaskLosses, features: tuple[Tensor, ...]) -> None:
    """Refuse tasks that read disjoint feature tensors (one input batch per task through the
    same trunk): their gradients w.r.t. z live in different spaces, so their feature-level
    Gramian would have no cross terms at all, whatever the trunk shares."""
    reached = [inputs_reached(loss, features) for loss in losses.tensors]
    for s, first in enumerate(reached):
        for t in range(s + 1, len(reached)):
            if first and reached[t] and not first & reached[t]:
                a, b = losses.names[s], losses.names[t]
                raise ValueError(
                    f"features: tasks '{a}' and '{b}' read no feature tensor in common "
                    f"(items {sorted(first)} and {sorted(reached[t])}), as with one input batch "
                    "per task; at feature level their gradients live in different spaces. Use "
                    "level='parameter' with shared=<the trunk>"
                )


def _check_weights(method: Balancer, weights: Tensor | np.ndarray, num_tasks: int) -> None:
    values = weights if isinstance(weights, np.ndarray) else weights.cpu().double().numpy()
    if values.shape != (num_tasks,) or not np.isfinite(values).all():
        raise RuntimeError(
            f"{type(method).__name__} produced invalid weights {values.tolist()} "
            f"(expected {num_tasks} finite numbers)"
        )


def _features(method: Balancer, features: Tensor | Sequence[Tensor] | None) -> tuple[Tensor, ...]:
    if features is None:
        raise ValueError(
            f"{type(method).__name__}(level='feature') needs the shared representation: call "
            "backward(losses, features=z) with z the trunk's output that the heads read, or "
            "construct the method with level='parameter' and pass shared=<trunk parameters>"
        )
    if isinstance(features, Tensor):
        features = (features,)
    for i, z in enumerate(features):
        if not isinstance(z, Tensor):
            raise TypeError(f"features: item {i} is a {type(z).__name__}, not a tensor")
        if not z.requires_grad:
            raise ValueError(
                f"features: item {i} (shape {tuple(z.shape)}) does not require grad; pass the "
                "trunk's output as computed, not a detached copy"
            )
    return tuple(features)


def _shared_params(
    method: Balancer, shared: nn.Module | Iterable[Tensor] | Tensor | None
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """What the caller listed as shared (a generator read once), and its trainable tensors."""
    if shared is None:
        raise ValueError(
            f"{type(method).__name__}(level='parameter') needs the shared parameters: call "
            "backward(losses, shared=model.trunk) (a module or an iterable of parameters)"
        )
    if isinstance(shared, nn.Module):
        listed = tuple(shared.parameters())
    else:
        listed = (shared,) if isinstance(shared, Tensor) else tuple(shared)
    return listed, unique_tensors(listed, "shared parameters")


def _per_listed(
    listed: tuple[Tensor, ...], params: tuple[Tensor, ...], values: Sequence[Tensor | None]
) -> tuple[Tensor | None, ...]:
    """One value per tensor the caller listed: ``None`` for the frozen ones left out."""
    if len(listed) == len(params):
        return tuple(values)
    by_tensor = {id(p): v for p, v in zip(params, values, strict=True)}
    return tuple(by_tensor.get(id(t)) for t in listed)


def _backward_substituting(
    prepared: _Prepared,
    targets: tuple[Tensor, ...],
    substitutes: list[Tensor | None],
    retain_graph: bool,
) -> None:
    """One ordinary backward of ``sum_t L'_t`` in which the gradient arriving at each target
    is replaced by its substitute, so that everything downstream (the trunk, DDP's reducer)
    sees the substitute."""
    handles = [
        target.register_hook(lambda _grad, new=new: new)
        for target, new in zip(targets, substitutes, strict=True)
        if new is not None
    ]
    try:
        prepared.total.backward(retain_graph=retain_graph)
    finally:
        for handle in handles:
            handle.remove()


def _backward_except(prepared: _Prepared, shared: tuple[Tensor, ...], retain_graph: bool) -> None:
    """The ordinary backward of ``sum_t L'_t`` into every leaf except the shared ones."""
    others = leaf_tensors([prepared.total], exclude=shared)
    if others:
        torch.autograd.backward(prepared.total, inputs=others, retain_graph=retain_graph)


def _accumulate(params: tuple[Tensor, ...], grads: list[Tensor | None]) -> None:
    """Add each update to ``.grad``, then run the parameter's post-accumulate-grad hooks as
    autograd's own accumulation would (optimizer-in-backward set-ups step from them)."""
    for param, grad in zip(params, grads, strict=True):
        if grad is None:
            continue
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)
        for hook in (param._post_accumulate_grad_hooks or {}).values():
            hook(param)


def _info(method: Balancer, prepared: _Prepared, update: _SharedUpdate | None) -> StepInfo:
    return StepInfo(
        tasks=prepared.losses.names,
        losses=prepared.seen,
        loss_weights=prepared.loss_weights.detach(),
        gradient_weights=None if update is None else update.weights,
        grad_norms=None if update is None else update.norms,
        cosines=None if update is None else update.cosines,
        level=method.level,
    )


def _finish(method: Balancer, prepared: _Prepared, update: _SharedUpdate | None) -> StepInfo:
    """Average the method's own gradients over the ranks, and describe the step."""
    if prepared.reducer is not None:
        prepared.reducer.mean_grads(list(method.parameters()))
    return _info(method, prepared, update)


def backward(
    method: Balancer,
    losses: LossesLike,
    shared: nn.Module | Iterable[Tensor] | None = None,
    features: Tensor | Sequence[Tensor] | None = None,
    *,
    jacobian_mode: JacobianMode = "auto",
    retain_graph: bool = False,
    sync: bool | None = None,
    process_group: dist.ProcessGroup | None = None,
    scaler: GradScaler | None = None,
    on_nonfinite: Literal["raise", "skip", "propagate"] = "raise",
    gramian_path: GramianPath = "auto",
) -> StepInfo:
    """Fill ``.grad`` for one step of ``method``: the drop-in for ``sum(losses).backward()``.

    Args:
        method: the balancing method.
        losses: ``{task name: scalar loss}`` or a sequence of scalar losses.
        shared: the shared parameters (a module or an iterable of leaf tensors); needed at
            parameter level only. Frozen ones (``requires_grad=False``) are left out, and
            gradient hooks on them (``register_hook``) apply to each task's gradient.
        features: the shared representation z that every head reads (a tensor or a tuple of
            tensors); needed at feature level only. It must be the only path from the shared
            parameters to the losses.
        jacobian_mode: how per-task gradients are computed, see
            :func:`taskbalance.engine.task_jacobian`.
        gramian_path: how a Gramian method forms the parameter-level Gramian:
            ``"jacobian"`` from the ``T x n`` Jacobian's blocks; ``"layerwise"`` layer by
            layer from the per-task gradients at each layer's output and the layer's input
            (:mod:`taskbalance.engine.gramian_path`: no Jacobian block for Linear, Conv2d and
            Embedding layers), raising :class:`~taskbalance.engine.UncoveredLayerError` for
            a layer it has no rule for; ``"auto"`` (default) layer by layer whenever some
            layer is cheaper that way (estimated flops), the rows of uncovered layers then
            taken from autograd with one warning. Ignored at feature level and for Jacobian
            methods; under torch.distributed ``"auto"`` is the Jacobian path.
        retain_graph: keep the graph after the final backward.
        sync: reduce over the ranks of torch.distributed: ``None`` (default) whenever it is
            initialised with more than one rank, ``True`` always, ``False`` never. Each rank's
            losses must be means over equal-sized shards.
        process_group: the group to reduce over (default: the whole world).
        scaler: a ``torch.amp.GradScaler`` for mixed precision: pass the raw losses (not
            ``scaler.scale(loss)``); the backward carries the scale so that small gradients
            do not underflow, the per-task gradients are unscaled before the method sees
            them, and ``.grad`` holds scaled gradients for ``scaler.step(optimizer)``. A step
            whose per-task gradients overflow goes through unweighted so that
            ``scaler.step`` skips it, as it skips any overflow; the method's state is untouched.
        on_nonfinite: what a NaN or infinite loss does: ``"raise"`` (default) a
            :class:`NonFiniteLossError` naming the task, or ``"skip"`` the step: nothing is
            back-propagated, the method's state is untouched, ``method.skipped_steps`` counts
            it and the returned record has ``skipped=True``; or ``"propagate"``: no check, as
            ``sum(losses).backward()`` (non-finite values reach ``.grad``, where a GradScaler's
            ``scaler.step`` finds them). ``"raise"`` and ``"skip"`` read the T losses back to
            the host once per step; ``"propagate"`` is the setting with no read at all for
            tensors on an accelerator (:mod:`taskbalance.engine.placement`).

    Returns:
        A :class:`StepInfo` with the losses, weights, gradient norms and cosines.

    Raises:
        InvalidLossError: a loss that is not a finite scalar requiring grad, or that does not
            depend on the shared part (the message names the task).
        NonFiniteLossError: a NaN or infinite loss (unless ``on_nonfinite="skip"``); nothing
            is back-propagated.

    Cost under torch.distributed: an all-reduce of the T losses for every method; feature level
    adds a T x T all-reduce (Gramian methods) or an all-gather of the ``T x |z|`` z-Jacobian
    (Jacobian methods); parameter level all-reduces the ``T x n`` Jacobian and spends one more
    backward, through which DDP's own reduction runs as usual.

    >>> import torch, taskbalance
    >>> trunk = torch.nn.Linear(4, 3)
    >>> heads = torch.nn.ModuleList(torch.nn.Linear(3, 1) for _ in range(2))
    >>> z = trunk(torch.randn(8, 4))
    >>> losses = {f"t{i}": head(z).pow(2).mean() for i, head in enumerate(heads)}
    >>> info = taskbalance.IMTLG().backward(losses, features=z)
    >>> float(info.gradient_weights.sum())
    1.0
    """
    if on_nonfinite not in ("raise", "skip", "propagate"):
        raise ValueError(
            f"on_nonfinite must be 'raise', 'skip' or 'propagate', got {on_nonfinite!r}"
        )
    ranks = reducer(sync, process_group)
    try:
        prepared = _prepare(method, losses, ranks, scaler, on_nonfinite != "propagate")
    except NonFiniteLossError as error:
        if on_nonfinite == "raise" or error.values is None:
            raise
        method.skipped_steps += 1
        return StepInfo(
            tasks=error.names,
            losses=error.values,
            loss_weights=torch.zeros_like(error.values),
            level=method.level,
            skipped=True,
        )
    if method.requires is Requirement.LOSSES:
        prepared.total.backward(retain_graph=retain_graph)
        return _finish(method, prepared, None)
    if method.level == "feature":
        update = _feature_step(
            method, prepared, _features(method, features), jacobian_mode, retain_graph
        )
        return _finish(method, prepared, update)
    _, params = _shared_params(method, shared)
    refuse_fsdp1(params)
    if is_sharded(params):
        return _sharded_step(method, prepared, params, retain_graph)
    update = _shared_update(method, prepared, params, jacobian_mode, gramian_path, shared)
    if prepared.reducer is None:
        _backward_except(prepared, params, retain_graph)
        _accumulate(params, update.update)
    else:
        # Every rank holds the same global update; writing it through an ordinary backward
        # lets DDP's reducer run (averaging identical values) instead of waiting forever.
        _backward_substituting(prepared, params, update.update, retain_graph)
    return _finish(method, prepared, update)


def _sharded_update(
    method: Balancer, prepared: _Prepared, params: tuple[Tensor, ...]
) -> tuple[ShardedJacobian, _SharedUpdate]:
    """The per-task gradients' shards under FSDP2 and the method's combination of them."""
    if method.requires is not Requirement.GRAMIAN:
        raise ValueError(
            f"{type(method).__name__} needs the whole T x n Jacobian, which FSDP shards over "
            "the ranks; use level='feature', or a Gramian method (IMTL-G, MGDA, UPGrad, ...)"
        )
    with units_held():
        jacobian = ShardedJacobian(prepared.weighted_tasks(), params)
        update = _gramian_update(
            method, prepared, jacobian.leaves, jacobian.gramian, jacobian.combine
        )
    return jacobian, update


def _feature_step(
    method: Balancer,
    prepared: _Prepared,
    features: tuple[Tensor, ...],
    mode: JacobianMode,
    retain_graph: bool,
) -> _SharedUpdate:
    """A feature-level step. Outside torch.distributed, for one feature tensor read by disjoint
    heads: ONE backward of the total loss, which reads every task's row at z on its way through
    the heads and continues into the trunk with the combination
    (:func:`taskbalance.engine.edge_capture.backward_through_heads`). Otherwise the per-task
    passes, and one backward of the total with the combination substituted at z (which DDP's
    and FSDP's hooks need to see)."""
    if len(features) == 1 and mode == "auto" and prepared.reducer is None and not initialised():
        done: list[_SharedUpdate] = []

        def substitute(block: Tensor) -> Tensor:
            try:
                done.append(_shared_update(method, prepared, features, mode, captured=[block]))
            except Exception as error:
                error.add_note(_RAISED_INSIDE_THE_BACKWARD)
                raise
            return done[0].update[0]

        outputs = prepared.weighted_tasks()
        if backward_through_heads(prepared.total, outputs, features[0], substitute, retain_graph):
            return done[0]
    with units_held():  # under FSDP2, one all-gather per unit serves every pass
        update = _feature_update(method, prepared, features, mode)
    _backward_substituting(prepared, update.inputs, update.update, retain_graph)
    return update


_RAISED_INSIDE_THE_BACKWARD = (
    "taskbalance: raised inside the feature-level step's one backward, where the heads' .grad "
    "may already hold this step's gradients and the shared part has received nothing; zero "
    "the gradients (optimizer.zero_grad()) before the next step"
)


def _feature_update(
    method: Balancer, prepared: _Prepared, features: tuple[Tensor, ...], mode: JacobianMode
) -> _SharedUpdate:
    """The feature-level update; a per-task pass that fails because FSDP1 freed its flat
    parameters after the previous pass is named in one line."""
    try:
        return _shared_update(method, prepared, features, mode)
    except RuntimeError as error:
        if prepared.reducer is not None and any(
            is_fsdp1(leaf) for leaf in leaf_tensors(prepared.losses.tensors)
        ):
            raise ValueError(FSDP1_REFUSED) from error
        raise


def _sharded_step(
    method: Balancer, prepared: _Prepared, params: tuple[Tensor, ...], retain_graph: bool
) -> StepInfo:
    """Parameter level under FSDP2: the Gramian from each rank's shard of the global per-task
    gradients, and each rank's shard of the combination written into the sharded ``.grad``
    (:mod:`taskbalance.fsdp`)."""
    jacobian, update = _sharded_update(method, prepared, params)
    jacobian.accumulate(update.update)
    _backward_except(prepared, jacobian.leaves, retain_graph)
    jacobian.release()
    return _finish(method, prepared, update)


def gradients(
    method: Balancer,
    losses: LossesLike,
    shared: nn.Module | Iterable[Tensor],
    features: Tensor | Sequence[Tensor] | None = None,
    *,
    jacobian_mode: JacobianMode = "auto",
    sync: bool | None = None,
    process_group: dist.ProcessGroup | None = None,
    gramian_path: GramianPath = "auto",
) -> tuple[tuple[Tensor | None, ...], StepInfo]:
    """The method's combined gradient of the shared parameters, without touching ``.grad``.

    The functional form of :func:`backward`: the heads and the method's own parameters get
    nothing, and the graph is retained (the caller owns it). Under torch.distributed the
    returned gradients are, like those :func:`backward` writes, to be averaged over the ranks.

    Returns:
        One gradient per shared parameter (``None`` where no task depends on it, and for a
        frozen one), and the :class:`StepInfo`.

    >>> import torch, taskbalance
    >>> w = torch.ones(2, requires_grad=True)
    >>> grads, _ = taskbalance.EW().gradients([w.sum(), (3 * w).sum()], shared=[w])
    >>> grads[0]
    tensor([4., 4.])
    """
    listed, params = _shared_params(method, shared)
    prepared = _prepare(method, losses, reducer(sync, process_group))
    if method.requires is Requirement.LOSSES:
        grads = torch.autograd.grad(prepared.total, params, retain_graph=True, allow_unused=True)
        return _per_listed(listed, params, grads), _info(method, prepared, None)
    if method.level == "feature":
        update = _shared_update(method, prepared, _features(method, features), jacobian_mode)
        used = [(z, g) for z, g in zip(update.inputs, update.update, strict=True) if g is not None]
        grads = torch.autograd.grad(
            [z for z, _ in used],
            params,
            grad_outputs=[g for _, g in used],
            retain_graph=True,
            allow_unused=True,
        )
        return _per_listed(listed, params, grads), _info(method, prepared, update)
    if is_sharded(params):
        jacobian, update = _sharded_update(method, prepared, params)
        grads = jacobian.as_dtensors(update.update)
        return _per_listed(listed, params, grads), _info(method, prepared, update)
    update = _shared_update(method, prepared, params, jacobian_mode, gramian_path, shared)
    return _per_listed(listed, params, update.update), _info(method, prepared, update)


def task_gradients(
    method: Balancer,
    losses: LossesLike,
    shared: nn.Module | Iterable[Tensor],
    *,
    jacobian_mode: JacobianMode = "auto",
    retain_graph: bool = False,
    sync: bool | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[list[Tensor | None], StepInfo]:
    """Per-task gradients of the shared parameters, for optimizers with per-task state.

    The method's loss level applies (the gradients are those of ``w_t L_t``), and everything
    that is not shared (heads, the method's own parameters) receives the ordinary gradient of
    ``sum_t L'_t`` in ``.grad``; the shared parameters' ``.grad`` is left untouched. Under
    torch.distributed the returned blocks are the per-task gradients of the joined batch (the
    same on every rank), and the shared ``.grad`` receives zeros through the one ordinary
    backward that DDP's reducer needs.

    Args:
        method: a loss-level method (``Requirement.LOSSES``), e.g. ``EW()`` or ``IMTLL(...)``.
        losses, shared, jacobian_mode, retain_graph, sync, process_group: as in
            :func:`backward`.

    Returns:
        One block per shared parameter, ``block[t] = grad of w_t L_t`` of shape
        ``(T, *param.shape)`` (``None`` where no task depends on the parameter, and for a
        frozen one), and the
        :class:`StepInfo` (with the per-task gradient norms and cosines, from the Gramian of
        the blocks: ``O(T^2 n)``, small next to the T backward passes).

    >>> import torch, taskbalance
    >>> w = torch.ones(2, requires_grad=True)
    >>> blocks, _ = taskbalance.task_gradients(taskbalance.EW(), [w.sum(), (3 * w).sum()], [w])
    >>> blocks[0]
    tensor([[1., 1.],
            [3., 3.]])
    """
    if method.requires is not Requirement.LOSSES:
        raise ValueError(
            f"task_gradients composes with loss-level methods only; {type(method).__name__} "
            "weights gradients itself"
        )
    listed, params = _shared_params(method, shared)
    prepared = _prepare(method, losses, reducer(sync, process_group))
    num_tasks = len(prepared.losses.names)
    if is_sharded(params):
        return _sharded_task_gradients(method, prepared, listed, params, retain_graph)
    blocks = task_jacobian(prepared.weighted_tasks(), params, jacobian_mode)
    if prepared.reducer is not None:
        matrix = prepared.reducer.mean(to_matrix(blocks, params, num_tasks))
        blocks = list(from_matrix(matrix, params))
    if all(block is None for block in blocks):
        raise InvalidLossError("no task loss depends on the shared parameters")
    gram = gramian(blocks, num_tasks)
    norms = _norms(gram)
    _check_reachable(method, prepared.losses, norms, params)
    cosines = _cosines(gram, norms)
    if prepared.reducer is None:
        _backward_except(prepared, params, retain_graph)
    else:
        zeros: list[Tensor | None] = [torch.zeros_like(p) for p in params]
        _backward_substituting(prepared, params, zeros, retain_graph)
    info = _finish(method, prepared, None)
    record = StepInfo(info.tasks, info.losses, info.loss_weights, None, norms, cosines)
    return list(_per_listed(listed, params, blocks)), record


def _sharded_task_gradients(
    method: Balancer,
    prepared: _Prepared,
    listed: tuple[Tensor, ...],
    params: tuple[Tensor, ...],
    retain_graph: bool,
) -> tuple[list[Tensor | None], StepInfo]:
    """:func:`task_gradients` under FSDP2: this rank's shard of each task's global gradient,
    ``(T, *local shard shape)``, for an optimizer that updates the local shards."""
    with units_held():
        jacobian = ShardedJacobian(prepared.weighted_tasks(), params)
    norms = _norms(jacobian.gramian)
    _check_reachable(method, prepared.losses, norms, jacobian.leaves)
    _backward_except(prepared, jacobian.leaves, retain_graph)
    jacobian.release()
    info = _finish(method, prepared, None)
    cosines = _cosines(jacobian.gramian, norms)
    record = StepInfo(info.tasks, info.losses, info.loss_weights, None, norms, cosines)
    return list(_per_listed(listed, params, jacobian.blocks)), record
