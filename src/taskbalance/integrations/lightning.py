"""PyTorch Lightning: train a multi-task ``LightningModule`` with any method or AdaTask.

Mix :class:`MultiTaskMixin` into the module (before ``LightningModule``), give the module a
method as an attribute, and return ``self.balance(losses, ...)`` from ``training_step``::

    class Net(MultiTaskMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.trunk, self.heads = ..., nn.ModuleDict(...)
            self.method = taskbalance.IMTL(tasks=list(self.heads))

        def training_step(self, batch, batch_idx):
            x, ys = batch
            z = self.trunk(x)
            losses = {t: F.mse_loss(head(z), ys[t]) for t, head in self.heads.items()}
            return self.balance(losses, features=z, shared=self.trunk)

        def configure_optimizers(self):
            return torch.optim.Adam(self.multitask_param_groups(), lr=1e-3)

How it works: ``balance`` keeps the losses and returns a stand-in for their sum (a leaf with
that value). Lightning divides it by the accumulation steps, scales it for mixed precision and
calls the module's ``backward`` hook, which this mixin replaces by the method's backward. The
factor Lightning applied is read off the stand-in (the derivative of what reached ``backward``
w.r.t. it) and applied to every gradient the method writes, without the method seeing it.
So automatic optimisation keeps Lightning's machinery: gradient accumulation, clipping,
schedulers, mixed precision, DDP (the method's reductions over the ranks run inside its
backward; the method's own parameters are left out of DDP, which would average them a second
time). With manual optimisation, ``self.manual_backward(self.balance(losses, ...))`` runs
the same hook. Under Lightning's DeepSpeed strategy (ZeRO-1/2), whose precision plugin calls
``engine.backward`` instead of the hook, ``balance`` routes its loss from the plugin to the
hook, and the hook runs the step inside DeepSpeed's backward frame
(:func:`taskbalance.integrations.deepspeed.backward_frame`); the set-ups that frame cannot take
(ZeRO-3, fp16, gradient accumulation, AdaTask) are refused from ``balance`` in one line.

With an AdaTask optimizer (``taskbalance.AdaTaskAdam`` from ``configure_optimizers``) the
hook calls ``optimizer.backward(losses, method=...)`` instead; the method attribute is then
optional (a loss-level method such as ``IMTLL``) and equal weighting is the default.

Each step's record is logged with ``self.log_dict`` under ``taskbalance/...`` (see
:func:`taskbalance.integrations.step_metrics`), at the logger's ``log_every_n_steps``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from taskbalance.engine.losses import collect_losses
from taskbalance.integrations.common import (
    check_in_optimizers,
    check_method,
    method_backward,
    missing_extra,
    step_metrics,
)
from taskbalance.integrations.deepspeed import backward_frame, check_engine
from taskbalance.methods.base import Method
from taskbalance.optim.adatask import AdaTaskOptimizer

try:
    import lightning.pytorch as _lightning
except ImportError as error:  # the older package name, same classes under another namespace
    try:
        import pytorch_lightning as _lightning
    except ImportError:
        raise missing_extra("PyTorch Lightning", "lightning", error) from error

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from torch import nn

    from taskbalance.apply import StepInfo
    from taskbalance.engine.losses import LossesLike

__all__ = ["MultiTaskMixin"]


def _is_deepspeed(strategy: object) -> bool:
    """Whether ``strategy`` is Lightning's DeepSpeed strategy, of either namespace (told by
    name, so that nothing of DeepSpeed is imported to tell).

    >>> _is_deepspeed(object())
    False
    """
    return any(cls.__name__ == "DeepSpeedStrategy" for cls in type(strategy).__mro__)


def _check_deepspeed(engine: Any) -> None:
    """Raise, in one line, for a DeepSpeed engine the method's step cannot run in: those
    :func:`taskbalance.integrations.deepspeed.check_engine` refuses, and an AdaTask optimizer
    (its per-task state is per parameter; ZeRO hands it flat partitions)."""
    check_engine(engine)
    if isinstance(engine.basic_optimizer, AdaTaskOptimizer):
        raise ValueError(
            "AdaTask optimizers keep per-task state per parameter, which DeepSpeed's ZeRO "
            "partitions do not have; train them with DDP or ModelParallelStrategy (FSDP2)"
        )


def _trained_param_groups(trainer: Any) -> list[dict[str, Any]]:
    """The parameter groups of the trainer's optimizers, for ``check_in_optimizers``.

    DeepSpeed's ZeRO optimizer replaces its groups' parameters by flat partitions; each
    parameter it trains is linked to its partition instead (``_hp_mapping``, which DeepSpeed's
    ``safe_get_full_fp32_param`` reads too).
    """
    if _is_deepspeed(trainer.strategy):
        params = trainer.strategy.model.module.parameters()
        return [{"params": [p for p in params if getattr(p, "_hp_mapping", None) is not None]}]
    return [group for optimizer in trainer.optimizers for group in optimizer.param_groups]


def _route_to_module_backward(precision: Any) -> None:
    """Make Lightning's DeepSpeed precision plugin hand :meth:`MultiTaskMixin.balance`'s loss
    to the module's ``backward`` hook, as every other precision plugin does.

    Its own ``backward`` calls ``engine.backward(loss)`` and never the hook, where the method's
    step runs; automatic and manual optimisation both reach the plugin (``Strategy.backward``),
    so this one place serves both. Any other loss keeps DeepSpeed's backward. Installed once
    per plugin.
    """
    if getattr(precision, "_taskbalance_routed", False):
        return
    deepspeed_backward = precision.backward

    def backward(tensor: Tensor, model: Any, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(model, "_taskbalance_pending", None) is None:
            deepspeed_backward(tensor, model, optimizer, *args, **kwargs)
        else:
            model.backward(tensor, *args, **kwargs)  # what Lightning's base Precision does

    precision.backward = backward
    precision._taskbalance_routed = True


def _lightning_module_types() -> tuple[type, ...]:
    """``LightningModule`` of each installed namespace (``lightning.pytorch``,
    ``pytorch_lightning``): the mixin works with either."""
    types = [_lightning.LightningModule]
    try:
        import pytorch_lightning
    except ImportError:
        return tuple(types)
    if pytorch_lightning.LightningModule is not types[0]:
        types.append(pytorch_lightning.LightningModule)
    return tuple(types)


@dataclass
class _Pending:
    """What ``balance`` handed to the coming ``backward`` hook."""

    losses: LossesLike
    shared: nn.Module | Iterable[Tensor] | None
    features: Tensor | Sequence[Tensor] | None
    options: dict[str, Any]
    log: bool
    stand_in: Tensor
    """The leaf returned to Lightning in place of the summed loss."""


class MultiTaskMixin:
    """A mixin for a ``LightningModule`` whose training step produces several task losses.

    Use it as the first base class, ``class Net(MultiTaskMixin, LightningModule)``. The
    module's method is its one submodule that is a :class:`taskbalance.Method` (any attribute
    name); with an AdaTask optimizer it may have none (equal weighting).

    The method is part of the module: it moves with it, and its state and parameters are in
    the module's ``state_dict`` and checkpoints. Logged: ``taskbalance/loss/<task>``,
    ``taskbalance/weight/<task>``, ``taskbalance/grad_norm/<task>``,
    ``taskbalance/cosine/<t>-<u>``, ... (see :func:`taskbalance.integrations.step_metrics`).
    """

    _taskbalance_pending: _Pending | None = None
    _taskbalance_ignored: tuple[str, ...] = ()

    def balance(
        self,
        losses: LossesLike,
        *,
        features: Tensor | Sequence[Tensor] | None = None,
        shared: nn.Module | Iterable[Tensor] | None = None,
        log: bool = True,
        **options: Any,
    ) -> Tensor:
        """Hand this step's task losses to the method; return the loss for Lightning.

        Return the result from ``training_step`` (automatic optimisation), or pass it to
        ``self.manual_backward`` (manual optimisation): the backward that follows is the
        method's. Pass both ``features`` and ``shared`` to work with a method of any level.

        Args:
            losses: ``{task: scalar loss}`` (or a sequence), each a mean over the batch.
            features: the shared representation z the heads read (feature-level methods).
            shared: the shared module or parameters (parameter-level methods).
            log: log the step's record with ``self.log_dict``.
            options: keyword arguments of ``method.backward`` (``jacobian_mode``,
                ``on_nonfinite``) or, with an AdaTask optimizer, of ``optimizer.backward``.

        Returns:
            A scalar with the value of the summed losses (shown by Lightning as the loss);
            only scaled copies of it may reach ``backward``.
        """
        self._check_mixed_in()
        trainer = getattr(self, "_trainer", None)  # None when called outside a Trainer
        if trainer is not None and _is_deepspeed(trainer.strategy):
            # Checked here, so that a refused set-up is reported from training_step.
            _check_deepspeed(trainer.strategy.model)
            _route_to_module_backward(trainer.strategy.precision_plugin)
        # Checked now, so that a bad loss is reported from training_step; the method's
        # backward handles non-finite values (on_nonfinite).
        checked = collect_losses(losses, check_finite=False)
        stand_in = checked.values.detach().sum().requires_grad_()
        self._taskbalance_pending = _Pending(losses, shared, features, options, log, stand_in)
        return stand_in

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward hook: the method's backward when ``loss`` comes from
        :meth:`balance`, the ordinary ``loss.backward()`` otherwise."""
        pending = self._taskbalance_pending
        if pending is None:
            super().backward(loss, *args, **kwargs)  # type: ignore[misc]
            return
        self._taskbalance_pending = None
        if args or set(kwargs) - {"retain_graph"}:
            raise TypeError(
                "backward of balance()'s loss takes only retain_graph, got "
                f"{len(args)} positional and {sorted(kwargs)} keyword arguments"
            )
        (derivative,) = torch.autograd.grad(loss, pending.stand_in, allow_unused=True)
        if derivative is None or not 0 < float(derivative) < math.inf:
            raise ValueError(
                "the loss that reached backward does not come from balance(): return "
                "self.balance(losses, ...) from training_step (or pass it to manual_backward) "
                "as it is, or divided by a positive number"
            )
        options = {**pending.options, **kwargs}
        info = self._run_backward(pending, float(derivative), options)
        if pending.log:
            self.log_dict(step_metrics(info), on_step=True, on_epoch=False)  # type: ignore[attr-defined]

    def multitask_param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the module's parameters, then the method's own
        (``method.param_group()``: no weight decay), so that both are trained.

        ``configure_optimizers`` may instead build its groups by hand (e.g. an AdaTask
        optimizer's ``shared`` group); the backward checks that the method's own parameters
        reach an optimizer.
        """
        method = self._method(required=False)
        if method is None:
            return [{"params": list(self.parameters())}]  # type: ignore[attr-defined]
        own = {id(param) for param in method.parameters()}
        rest = [p for p in self.parameters() if id(p) not in own]  # type: ignore[attr-defined]
        groups: list[dict[str, Any]] = [{"params": rest}]
        if own:
            groups.append(method.param_group())
        return groups

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """What DistributedDataParallel leaves alone (it reads this attribute when it wraps the
        module): the method's parameters and buffers, whose gradients ``method.backward``
        averages over the ranks itself and whose state is the same on every rank."""
        names = list(self._taskbalance_ignored)
        for prefix, method in self._methods():
            names += [f"{prefix}.{name}" for name, _ in method.named_parameters()]
            names += [f"{prefix}.{name}" for name, _ in method.named_buffers()]
        return names

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names: Iterable[str]) -> None:
        """Other names to ignore (``DistributedDataParallel._set_params_and_buffers_to_ignore_
        for_model`` sets them); the method's are added to them."""
        self._taskbalance_ignored = tuple(names)

    # -- internals ----------------------------------------------------------------------------
    def _check_mixed_in(self) -> None:
        types = _lightning_module_types()
        mro = type(self).__mro__
        module_types = [t for t in types if t in mro]
        if not module_types:
            raise TypeError(
                f"{type(self).__name__}: MultiTaskMixin must be mixed into a LightningModule: "
                f"class {type(self).__name__}(MultiTaskMixin, LightningModule)"
            )
        if mro.index(MultiTaskMixin) > mro.index(module_types[0]):
            raise TypeError(
                f"{type(self).__name__}: MultiTaskMixin must come before LightningModule in the "
                f"base classes (its backward replaces LightningModule's): "
                f"class {type(self).__name__}(MultiTaskMixin, LightningModule)"
            )

    def _methods(self) -> list[tuple[str, Method]]:
        """The outermost submodules that are methods, with their names."""
        found: list[tuple[str, Method]] = []
        for name, module in self.named_modules():  # type: ignore[attr-defined]
            inside = any(name.startswith(f"{outer}.") for outer, _ in found)
            if isinstance(module, Method) and not inside:
                found.append((name, module))
        return found

    def _method(self, required: bool) -> Method | None:
        found = self._methods()
        if len(found) > 1:
            raise ValueError(
                f"{type(self).__name__} has several taskbalance methods "
                f"({', '.join(name for name, _ in found)}); keep one"
            )
        if not found and required:
            raise ValueError(
                f"{type(self).__name__} has no taskbalance method: assign one in __init__, e.g. "
                "self.method = taskbalance.get_method('imtl', tasks=['a', 'b']), or return an "
                "AdaTask optimizer from configure_optimizers"
            )
        return found[0][1] if found else None

    def _run_backward(
        self, pending: _Pending, derivative: float, options: dict[str, Any]
    ) -> StepInfo:
        trainer = self.trainer  # type: ignore[attr-defined]
        optimizers = trainer.optimizers
        adatask = [opt for opt in optimizers if isinstance(opt, AdaTaskOptimizer)]
        method = self._method(required=not adatask)
        if method is not None:
            check_method(method)
            check_in_optimizers(method, _trained_param_groups(trainer))
        amp = getattr(trainer.precision_plugin, "scaler", None)
        if amp is not None and amp.is_enabled():
            derivative /= amp.get_scale()
        else:
            amp = None
        if not adatask:
            assert method is not None
            strategy = trainer.strategy
            # Under DeepSpeed the step runs in its backward frame, which reduces it once.
            frame = backward_frame(strategy.model) if _is_deepspeed(strategy) else nullcontext()
            with frame:
                return method_backward(
                    method,
                    pending.losses,
                    shared=pending.shared,
                    features=pending.features,
                    factor=derivative,
                    amp=amp,
                    **options,
                )
        if len(adatask) > 1:
            raise ValueError("balance: several AdaTask optimizers; use one")
        if derivative != 1 or amp is not None:
            raise ValueError(
                "AdaTask optimizers take the per-task gradients unscaled: train them without "
                "gradient accumulation (accumulate_grad_batches=1) and without 16-bit mixed "
                "precision"
            )
        return adatask[0].backward(pending.losses, method=method, **options)
