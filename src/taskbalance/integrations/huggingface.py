"""Hugging Face Transformers: a ``Trainer`` whose backward is a taskbalance method's.

The model's forward returns, next to anything else, its task losses under ``task_losses``
(``{task: scalar loss}``, each a mean over the batch) and, for a feature-level method, the
shared representation its heads read under ``features``; a dict or a ``ModelOutput`` with those
fields. Then::

    trainer = MultiTaskTrainer(
        model=model, args=TrainingArguments(...), train_dataset=dataset,
        method=taskbalance.IMTL(tasks=["sentiment", "topic"]),
    )
    trainer.train()

:class:`MultiTaskTrainer` replaces the Trainer's ``training_step``: the forward runs as the
Trainer runs it (input preparation, autocast), the losses go through ``method.backward`` with
the Trainer's gradient-accumulation factor and mixed-precision scaler applied to the gradients
(never to what the method sees), and everything after (clipping, optimizer and scheduler steps,
logging, checkpoints) is the Trainer's. The method's own parameters are added to the optimizer
the Trainer creates, and its state (learnt loss scales, loss histories) is saved in every
checkpoint folder as ``taskbalance_method.pt`` and read back by
``train(resume_from_checkpoint=...)``. Each logged training entry gains the method's record
averaged over the steps since the previous one, under ``taskbalance/...`` (see
:func:`taskbalance.integrations.step_metrics`).

With an AdaTask optimizer (``optimizers=(taskbalance.AdaTaskAdam(...), None)``) the step calls
``optimizer.backward(losses, method=...)`` instead (no gradient accumulation, no fp16).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from taskbalance.integrations.common import (
    check_in_optimizers,
    check_method,
    method_backward,
    missing_extra,
    step_metrics,
)
from taskbalance.integrations.deepspeed import backward as deepspeed_backward
from taskbalance.methods.base import Method
from taskbalance.methods.ew import EW
from taskbalance.optim.adatask import AdaTaskOptimizer

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as error:
    raise missing_extra("Hugging Face Transformers", "hf", error) from error

if TYPE_CHECKING:
    from taskbalance.apply import StepInfo

__all__ = ["METHOD_STATE", "MultiTaskTrainer", "task_outputs"]

#: The file, in each of the Trainer's checkpoint folders, that holds the method's state_dict.
METHOD_STATE = "taskbalance_method.pt"


def task_outputs(outputs: Any) -> tuple[Mapping[str, Tensor], Tensor | None]:
    """The task losses and the shared features in a model's output.

    Args:
        outputs: what the model's forward returned: a dict or a ``ModelOutput`` with
            ``task_losses`` (``{task: scalar loss}``) and, optionally, ``features``.

    Raises:
        ValueError: the output has no ``task_losses`` dict (the message lists what it has).

    >>> losses, features = task_outputs({"task_losses": {"a": torch.tensor(1.0)}})
    >>> list(losses), features
    (['a'], None)
    """
    if not isinstance(outputs, Mapping):
        raise ValueError(
            "MultiTaskTrainer needs the model to return a dict (or ModelOutput) with "
            f"'task_losses' ({{task: scalar loss}}), got a {type(outputs).__name__}"
        )
    losses = outputs.get("task_losses")
    if not isinstance(losses, Mapping):
        found = "no 'task_losses'" if losses is None else f"a {type(losses).__name__}"
        raise ValueError(
            "MultiTaskTrainer needs the model's output to hold 'task_losses', a dict "
            f"{{task: scalar loss}}; it has {found} (keys: {list(outputs.keys())})"
        )
    return losses, outputs.get("features")


class MultiTaskTrainer(Trainer):
    """A ``transformers.Trainer`` that trains on several task losses with a taskbalance method.

    Args:
        *args, **kwargs: the ``Trainer``'s arguments (``model``, ``args``, ``train_dataset``,
            ``optimizers``, ...).
        method: the balancing method (a registry method or an instance); default equal
            weighting. With an AdaTask optimizer: a loss-level method or None.
        shared: for a parameter-level method, the name of the shared submodule (e.g.
            ``"bert"``); default the model's ``base_model`` when it is a submodule of it.

    The method lives next to the model (on its device), not in it; its ``state_dict`` is saved
    in each checkpoint folder (:data:`METHOD_STATE`) and loaded by
    ``train(resume_from_checkpoint=...)``, so a resumed run continues with the method's
    learnt scales and histories, not fresh ones.
    """

    def __init__(
        self, *args: Any, method: Method | None = None, shared: str | None = None, **kwargs: Any
    ) -> None:
        self.method = EW() if method is None else method
        check_method(self.method)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        feature_level = self.method.level == "feature" and training_args is not None
        if feature_level and training_args.ddp_find_unused_parameters is None:
            # The Trainer's default for a PreTrainedModel is True, which cuts the features off
            # the losses under DDP (see _check_features_reach_losses).
            training_args.ddp_find_unused_parameters = False
        self.shared_name = shared
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            raise NotImplementedError(
                "MultiTaskTrainer supports one process, DistributedDataParallel, FSDP2 "
                "(fsdp_config={'fsdp_version': 2}) and DeepSpeed ZeRO-1/2, not DataParallel "
                "(several GPUs in one process)"
            )
        self.method.to(self.args.device)
        self.add_callback(_ClearMethodGrads(self.method))

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """The Trainer's ``train``; resuming from a checkpoint also loads the method's state
        saved there (a checkpoint without one, e.g. written by a plain ``Trainer``, leaves the
        method as it is, with a warning when the method keeps state)."""
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        if isinstance(folder, (str, Path)):
            path = Path(folder) / METHOD_STATE
            if path.is_file():
                # On the CPU: the state may hold a CPU generator's state, which must stay there;
                # load_state_dict copies the tensors onto the method's device.
                self.method.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            elif _keeps_state(self.method):
                warnings.warn(
                    f"{folder} holds no {METHOD_STATE}: {type(self.method).__name__} resumes "
                    "with its current state, not the state it had at that checkpoint",
                    stacklevel=2,
                )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any, *args: Any, **kwargs: Any) -> None:
        # The Trainer's checkpoint, then the method's state into the same folder: the run
        # folder of a hyperparameter-search trial, on every process that saves (should_save:
        # each node's main process with save_on_each_node, so every node can resume).
        super()._save_checkpoint(model, trial, *args, **kwargs)
        if self.args.should_save:
            run_dir = Path(self._get_output_dir(trial=trial))
            folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            torch.save(self.method.state_dict(), folder / METHOD_STATE)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus the method's parameters (``method.param_group()``)."""
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if created and any(True for _ in self.method.parameters()):
            optimizer.add_param_group(self.method.param_group())
        return optimizer

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """One forward, the method's backward; returns the summed task losses (detached,
        divided by the accumulation steps as the Trainer's own step returns its loss).

        The task losses are taken as means over this batch: ``num_items_in_batch`` is not
        passed to the model.
        """
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
        losses, features = task_outputs(outputs)
        factor = 1.0 / self.current_gradient_accumulation_steps
        info = self._backward(model, losses, features, factor)
        self._add(step_metrics(info))
        total = torch.stack([loss.detach().reshape(()) for loss in losses.values()]).sum()
        return total * factor

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log; a training entry (one with ``loss``) also gets the method's
        record averaged over the steps since the previous one."""
        if "loss" in logs and self._counts:
            logs.update({name: float(self._sums[name]) / n for name, n in self._counts.items()})
            self._sums.clear()
            self._counts.clear()
        super().log(logs, *args, **kwargs)

    # -- internals ----------------------------------------------------------------------------
    def _backward(
        self,
        model: nn.Module,
        losses: Mapping[str, Tensor],
        features: Tensor | None,
        factor: float,
    ) -> StepInfo:
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        check_in_optimizers(self.method, optimizer.param_groups)
        amp = self.accelerator.scaler
        if isinstance(optimizer, AdaTaskOptimizer):
            if factor != 1 or (amp is not None and amp.is_enabled()):
                raise ValueError(
                    "AdaTask optimizers take the per-task gradients unscaled: train them "
                    "without gradient accumulation (gradient_accumulation_steps=1) and fp16"
                )
            return optimizer.backward(dict(losses), method=self.method)
        if self.method.level == "feature":
            _check_features_reach_losses(model)
        shared = self._shared(model) if self.method.level == "parameter" else None
        if self.is_deepspeed_enabled:  # the step inside DeepSpeed's backward frame
            info = deepspeed_backward(
                model, self.method, dict(losses), shared=shared, features=features
            )
            model.step()  # as accelerate's backward does: its optimizer.step() is a no-op
            return info
        return method_backward(
            self.method, dict(losses), shared=shared, features=features, factor=factor, amp=amp
        )

    def _shared(self, model: nn.Module) -> nn.Module:
        unwrapped = self.accelerator.unwrap_model(model)
        if self.shared_name is not None:
            return unwrapped.get_submodule(self.shared_name)
        base = getattr(unwrapped, "base_model", None)
        if isinstance(base, nn.Module) and base is not unwrapped:
            return base
        raise ValueError(
            f"{type(self.method).__name__}(level='parameter') needs the shared part: "
            "MultiTaskTrainer(..., shared='<name of the shared submodule>')"
        )

    def _add(self, metrics: dict[str, Tensor]) -> None:
        """Sum the step's metrics on their device (no synchronisation until a log)."""
        for name, value in metrics.items():
            self._sums[name] = self._sums[name] + value if name in self._sums else value
            self._counts[name] = self._counts.get(name, 0) + 1


