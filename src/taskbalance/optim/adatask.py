"""AdaTask: per-task accumulators of an adaptive optimizer on the shared parameters (Yang et al.,
"AdaTask: A Task-aware Adaptive Learning Rate Approach to Multi-task Learning", AAAI 2023,
arXiv 2211.15055).

In Adam, one task's large gradients inflate the shared second moment and shrink every other
task's step on the shared parameters ("task dominance"). AdaTask keeps the accumulators per task
on every SHARED parameter ``p`` and sums the tasks' preconditioned directions; with
``g_k = grad of w_k L_k`` w.r.t. ``p`` and one step counter ``t`` per parameter:

    Adam:     m_k <- b1 m_k + (1 - b1) g_k,   v_k <- b2 v_k + (1 - b2) g_k^2,
              p <- p - lr * sum_k (m_k / (1 - b1^t)) / (sqrt(v_k / (1 - b2^t)) + eps)
    RMSprop:  G_k <- a G_k + (1 - a) g_k^2,   p <- p - lr * sum_k g_k / (sqrt(G_k) + eps)
    Adagrad:  G_k <- G_k + g_k^2,             p <- p - lr_t * sum_k g_k / (sqrt(G_k) + eps)

Task-specific parameters (heads, a loss-weighting method's own parameters) follow the plain
rule on the gradient of ``sum_k L'_k``, i.e. their ``.grad``. The Adam rule is the official
code's; the RMSprop and Adagrad rules are reconstructions from the same idea (the paper body was
not available).

Usage: mark the shared parameters with the param-group flag ``shared=True``; one step is

    opt = AdaTaskAdam([{"params": model.trunk.parameters(), "shared": True},
                       {"params": model.heads.parameters()}], lr=1e-3)
    opt.zero_grad()
    info = opt.backward(losses)          # or opt.backward(losses, method=IMTLL(...))
    opt.step()

``backward`` takes the T per-task gradients of the shared parameters in one batched call
(:func:`taskbalance.task_gradients`, T backward passes; the official code spends T + 1) and the
ordinary gradient into the heads' ``.grad``. Per-task gradients computed elsewhere can be given
with :meth:`AdaTaskOptimizer.set_task_grads`.

Weight decay (the official code accepts and ignores it): ``decoupled_weight_decay=True`` (the
default) shrinks every parameter by ``1 - lr * weight_decay`` before the step, as AdamW, and is
independent of the tasks; ``False`` is L2: ``weight_decay * p`` is added to the gradient, split
equally over the tasks on a shared parameter (``g_k + weight_decay * p / T``), so that the
task gradients still sum to the gradient of ``sum_k L_k + weight_decay / 2 * ||p||^2`` and a
single task reduces to ``torch.optim.Adam(weight_decay=...)``.

Cost per step: the same element-wise operations as Adam on T times the shared elements, all
vectorised over parameters with ``torch._foreach_*`` (one Python-level reduction over the task
axis per parameter). Memory on a shared parameter: 2T buffers for Adam (T for RMSprop and
Adagrad), plus the T gradients for the step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from taskbalance.apply import StepInfo
    from taskbalance.diagnostics.au import AUTracker
    from taskbalance.engine.jacobian import JacobianMode
    from taskbalance.engine.losses import LossesLike
    from taskbalance.methods.base import Method

TaskGrad = Tensor | Sequence[Tensor | None] | None
"""The per-task gradients of one shared parameter: a ``(T, *shape)`` tensor, T tensors of the
parameter's shape (``None`` for a task that does not reach it: zero), or ``None`` when no task
reaches the parameter."""


class AdaTaskOptimizer(torch.optim.Optimizer):
    """Base class of the AdaTask optimizers: per-task state on the shared parameters.

    Subclasses define ``_state_keys`` (the per-element accumulators) and ``_update``; this class
    handles parameter groups, the per-task gradients, validation, weight decay and the AU
    diagnostic's hook.
    """

    _state_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._pending: dict[int, Tensor] = {}
        self._owned: set[int] = set()
        """Parameters whose pending gradients the optimizer may overwrite (scratch space)."""
        self._warned_unreached: set[int] = set()
        self._num_tasks: int | None = None
        self.au: AUTracker | None = None
        super().__init__(params, defaults)

    # -- parameter groups -------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; ``shared`` (bool) marks its parameters as shared by the tasks."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not isinstance(group["shared"], bool):
            raise TypeError(f"param group 'shared' must be a bool, got {group['shared']!r}")
        if group["weight_decay"] < 0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")

    def shared_parameters(self) -> list[Tensor]:
        """The shared parameters, in the order :meth:`set_task_grads` expects their gradients."""
        return [p for group in self.param_groups if group["shared"] for p in group["params"]]

    def _shared_names(self) -> list[str]:
        names: list[str] = []
        index = 0
        for group in self.param_groups:
            if not group["shared"]:
                continue
            given = group.get("param_names")
            for i in range(len(group["params"])):
                names.append(given[i] if given is not None else f"shared.{index}")
                index += 1
        return names

    # -- per-task gradients -----------------------------------------------------------------
    def backward(
        self,
        losses: LossesLike,
        method: Method | None = None,
        *,
        jacobian_mode: JacobianMode = "auto",
        retain_graph: bool = False,
    ) -> StepInfo:
        """Per-task gradients of the shared parameters (stored for :meth:`step`) and the
        ordinary gradient of ``sum_t L'_t`` into every other parameter's ``.grad``.

        Args:
            losses: ``{task: scalar loss}`` or a sequence of losses.
            method: a loss-level method (default :class:`taskbalance.EW`): the per-task
                gradients are those of ``w_t L_t``.
            jacobian_mode, retain_graph: see :func:`taskbalance.task_gradients`.

        Returns:
            The step's :class:`taskbalance.StepInfo` (losses, weights, per-task norms).

        Like ``.grad``, the stored gradients accumulate over calls until :meth:`zero_grad`.
        """
        from taskbalance.apply import task_gradients
        from taskbalance.methods.ew import EW

        shared = self.shared_parameters()
        if not shared:
            raise ValueError(
                f"{type(self).__name__} has no shared parameters: mark their param group with "
                "'shared': True"
            )
        blocks, info = task_gradients(
            EW() if method is None else method,
            losses,
            shared,
            jacobian_mode=jacobian_mode,
            retain_graph=retain_graph,
        )
        self.set_task_grads(blocks, consume=True)
        return info

    def set_task_grads(self, task_grads: Sequence[TaskGrad], *, consume: bool = False) -> None:
        """Give the per-task gradients of the shared parameters for the next :meth:`step`.

        Args:
            task_grads: one entry per parameter of :meth:`shared_parameters`, see
                :data:`TaskGrad`. Accumulated into what an earlier call gave this step.
            consume: let :meth:`step` overwrite the given tensors (it uses them as scratch
                space instead of allocating ``T x`` the shared parameters every step);
                :meth:`backward` does so with the tensors it computed.

        Raises:
            ValueError: a wrong number of entries, a wrong shape, or a number of tasks that
                differs from the other parameters' or from earlier steps (names the parameter).
        """
        shared = self.shared_parameters()
        names = self._shared_names()
        if len(task_grads) != len(shared):
            raise ValueError(
                f"{type(self).__name__}: got per-task gradients for {len(task_grads)} "
                f"parameters, but the optimizer has {len(shared)} shared parameters"
            )
        expected = self._num_tasks or self._tasks_in_state()
        stacked: list[tuple[Tensor, Tensor]] = []
        for param, name, grad in zip(shared, names, task_grads, strict=True):
            block = _stack(grad, param, name)
            if block is None:
                if id(param) not in self._warned_unreached and id(param) not in self._pending:
                    self._warned_unreached.add(id(param))
                    warnings.warn(
                        f"{type(self).__name__}: shared parameter '{name}' (shape "
                        f"{tuple(param.shape)}) is reached by no task; it is not updated",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                continue
            if expected is None:
                expected = block.shape[0]
            if block.shape[0] != expected:
                raise ValueError(
                    f"{type(self).__name__}: shared parameter '{name}' got gradients for "
                    f"{block.shape[0]} tasks, expected {expected} (the number of tasks must "
                    "not change from one parameter or step to the next)"
                )
            stacked.append((param, block))
        for param, block in stacked:
            previous = self._pending.get(id(param))
            if previous is None:
                self._pending[id(param)] = block
                if consume:
                    self._owned.add(id(param))
            else:
                self._pending[id(param)] = previous + block
                self._owned.add(id(param))
        if expected is not None:
            self._num_tasks = expected

    def _tasks_in_state(self) -> int | None:
        key = self._state_keys[0]
        for param in self.shared_parameters():
            state = self.state.get(param)
            if state and key in state:
                return state[key].shape[0]
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset ``.grad`` (as torch does) and the stored per-task gradients."""
        super().zero_grad(set_to_none=set_to_none)
        self._pending.clear()
        self._owned.clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the per-task and plain states and the step counters."""
        super().load_state_dict(state_dict)
        self._pending.clear()
        self._owned.clear()
        self._num_tasks = None

    def track_au(self, every: int = 1, beta: float = 0.9) -> AUTracker:
        """Attach (and return) an :class:`~taskbalance.diagnostics.AUTracker` that receives
        each task's squared update on every shared parameter, every ``every`` steps.

        Its cost is one extra pass over the T per-task directions on the sampled steps only.
        """
        from taskbalance.diagnostics.au import AUTracker

        self.au = AUTracker(beta=beta, every=every)
        return self.au

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update: per-task rule on the shared parameters, plain rule on the others.

        Shared parameters without per-task gradients this step are skipped (as torch skips a
        parameter whose ``.grad`` is ``None``); one that has a ``.grad`` but no per-task
        gradients is an error (an ordinary ``backward`` was used instead of
        :meth:`backward`).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sampling = self.au is not None and self.au.tick()
        names: dict[int, str] | None = None
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            owned: list[bool] = []
            for param in group["params"]:
                if group["shared"]:
                    block = self._pending.pop(id(param), None)
                    if block is None:
                        if param.grad is not None:
                            name = self._name_of(param)
                            raise RuntimeError(
                                f"{type(self).__name__}: shared parameter '{name}' has a .grad "
                                "but no per-task gradients: call opt.backward(losses) instead "
                                "of loss.backward()"
                            )
                        continue
                    grads.append(block)
                    owned.append(id(param) in self._owned)
                elif param.grad is not None:
                    if param.grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse grads")
                    # A task-specific parameter is a single "task": the same code, T = 1.
                    grads.append(local_shard(param.grad).unsqueeze(0))
                    owned.append(False)
                else:
                    continue
                params.append(param)
            if not params:
                continue
            squares = self._group_step(group, params, grads, owned, sampling and group["shared"])
            if squares and self.au is not None:
                if names is None:
                    names = dict(
                        zip(map(id, self.shared_parameters()), self._shared_names(), strict=True)
                    )
                for param, square in zip(params, squares, strict=True):
                    self.au.update(names[id(param)], square)
        self._pending.clear()
        self._owned.clear()
        return loss

    def _name_of(self, param: Tensor) -> str:
        names = dict(zip(map(id, self.shared_parameters()), self._shared_names(), strict=True))
        return names.get(id(param), f"shape {tuple(param.shape)}")

    def _buffers(self, param: Tensor, num_tasks: int, shared: bool, group: dict[str, Any]):
        """The parameter's accumulators as ``(T, *shape)`` tensors (views for T = 1 of the
        task-specific ones, whose state keeps the parameter's shape, as torch's)."""
        state = self.state[param]
        param = local_shard(param)
        if not state:
            state["step"] = torch.tensor(0.0)
            for key in self._state_keys:
                state[key] = self._initial(param, num_tasks if shared else None, group)
        if not shared:
            return state, [state[key].unsqueeze(0) for key in self._state_keys]
        held = state[self._state_keys[0]]
        if held.dim() != param.dim() + 1 or held.shape[0] != num_tasks:
            raise ValueError(
                f"{type(self).__name__}: a shared parameter of shape {tuple(param.shape)} has "
                f"state of shape {tuple(held.shape)} but got gradients for {num_tasks} tasks"
            )
        return state, [state[key] for key in self._state_keys]

    def _initial(self, param: Tensor, num_tasks: int | None, group: dict[str, Any]) -> Tensor:
        shape = param.shape if num_tasks is None else (num_tasks, *param.shape)
        return param.new_zeros(shape)

    def _group_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        owned: list[bool],
        sampling: bool,
    ) -> list[Tensor]:
        """Weight decay, then the subclass's rule, on one group's parameters.

        Returns, when ``sampling``, each parameter's per-task squared update norms ``(T,)``
        (the AU diagnostic's input); else an empty list.
        """
        num_tasks = grads[0].shape[0]
        states, buffers = [], []
        for param, grad in zip(params, grads, strict=True):
            state, held = self._buffers(param, grad.shape[0], group["shared"], group)
            states.append(state)
            buffers.append(held)
        params = [local_shard(param) for param in params]  # FSDP2: each rank its own rows
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        counts = [float(s) for s in steps]
        decay = group["weight_decay"]
        if decay != 0 and not group["decoupled_weight_decay"]:
            # L2: the regulariser's gradient, split equally over the tasks (see module doc).
            grads = list(torch._foreach_add(grads, params, alpha=decay / num_tasks))
            owned = [True] * len(grads)
        rates = self._rates(group, counts)
        shrink = [1.0 - rate * decay if group["decoupled_weight_decay"] else 1.0 for rate in rates]
        by_key = [list(column) for column in zip(*buffers, strict=True)]
        # Scratch space for the directions: the gradients themselves where they are ours.
        scratch = [g if mine else None for g, mine in zip(grads, owned, strict=True)]
        directions = self._directions(group, grads, by_key, counts, scratch)
        factors = [
            -rate * scale for rate, scale in zip(rates, self._scales(group, counts), strict=True)
        ]
        squares = (
            [
                d.reshape(num_tasks, -1).square().sum(dim=1).mul_(f * f)
                for d, f in zip(directions, factors, strict=True)
            ]
            if sampling
            else []
        )
        if num_tasks == 1:
            if decay != 0:
                torch._foreach_mul_(params, shrink)
            updates = [d[0] for d in directions]
            torch._foreach_mul_(updates, factors)
            torch._foreach_add_(params, updates)
        else:
            ones = directions[0].new_ones(num_tasks)
            for param, direction, factor, keep in zip(
                params, directions, factors, shrink, strict=True
            ):
                # p <- keep * p + factor * sum_k d_k, in one pass and without a temporary:
                # a matrix-vector product of the (n, T) directions with ones.
                if param.is_contiguous() and direction.is_contiguous():
                    flat = param.view(-1)
                    flat.addmv_(direction.view(num_tasks, -1).t(), ones, beta=keep, alpha=factor)
                else:
                    param.mul_(keep).add_(direction.sum(0), alpha=factor)
        return squares

    # -- the rule (override) ----------------------------------------------------------------
    def _rates(self, group: dict[str, Any], steps: list[float]) -> list[float]:
        """The learning rate of this step, per parameter (Adagrad decays it)."""
        return [group["lr"]] * len(steps)

    def _scales(self, group: dict[str, Any], steps: list[float]) -> list[float]:
        """A per-parameter factor of the learning rate (Adam's bias corrections)."""
        return [1.0] * len(steps)

    def _directions(
        self,
        group: dict[str, Any],
        grads: list[Tensor],
        buffers: list[list[Tensor]],
        steps: list[float],
        scratch: list[Tensor | None],
    ) -> list[Tensor]:
        """Update the accumulators (``buffers[i]``: the ``_state_keys[i]`` of every parameter,
        each ``(T, *shape)``); return the per-task directions ``(T, *shape)``, written into
        ``scratch[i]`` where it is not ``None`` (see :func:`_root`)."""
        raise NotImplementedError


def local_shard(tensor: Tensor) -> Tensor:
    """The rows of an FSDP2-sharded DTensor that this rank holds (the tensor itself when it is
    not sharded): AdaTask's rule is elementwise, so each rank updates its own shard.

    >>> local_shard(torch.ones(2))
    tensor([1., 1.])
    """
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def _stack(grad: TaskGrad, param: Tensor, name: str) -> Tensor | None:
    """One parameter's per-task gradients as a ``(T, *shape)`` tensor, checked (the local
    shard's shape for an FSDP2-sharded parameter)."""
    if grad is None:
        return None
    param = local_shard(param)
    if not isinstance(grad, Tensor):
        parts = list(grad)
        if all(part is None for part in parts):
            return None
        zeros = torch.zeros_like(param)
        grad = torch.stack([zeros if part is None else part for part in parts])
    if grad.dim() != param.dim() + 1 or grad.shape[1:] != param.shape:
        raise ValueError(
            f"per-task gradients of shared parameter '{name}' have shape {tuple(grad.shape)}; "
            f"expected (T, {', '.join(map(str, param.shape))})"
        )
    if grad.dtype != param.dtype or grad.device != param.device:
        raise ValueError(
            f"per-task gradients of shared parameter '{name}' are {grad.dtype} on {grad.device}; "
            f"the parameter is {param.dtype} on {param.device}"
        )
    return grad


def _root(squares: list[Tensor], scratch: list[Tensor | None]) -> list[Tensor]:
    """``sqrt`` of the accumulators, written into the scratch tensors where given (the
    gradients, no longer needed once the moments are updated), else into new tensors."""
    if all(s is None for s in scratch):
        return list(torch._foreach_sqrt(squares))
    roots = []
    for square, space in zip(squares, scratch, strict=True):
        roots.append(torch.sqrt(square) if space is None else torch.sqrt(square, out=space))
    return roots


def _divide_into(numerators: list[Tensor], denominators: list[Tensor], eps: float) -> None:
    """``denominators <- numerators / denominators`` in place (one pass, no temporary).

    With ``eps = 0`` a zero denominator (a task with no gradient so far, whose numerator is
    then zero too) gives 0, not ``0 / 0``.
    """
    if eps == 0:
        torch._foreach_clamp_min_(denominators, torch.finfo(denominators[0].dtype).tiny)
    for numerator, denominator in zip(numerators, denominators, strict=True):
        torch.div(numerator, denominator, out=denominator)


def _check_common(lr: float, eps: float, weight_decay: float) -> None:
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


class AdaTaskAdam(AdaTaskOptimizer):
    """Adam with per-task moments on the shared parameters (AdaTask, Yang et al., AAAI 2023).

    On a shared parameter, per task k: ``m_k``, ``v_k`` as Adam's and
    ``p <- p - lr * sum_k m^_k / (sqrt(v^_k) + eps)``, one step counter per parameter; on the
    other parameters, plain Adam on ``.grad``. This is the official code's rule. With one task
    it is ``torch.optim.AdamW`` (decoupled decay) or ``torch.optim.Adam`` (L2).

    Args:
        params: parameters or param groups; a group with ``"shared": True`` holds shared
            parameters (per-task state), every other group task-specific ones.
        lr: learning rate (official default 1e-3).
        betas: the moments' decay rates (official default (0.9, 0.999)).
        eps: added to ``sqrt(v^_k)`` (outside the root; official default 1e-8).
        weight_decay: decay strength (0 by default).
        decoupled_weight_decay: ``True`` (default): AdamW-style ``p *= 1 - lr * weight_decay``;
            ``False``: L2 added to the gradients (split over the tasks on shared parameters).
        shared: the default of the groups' ``shared`` flag.

    Memory: 2T buffers per shared parameter (2 per task-specific one).

    >>> import torch
    >>> trunk = torch.nn.Linear(3, 4)
    >>> heads = torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in "ab")
    >>> groups = [{"params": trunk.parameters(), "shared": True}, {"params": heads.parameters()}]
    >>> opt = AdaTaskAdam(groups)
    >>> z = trunk(torch.randn(5, 3))
    >>> opt.zero_grad(); info = opt.backward([h(z).pow(2).mean() for h in heads]); opt.step()
    >>> opt.state[trunk.weight]["exp_avg"].shape  # T x the parameter's shape
    torch.Size([2, 4, 3])
    """

    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        shared: bool = False,
    ) -> None:
        _check_common(lr, eps, weight_decay)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "shared": shared,
        }
        super().__init__(params, defaults)

    def _scales(self, group: dict[str, Any], steps: list[float]) -> list[float]:
        # m^ / (sqrt(v^) + eps) = (c2 / c1) * m / (sqrt(v) + c2 * eps), with the bias
        # corrections c1 = 1 - b1^t and c2 = sqrt(1 - b2^t): both go to the step size.
        beta1, beta2 = group["betas"]
        return [math.sqrt(1.0 - beta2**s) / (1.0 - beta1**s) for s in steps]

    def _directions(
        self,
        group: dict[str, Any],
        grads: list[Tensor],
        buffers: list[list[Tensor]],
        steps: list[float],
        scratch: list[Tensor | None],
    ) -> list[Tensor]:
        beta1, beta2 = group["betas"]
        means, squares = buffers
        torch._foreach_lerp_(means, grads, 1.0 - beta1)
        torch._foreach_mul_(squares, beta2)
        torch._foreach_addcmul_(squares, grads, grads, 1.0 - beta2)
        denominators = _root(squares, scratch)
        eps = group["eps"]
        torch._foreach_add_(denominators, [math.sqrt(1.0 - beta2**s) * eps for s in steps])
        _divide_into(means, denominators, eps)
        return denominators


