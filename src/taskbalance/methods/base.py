"""The method API: what every balancing method declares and computes.

A method has up to two parts, each optional:

- loss level, ``loss_weights(losses) -> (w, c)``: the task losses become ``L'_t = w_t L_t + c_t``.
  ``w`` may carry gradient into the method's own parameters (IMTL-L's scales); everything that
  is not shared (heads, the method's parameters) is trained on ``sum_t L'_t``.
- gradient level, for the shared part only: ``shared_weights(losses, gramian) -> a`` (methods
  that need only the Gramian ``K = G G^T`` of the per-task gradients of ``L'``), or
  ``aggregate(losses, jacobian) -> update`` (methods that need the Jacobian ``G`` itself). The
  shared part then receives ``sum_t a_t grad L'_t`` (or the aggregated update).

The maths lives in pure functions on tensors; a method class only adapts them to this API and
knows nothing of models, ``.grad`` or devices. The engine and :mod:`taskbalance.apply` do the
autograd work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from taskbalance.apply import StepInfo, backward, gradients
from taskbalance.engine.placement import on_accelerator
from taskbalance.engine.requirement import Level, Requirement
from taskbalance.errors import InvalidLossError

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch.distributed as dist
    from torch.amp import GradScaler

    from taskbalance.engine.gramian_path import GramianPath
    from taskbalance.engine.jacobian import JacobianMode
    from taskbalance.engine.losses import LossesLike


class Method(nn.Module):
    """Base class of every balancing method.

    Subclasses set the class attributes below and override ``loss_weights`` and/or
    ``shared_weights`` (or ``aggregate``). Construct a method with ``tasks`` (a count or the
    task names) when it keeps per-task state.

    Args:
        tasks: the number of tasks, or their names. Optional for stateless methods: the task
            names are then fixed by the first call that passes a dict of losses.
        level: ``"feature"`` (gradients w.r.t. the shared representation z, cheap) or
            ``"parameter"`` (w.r.t. the shared parameters, exact), for gradient-level methods.
    """

    name: ClassVar[str] = ""
    """The registry name (lower-case snake case)."""
    paper: ClassVar[str] = ""
    """The paper the method comes from."""
    requires: ClassVar[Requirement] = Requirement.LOSSES
    levels: ClassVar[tuple[Level, ...]] = ()
    """The levels a gradient-level method supports (empty for loss-level methods)."""
    default_level: ClassVar[Level | None] = None
    stateful: ClassVar[bool] = False
    """Whether the method keeps per-task state, and so needs ``tasks`` at construction."""

    def __init__(self, tasks: int | Sequence[str] | None = None, level: Level | None = None):
        super().__init__()
        self._task_names: tuple[str, ...] | None = None
        self._num_tasks: int | None = None
        self.skipped_steps = 0
        """Steps skipped for a non-finite loss (``backward(..., on_nonfinite="skip")``)."""
        if isinstance(tasks, int) and not isinstance(tasks, bool):
            if tasks < 1:
                raise ValueError(f"{type(self).__name__}: tasks must be >= 1, got {tasks}")
            self._num_tasks = tasks
        elif tasks is not None:
            names = tuple(str(t) for t in tasks)
            if not names or len(set(names)) != len(names):
                raise ValueError(
                    f"{type(self).__name__}: task names must be non-empty and distinct, "
                    f"got {list(names)}"
                )
            self._task_names, self._num_tasks = names, len(names)
        elif self.stateful:
            raise TypeError(
                f"{type(self).__name__} keeps per-task state, so it needs the tasks at "
                f"construction: {type(self).__name__}(tasks=3) or tasks=['seg', 'depth']"
            )
        self.level: Level | None = self._check_level(level)

    def _check_level(self, level: Level | None) -> Level | None:
        if not self.levels:
            if level is not None:
                raise ValueError(
                    f"{type(self).__name__} works on the losses only and has no level; "
                    f"got level={level!r}"
                )
            return None
        chosen = self.default_level if level is None else level
        if chosen not in self.levels:
            raise ValueError(
                f"{type(self).__name__} supports level in {list(self.levels)}, got {level!r}"
            )
        return chosen

    # -- the tasks ------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int | None:
        """The number of tasks, once known."""
        return self._num_tasks

    @property
    def task_names(self) -> tuple[str, ...] | None:
        """The task names, once known (from the constructor or the first dict of losses)."""
        return self._task_names

    def bind_tasks(self, names: tuple[str, ...], named: bool) -> None:
        """Fix the tasks on first use; later calls must pass the same tasks.

        Called by :func:`taskbalance.apply.backward` before any method hook runs.
        """
        if self._num_tasks is not None and len(names) != self._num_tasks:
            raise ValueError(
                f"{type(self).__name__} was built for {self._num_tasks} tasks, got "
                f"{len(names)} losses"
            )
        self._num_tasks = len(names)
        if named and self._task_names is None:
            self._task_names = names

    def task_label(self, index: int) -> str:
        """A task's name for messages."""
        return self._task_names[index] if self._task_names is not None else str(index)

    @property
    def wants_new_losses(self) -> bool:
        """Whether the method learns from the losses re-evaluated after the optimizer's step
        (FAMO): a training loop then calls ``method.update(new_losses)`` after each step.

        >>> from taskbalance import EW
        >>> EW().wants_new_losses
        False
        """
        return False

    def require_positive(self, losses: Tensor, why: str) -> None:
        """Raise :class:`InvalidLossError` naming every task whose loss is ``<= 0``.

        For methods that take logs or ratios of the losses; ``why`` says in the message what
        goes wrong for such a loss. Not checked for losses on an accelerator, where it would
        read the losses back every step (:mod:`taskbalance.engine.placement`); check such a
        loss on the CPU, or once in a while, yourself.

        >>> from taskbalance import EW
        >>> try:
        ...     EW(tasks=["a", "b"]).require_positive(torch.tensor([1.0, 0.0]), "log L")
        ... except InvalidLossError as error:
        ...     print(error.task)
        b
        """
        if on_accelerator(losses):
            return  # reading the losses back would stall the device every step
        bad = (losses <= 0).nonzero().flatten().tolist()
        if bad:
            listed = ", ".join(f"'{self.task_label(i)}' = {losses[i].item():.4g}" for i in bad)
            raise InvalidLossError(
                f"{type(self).__name__} needs positive losses ({why}), got {listed}; shift such "
                "a loss by a constant or use another method",
                task=self.task_label(bad[0]),
            )

    def get_extra_state(self) -> dict[str, Any]:
        """The tasks and the skipped-step count, saved in ``state_dict`` with the tensors."""
        return {
            "num_tasks": self._num_tasks,
            "task_names": self._task_names,
            "skipped_steps": self.skipped_steps,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the tasks; loading a state for another number of tasks is an error."""
        if self._num_tasks is not None and state["num_tasks"] not in (None, self._num_tasks):
            raise ValueError(
                f"{type(self).__name__}: the state is for {state['num_tasks']} tasks, this "
                f"method has {self._num_tasks}"
            )
        self._num_tasks = state["num_tasks"] or self._num_tasks
        self._task_names = state["task_names"] or self._task_names
        self.skipped_steps = state.get("skipped_steps", 0)

    @property
    def unit_loss_weights(self) -> bool:
        """Whether ``loss_weights`` is ``(ones, None)`` by construction (the default is not
        overridden), so that the engine may skip it and the multiplications by one.

        >>> from taskbalance import EW, IMTLG, IMTLL
        >>> IMTLG().unit_loss_weights, EW().unit_loss_weights, IMTLL(tasks=2).unit_loss_weights
        (True, True, False)
        """
        return type(self).loss_weights is Method.loss_weights

    # -- the maths (override) ---------------------------------------------------------------
    def loss_weights(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-task loss weights ``w`` and offsets ``c``, so that ``L'_t = w_t L_t + c_t``.

        Args:
            losses: the raw task losses, detached, shape ``(T,)``.

        Returns:
            ``(w, c)``; ``w`` may carry gradient into the method's own parameters; ``c`` is
            ``None`` when there is no offset. The default is ``w = 1``, ``c = None``.
        """
        return torch.ones_like(losses), None

    def check_losses(self, losses: Tensor) -> None:
        """Raise on losses the method's gradient level cannot take (e.g. EMTL's negative
        losses). Called with ``w_t L_t`` before anything is back-propagated, so that such a
        loss leaves ``.grad`` untouched even where the method runs inside the step's backward
        (the feature level's one pass); not called for losses on an accelerator. Checks
        nothing by default.

        >>> from taskbalance import EW
        >>> EW().check_losses(torch.tensor([-1.0, 2.0]))  # EW takes any loss
        """

    def shared_weights(self, losses: Tensor, gramian: Tensor) -> Tensor:
        """Weights ``a`` of the per-task gradients for the shared part (Gramian methods).

        Args:
            losses: the weighted losses ``w_t L_t``, detached, shape ``(T,)``.
            gramian: ``K = G G^T`` of the gradients of ``w_t L_t``, shape ``(T, T)``.

        A method whose solve runs in float64 numpy anyway may also define
        ``host_weights(losses, gramian: HostGramian) -> np.ndarray``
        (:class:`taskbalance.engine.placement.HostGramian`): on the CPU the step then calls it
        with the Gramian's norms and cosines it already holds on the host, when every gradient is
        non-zero and finite, and saves the conversions (IMTL-G and IMTL do). It must give the
        weights this method gives.
        """
        raise NotImplementedError(f"{type(self).__name__} does not weight gradients")

    def aggregate(self, losses: Tensor, jacobian: Tensor) -> Tensor:
        """The update of the shared part from the Jacobian (Jacobian methods).

        Args:
            losses: the weighted losses ``w_t L_t``, detached, shape ``(T,)``.
            jacobian: the ``(T, n)`` matrix of the gradients of ``w_t L_t``. It may live in
                a buffer the engine reuses at the next step: copy what you keep.
        """
        raise NotImplementedError(f"{type(self).__name__} does not aggregate a Jacobian")

    # -- the user's entry points ------------------------------------------------------------
    def backward(
        self,
        losses: LossesLike,
        shared: nn.Module | Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        *,
        jacobian_mode: JacobianMode = "auto",
        retain_graph: bool = False,
        sync: bool | None = None,
        process_group: dist.ProcessGroup | None = None,
        scaler: GradScaler | None = None,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        gramian_path: GramianPath = "auto",
    ) -> StepInfo:
        """Replace ``sum(losses).backward()``: fill ``.grad`` as this method prescribes.

        See :func:`taskbalance.apply.backward` for the arguments.
        """
        return backward(
            self,
            losses,
            shared,
            features,
            jacobian_mode=jacobian_mode,
            retain_graph=retain_graph,
            sync=sync,
            process_group=process_group,
            scaler=scaler,
            on_nonfinite=on_nonfinite,
            gramian_path=gramian_path,
        )

    def gradients(
        self,
        losses: LossesLike,
        shared: nn.Module | Iterable[Tensor],
        features: Tensor | Sequence[Tensor] | None = None,
        *,
        jacobian_mode: JacobianMode = "auto",
        sync: bool | None = None,
        process_group: dist.ProcessGroup | None = None,
        gramian_path: GramianPath = "auto",
    ) -> tuple[tuple[Tensor | None, ...], StepInfo]:
        """The combined gradient of the shared parameters, without touching ``.grad``.

        See :func:`taskbalance.apply.gradients`.
        """
        return gradients(
            self,
            losses,
            shared,
            features,
            jacobian_mode=jacobian_mode,
            sync=sync,
            process_group=process_group,
            gramian_path=gramian_path,
        )

    def param_group(self, **options: Any) -> dict[str, Any]:
        """An optimizer parameter group for the method's own parameters, without weight decay.

        >>> from taskbalance import IMTLL
        >>> method = IMTLL(tasks=2)
        >>> group = method.param_group(lr=1e-2)
        >>> group["weight_decay"], group["lr"]
        (0.0, 0.01)
        """
        return {"params": list(self.parameters()), "weight_decay": 0.0, **options}

    def extra_repr(self) -> str:
        parts = [f"tasks={self._num_tasks}"] if self._num_tasks is not None else []
        if self.level is not None:
            parts.append(f"level={self.level!r}")
        return ", ".join(parts)