def _keeps_state(method: Method) -> bool:
    """Whether ``method`` has state a checkpoint should restore: parameters, buffers, or extra
    state beyond its tasks (e.g. a random generator's state)."""
    if any(True for _ in (*method.parameters(), *method.buffers())):
        return True
    return bool(set(method.get_extra_state()) - set(Method.get_extra_state(method)))


def _check_features_reach_losses(model: nn.Module) -> None:
    """Under DistributedDataParallel with ``find_unused_parameters`` (or ``static_graph``), DDP
    passes the model's outputs through one autograd node, so the returned ``features`` is no
    longer on the path from the losses to the trunk: a feature-level method cannot use it."""
    ddp = torch.nn.parallel.DistributedDataParallel
    if isinstance(model, ddp) and (model.find_unused_parameters or model.static_graph):
        raise ValueError(
            "a feature-level method under DistributedDataParallel needs "
            "TrainingArguments(ddp_find_unused_parameters=False, ddp_static_graph=False): "
            "otherwise DDP detaches the returned features from the task losses "
            "(MultiTaskTrainer sets the first when it is left unset); or use level='parameter'"
        )


class _ClearMethodGrads(TrainerCallback):
    """Clears the method's gradients after each optimizer step: the Trainer clears only the
    model's (``model.zero_grad()``), and the method is not in the model."""

    def __init__(self, method: Method) -> None:
        self.method = method

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Called by the Trainer after the optimizer's step."""
        self.method.zero_grad()