class AdaTaskRMSprop(AdaTaskOptimizer):
    """RMSprop with per-task squared averages on the shared parameters (AdaTask idea;
    a RECONSTRUCTION: the paper's RMSprop variant was not available).

    On a shared parameter, per task k: ``G_k <- alpha G_k + (1 - alpha) g_k^2`` and
    ``p <- p - lr * sum_k g_k / (sqrt(G_k) + eps)``; plain RMSprop (no momentum, not
    centred) elsewhere. With one task and L2 decay it is ``torch.optim.RMSprop``.

    Args:
        params: parameters or param groups (``"shared": True`` marks shared ones).
        lr: learning rate (1e-3, AdaTask's; torch's RMSprop default is 1e-2).
        alpha: the squared average's decay (0.99, torch's default).
        eps: added to ``sqrt(G_k)`` (1e-8).
        weight_decay, decoupled_weight_decay, shared: as :class:`AdaTaskAdam`.

    Memory: T buffers per shared parameter.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = AdaTaskRMSprop([w], shared=True, lr=0.1)
    >>> opt.set_task_grads([torch.tensor([[1.0, 0.0], [0.0, 100.0]])]); opt.step()
    >>> w.detach().abs().max() < 1e-6  # each task moves its coordinate by 0.1 / sqrt(0.01)
    tensor(True)
    """

    _state_keys = ("square_avg",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        shared: bool = False,
    ) -> None:
        _check_common(lr, eps, weight_decay)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "eps": eps,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "shared": shared,
        }
        super().__init__(params, defaults)

    def _directions(
        self,
        group: dict[str, Any],
        grads: list[Tensor],
        buffers: list[list[Tensor]],
        steps: list[float],
        scratch: list[Tensor | None],
    ) -> list[Tensor]:
        alpha = group["alpha"]
        (squares,) = buffers
        torch._foreach_mul_(squares, alpha)
        torch._foreach_addcmul_(squares, grads, grads, 1.0 - alpha)
        # The gradient is needed after the root: no scratch (as torch's RMSprop).
        denominators = torch._foreach_sqrt(squares)
        torch._foreach_add_(denominators, group["eps"])
        _divide_into(grads, denominators, group["eps"])
        return list(denominators)


class AdaTaskAdagrad(AdaTaskOptimizer):
    """Adagrad with per-task sums of squares on the shared parameters (AdaTask idea;
    a RECONSTRUCTION: the paper's Adagrad variant was not available).

    On a shared parameter, per task k: ``G_k <- G_k + g_k^2`` and
    ``p <- p - lr_t * sum_k g_k / (sqrt(G_k) + eps)`` with ``lr_t = lr / (1 + (t - 1) lr_decay)``
    (torch's schedule); plain Adagrad elsewhere. With one task and L2 decay it is
    ``torch.optim.Adagrad``. Decoupled decay uses ``lr_t``.

    Args:
        params: parameters or param groups (``"shared": True`` marks shared ones).
        lr: learning rate (1e-3, AdaTask's; torch's Adagrad default is 1e-2).
        lr_decay: torch's learning-rate decay (0).
        eps: added to ``sqrt(G_k)`` (1e-8; torch's default is 1e-10).
        initial_accumulator_value: the sums' starting value (0).
        weight_decay, decoupled_weight_decay, shared: as :class:`AdaTaskAdam`.

    Memory: T buffers per shared parameter.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> opt = AdaTaskAdagrad([w], shared=True, lr=1.0, eps=0.0)
    >>> opt.set_task_grads([torch.tensor([[1.0, 0.0], [0.0, -50.0]])]); opt.step()
    >>> w.detach()
    tensor([-1.,  1.])
    """

    _state_keys = ("sum",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        lr_decay: float = 0.0,
        eps: float = 1e-8,
        initial_accumulator_value: float = 0.0,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        shared: bool = False,
    ) -> None:
        _check_common(lr, eps, weight_decay)
        if lr_decay < 0 or initial_accumulator_value < 0:
            raise ValueError("lr_decay and initial_accumulator_value must be >= 0")
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "initial_accumulator_value": initial_accumulator_value,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "shared": shared,
        }
        super().__init__(params, defaults)

    def _initial(self, param: Tensor, num_tasks: int | None, group: dict[str, Any]) -> Tensor:
        return torch.full(
            param.shape if num_tasks is None else (num_tasks, *param.shape),
            group["initial_accumulator_value"],
            dtype=param.dtype,
            device=param.device,
        )

    def _rates(self, group: dict[str, Any], steps: list[float]) -> list[float]:
        return [group["lr"] / (1.0 + (s - 1.0) * group["lr_decay"]) for s in steps]

    def _directions(
        self,
        group: dict[str, Any],
        grads: list[Tensor],
        buffers: list[list[Tensor]],
        steps: list[float],
        scratch: list[Tensor | None],
    ) -> list[Tensor]:
        (sums,) = buffers
        torch._foreach_addcmul_(sums, grads, grads, 1.0)
        denominators = torch._foreach_sqrt(sums)
        torch._foreach_add_(denominators, group["eps"])
        _divide_into(grads, denominators, group["eps"])
        return list(denominators)
