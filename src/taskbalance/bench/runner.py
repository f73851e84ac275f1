"""Train one (dataset, method, seed) run: the benchmark's training loop, selection and checkpoints.

What a run is made of lives beside it: its config and result in
:mod:`taskbalance.bench.run_config`, the method spec and how it becomes a method and an
optimizer in :mod:`taskbalance.bench.method_specs`, the checkpoint files in
:mod:`taskbalance.bench.checkpoints`.

Protocol of one run (:class:`Runner`):

* Problem: a :class:`taskbalance.bench.problem.Problem` (the data, the model factory, each
  task's loss and metric). A built-in :class:`~taskbalance.bench.data.types.MultiTaskData`
  given instead becomes one through :func:`taskbalance.bench.builtin.builtin_problem` with
  ``config.arch``, ``config.model_options`` and ``config.regression_loss``.
* Model: ``problem.model(tasks)``, built after ``torch.manual_seed(config.seed)``.
* Losses per task: the task's ``loss`` (for the built-in data sets
  :func:`taskbalance.bench.metrics.task_loss`: cross-entropy; BCE with logits over the
  non-missing labels; MSE, or L1, on standardised regression targets). A task's loss
  is multiplied by ``config.loss_scale[task]`` before the method sees it (the IMTL paper's x10
  experiment); selection and reports use the unscaled losses.
* Update: ``method.backward(losses, shared=model.trunk, features=features(z))`` then the
  optimizer's step. A multi-input problem (one data set per task) draws one batch per task per
  step, an epoch being as many steps as the largest training set needs (the smaller ones
  cycle, reshuffled each time round), and trains at parameter level only. The optimizer is
  Adam (L2 ``weight_decay``) over the model and
  ``method.param_group()``. The pseudo-method ``"adatask"`` pairs a loss-level method (EW by
  default, option ``base=``) with :class:`taskbalance.optim.AdaTaskAdam` (per-task moments on the
  shared parameters; L2 weight decay, as Adam's, so the two differ only in the moments).
* Stochastic methods (those with a ``seed`` hyperparameter) get ``seed=config.seed`` unless given.
* Mini-batches: a fresh permutation of the training split per epoch from a generator seeded with
  ``config.seed``; the last partial batch is kept. Evaluation reads each split in order, in
  batches of ``problem.eval_batch_size`` or ``config.eval_batch_size`` rows, and feeds each
  task's metric (see :class:`taskbalance.bench.problem.Task`).
* Selection: after each epoch, a validation criterion; the epoch with the lowest value is the
  selected one and its model state is kept. With ``config.reference`` (the single-task
  baselines' validation metrics of the same seed) the criterion is the validation Delta m %
  against them over every metric of every task (a multi-metric task contributes each of its
  metrics), the quantity the table reports; without it (single-task runs, or no
  baselines) the mean over tasks of the UNSCALED validation losses. Test metrics are computed
  once, at the end, on that state: the test split never influences anything.
* Time per step: wall time of forward + losses + method backward + optimizer step, per step; the
  median over the run is reported (robust to a shared, noisy machine).
* Divergence: a NaN or infinite training or validation loss stops the run; it is reported as
  diverged at that epoch, with the test metrics of the best epoch before it (if any).
* Checkpoints: after every epoch, :meth:`Runner.state_dict` (model, optimizer, method, epoch,
  best state so far, history, RNG states, diagnostics) is written atomically; a run built with
  the same config and ``resume=True`` continues from it and ends with bit-identical parameters
  and metrics on CPU.
* Diagnostics (``record_every=k``): a :class:`taskbalance.Recorder` reads the
  :class:`~taskbalance.StepInfo` of every k-th step (no extra backward: what the step computed,
  e.g. EMTL's ``r_t`` and its spread wherever the step formed per-task gradient norms) and, for
  AdaTask, the optimizer's AU tracker sampled on the same steps. The records end up in
  :attr:`RunResult.records`. Pairwise cosines are not recorded (``T (T - 1) / 2`` numbers a
  sample); single-task runs record nothing.
* Several processes (torch.distributed initialised with more than one rank): see
  :mod:`taskbalance.bench.parallel`. The model is wrapped in DistributedDataParallel, each rank
  trains on its equal shard of every mini-batch (``batch_size`` is the global batch), the
  method reduces over the ranks by itself, rank 0's evaluation is broadcast, and only rank 0
  logs, shows progress and writes checkpoints.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from taskbalance.apply import StepInfo
from taskbalance.bench.builtin import builtin_problem
from taskbalance.bench.checkpoints import (
    CHECKPOINT_VERSION,
    FINISHED_STATE,
    CheckpointMismatchError,
    DamagedCheckpointError,
    DamagedCheckpointWarning,
    read_checkpoint,
    save_checkpoint,
    set_aside,
)
from taskbalance.bench.data.types import MultiTaskData
from taskbalance.bench.method_specs import MethodSpec, build_method, build_optimizer
from taskbalance.bench.metrics import delta_m
from taskbalance.bench.parallel import (
    World,
    barrier,
    broadcast,
    current_world,
    mean_over_ranks,
    shard,
)
from taskbalance.bench.problem import (
    Batch,
    Problem,
    check_model,
    check_problem,
    features,
    fetch,
    metric_value,
    rows,
    to_device,
)
from taskbalance.bench.run_config import RunConfig, RunResult
from taskbalance.errors import NonFiniteLossError
from taskbalance.methods.base import Method


def _check_level(problem: Problem, method: Method, spec: MethodSpec) -> None:
    if problem.multi_input and method.level == "feature":
        raise ValueError(
            f"{spec.label}: {problem.name} is multi-input (one data set per task), so it "
            f"trains at parameter level; use {spec.name}:level=parameter"
        )


def check_setup(
    problem: Problem,
    methods: Sequence[MethodSpec],
    loss_scale: Mapping[str, float],
    seed: int = 0,
) -> None:
    """Check, before anything trains, that ``problem`` can run ``methods``: ``loss_scale``
    names its tasks, its model factory returns a model of the contract (built once, after
    ``torch.manual_seed(seed)``), and no method asks for a level the problem cannot give
    (feature level on a multi-input problem). Raises a one-line ``ValueError``.

    >>> from taskbalance.bench.builtin import builtin_problem
    >>> from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec
    >>> s = Split(torch.zeros(4, 3), {"y": torch.zeros(4)})
    >>> d = MultiTaskData("toy", (TaskSpec("y", "regression", 1, "mae", False),), s, s, s, "", "")
    >>> check_setup(builtin_problem(d), [MethodSpec("ew")], {"z": 10.0})
    Traceback (most recent call last):
    ...
    ValueError: --loss-scale names unknown task(s) z; tasks of toy: y
    """
    check_problem(problem)
    unknown = sorted(set(loss_scale) - set(problem.task_names))
    if unknown:
        raise ValueError(
            f"--loss-scale names unknown task(s) {', '.join(unknown)}; tasks of {problem.name}: "
            f"{', '.join(problem.task_names)}"
        )
    torch.manual_seed(seed)
    check_model(problem.model(problem.task_names), problem)
    for spec in methods:
        _check_level(problem, build_method(spec, problem.task_names, seed=0), spec)


class Runner:
    """One training run; see the module docstring for the protocol.

    Args:
        data: the dataset.
        config: the run's configuration.
        checkpoint: where to write the state after each epoch (``None``: no checkpoint).
        resume: continue from ``checkpoint`` if it exists (its config must equal ``config``).
        progress: show a tqdm bar over epochs.
        log: called with a one-line summary after each epoch.
        record_every: sample the diagnostics every this many steps (``None`` or 0: none).
        keep_final_state: keep the model, optimizer and method state in the checkpoint of a
            finished run. By default a finished run's checkpoint keeps only its result (what
            resuming reads back), a small fraction of the full state.
        dtype: train and evaluate in this floating dtype (default: the data's, float32);
            float64 serves exactness checks (e.g. several ranks against one process).

    Under torch.distributed (more than one rank), only rank 0 keeps ``progress``, ``log`` and
    the checkpoint writes; every rank reads a checkpoint to resume.

    >>> from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(64, 3, generator=g)
    >>> s = Split(x, {"a": x[:, 0], "b": x[:, 1] - x[:, 2]})
    >>> tasks = tuple(TaskSpec(t, "regression", 1, "mae", False) for t in "ab")
    >>> data = MultiTaskData("toy", tasks, s, s, s, "toy", "none")
    >>> cfg = RunConfig(epochs=2, batch_size=16, model_options={"hidden": 8, "tower": 4})
    >>> result = Runner(data, cfg, progress=False).run()
    >>> result.status, result.best_epoch in (1, 2), sorted(result.test_metrics)
    ('ok', True, ['a', 'b'])
    """

    def __init__(
        self,
        data: Problem | MultiTaskData,
        config: RunConfig,
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        resume: bool = False,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        record_every: int | None = None,
        keep_final_state: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        problem = (
            data
            if isinstance(data, Problem)
            else builtin_problem(data, config.arch, config.model_options, config.regression_loss)
        )
        self.problem = check_problem(problem)
        self.config = config
        self.dtype = dtype
        self.world: World = current_world()
        self.tasks: tuple[str, ...] = config.tasks or problem.task_names
        self.specs = {t: problem.task(t) for t in self.tasks}
        self.directions = {k: v for t in self.tasks for k, v in self.specs[t].directions.items()}
        """``{metric key: higher_is_better}`` of the trained tasks' metrics."""
        self._check(problem, config)
        self.scale = (
            {}
            if len(self.tasks) == 1
            else {t: float(config.loss_scale.get(t, 1.0)) for t in self.tasks}
        )
        self.device = torch.device(config.device)
        # The same seed on every rank: identical initial models (DDP also broadcasts rank 0's).
        torch.manual_seed(config.seed)
        self.model = check_model(problem.model(self.tasks), problem).to(
            device=self.device, dtype=dtype
        )
        # A single-task baseline trains with EW: one loss has nothing to be balanced against.
        single = config.tasks is not None and len(config.tasks) == 1
        spec = MethodSpec("ew") if single else config.method
        method = build_method(spec, self.tasks, config.seed)
        self.method = method.to(device=self.device, dtype=dtype)
        _check_level(problem, self.method, config.method)
        self.optimizer = build_optimizer(
            spec, self.model, self.method, self.tasks, config.lr, config.weight_decay
        )
        self.adatask = config.method.name == "adatask" and len(self.tasks) > 1
        self.forward: nn.Module = self.model
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids)
        self.recorder = None
        if record_every and len(self.tasks) > 1:
            from taskbalance.diagnostics import Recorder

            au = self.optimizer.track_au(every=record_every) if self.adatask else None  # type: ignore[attr-defined]
            self.recorder = Recorder(every=record_every, au=au, cosines=False)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.status = "running"
        self.diverged_epoch: int | None = None
        self.step_times: list[float] = []
        self.rows_trained = 0
        """Training rows this process stepped on since it was built (its shards under DDP)."""
        self.result: RunResult | None = None
        self.progress = progress and self.world.main
        self.log = log if self.world.main else None
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.keep_final_state = keep_final_state
        if resume and self.checkpoint is not None and self.checkpoint.exists():
            self._resume(self.checkpoint)

    def _resume(self, path: Path) -> None:
        """Continue from the checkpoint ``path``. One that cannot be read back whole
        (:func:`~taskbalance.bench.checkpoints.read_checkpoint`: truncated by a full disk, a bad
        copy) is renamed to ``<name>.damaged`` and the run trains from the start, with a
        :class:`DamagedCheckpointWarning` (and a log line) naming both files. Retraining rather
        than stopping: the file holds nothing that training again does not give back (a run is
        deterministic from its config), stopping would hold up every other run of the benchmark
        on a file the user could only move away, and the file is kept for whoever wants to look.
        A readable checkpoint of another configuration or data still stops the run
        (:class:`CheckpointMismatchError`): that is a wrong ``--out`` or option, not damage."""
        try:
            state = read_checkpoint(path)
        except DamagedCheckpointError as error:
            barrier(self.world)  # every rank has read the file before rank 0 moves it
            if self.world.main:
                message = f"{error}; kept as {set_aside(path).name}, {self.config.label} " \
                    "trains from the start"  # fmt: skip
                warnings.warn(message, DamagedCheckpointWarning, stacklevel=3)
                if self.log is not None:
                    self.log(message)
            return
        try:
            self.load_state_dict(state)
        except CheckpointMismatchError as error:
            raise CheckpointMismatchError(f"{path}: {error}") from None

    def _check(self, problem: Problem, config: RunConfig) -> None:
        unknown = sorted(set(config.loss_scale) - set(problem.task_names))
        if unknown:
            raise ValueError(
                f"loss_scale names unknown task(s) {unknown}; tasks: "
                f"{', '.join(problem.task_names)}"
            )
        if config.reference is not None and set(config.reference) != set(self.directions):
            raise ValueError(
                f"reference must give one validation value per metric {list(self.directions)}, "
                f"got {sorted(config.reference)}"
            )
        if problem.multi_input and self.world.distributed:
            raise ValueError(
                f"{problem.name} is multi-input: not supported under torch.distributed"
            )

    def _batch(self, split: str, index: Tensor, task: str | None = None) -> Batch:
        """Rows ``index`` of ``split`` (of ``task``'s data set when multi-input), collated and on
        the device."""
        dataset = self.problem.split(split, task)
        return to_device(fetch(dataset, index, self.problem.collate), self.device, self.dtype)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly where this one is."""
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "data": self.problem.key,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "best": self.best,
            "history": self.history,
            "status": self.status,
            "diverged_epoch": self.diverged_epoch,
            "step_times": self.step_times,
            "rng": {"torch": torch.get_rng_state(), "shuffle": self.shuffle.get_state()},
            "result": None if self.result is None else self.result.to_dict(),
            "recorder": None if self.recorder is None else self.recorder.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the config must be this run's."""
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointMismatchError(
                f"checkpoint version {state.get('version')} is not supported (this version "
                f"writes {CHECKPOINT_VERSION})"
            )
        mine = self.config.to_dict()
        if state["config"] != mine:
            keys = sorted(k for k in mine if state["config"].get(k) != mine[k])
            raise CheckpointMismatchError(
                f"the checkpoint was written for another configuration ({keys})"
            )
        if state["data"] != self.problem.key:
            raise CheckpointMismatchError(
                f"the checkpoint was written for other data (fingerprint {state['data']}, this "
                f"run's data {self.problem.key}: another data set, split or training size)"
            )
        self.epoch = state["epoch"]
        self.history = list(state["history"])
        self.status = state["status"]
        self.diverged_epoch = state["diverged_epoch"]
        self.result = None if state["result"] is None else RunResult.from_dict(state["result"])
        if "model" not in state:  # a finished run's checkpoint holds only its result
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        self.best = state["best"]
        self.step_times = list(state["step_times"])
        torch.set_rng_state(state["rng"]["torch"])
        self.shuffle.set_state(state["rng"]["shuffle"])
        if self.recorder is not None and state.get("recorder") is not None:
            self.recorder.load_state_dict(state["recorder"])

    def _save(self) -> None:
        if self.checkpoint is None or not self.world.main:
            return
        state = self.state_dict()
        if self.result is not None and not self.keep_final_state:
            # Finished: resuming needs only the result; the weights and moments are dropped.
            state = {k: state[k] for k in FINISHED_STATE}
        save_checkpoint(state, self.checkpoint)

    # -- training -----------------------------------------------------------------------------
    def outputs(self, batch: Batch) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]]:
        """The forward of a training batch: ``(z, {task: output}, {task: target})``; ``z`` is
        ``None`` for a multi-input batch (``{task: (inputs, target)}``), whose task ``t`` output
        comes from ``t``'s own inputs."""
        if self.problem.multi_input:
            outputs = {t: self.forward(batch[t][0])[1][t] for t in self.tasks}
            return None, outputs, {t: batch[t][1] for t in self.tasks}
        inputs, targets = batch
        z, outputs = self.forward(inputs)
        return z, outputs, {t: targets[t] for t in self.tasks}

    def _losses(self, outputs: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {t: self.specs[t].loss(outputs[t], y[t]) for t in self.tasks}

    def _scaled(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        """The losses the method sees: ``--loss-scale`` applied."""
        return {t: raw[t] * self.scale[t] if self.scale.get(t, 1.0) != 1.0 else raw[t]
                for t in self.tasks}  # fmt: skip

    def step(self, batch: Batch) -> tuple[dict[str, Tensor], StepInfo]:
        """One training step on a collated batch (on the device): forward, losses, the method's
        backward, the optimizer's step. Returns the unscaled losses (detached) and the method's
        :class:`StepInfo`.

        Raises :class:`taskbalance.NonFiniteLossError` (nothing updated) on a NaN loss.
        """
        z, outputs, targets = self.outputs(batch)
        raw = self._losses(outputs, targets)
        losses = self._scaled(raw)
        self.optimizer.zero_grad(set_to_none=True)
        if self.adatask:
            info = self.optimizer.backward(losses, method=self.method)  # type: ignore[attr-defined]
        else:
            info = self.method.backward(
                losses, shared=self.model.trunk, features=None if z is None else features(z)
            )
        self.optimizer.step()
        if self.method.wants_new_losses:
            # FAMO learns from how much each loss fell: the same batch, after the step, as
            # the paper's code does (one extra forward, no backward); averaged over the ranks
            # so that every rank's method state stays the same.
            with torch.no_grad():
                _, after, targets = self.outputs(batch)
                new = torch.stack(list(self._scaled(self._losses(after, targets)).values()))
            self.method.update(mean_over_ranks(new.double(), self.world).to(new.dtype))
        return {t: v.detach() for t, v in raw.items()}, info

    def batches(self) -> list[tuple[int, Callable[[], Batch]]]:
        """One epoch's training batches, in order, as ``(rows, fetch)`` pairs (the rows this
        rank trains on, and how to get the batch); draws the epoch's order from the shuffle
        generator. Multi-input: as many steps as the largest task's data set needs, each with
        a batch of every task (the smaller sets cycle, reshuffled each time round)."""
        size = self.config.batch_size
        if not self.problem.multi_input:
            n = len(self.problem.train)  # type: ignore[arg-type]
            order = torch.randperm(n, generator=self.shuffle)
            cuts = [shard(order[s : s + size], self.world) for s in range(0, n, size)]
            return [(len(i), functools.partial(self._batch, "train", i)) for i in cuts if len(i)]
        sizes = self.problem.sizes("train")
        longest = max(sizes.values())
        orders = {}
        for t in self.tasks:
            rounds = -(-longest // sizes[t])
            orders[t] = torch.cat(
                [torch.randperm(sizes[t], generator=self.shuffle) for _ in range(rounds)]
            )[:longest]
        return [
            (
                min(size, longest - s) * len(self.tasks),
                functools.partial(
                    self._task_batches, {t: o[s : s + size] for t, o in orders.items()}
                ),
            )
            for s in range(0, longest, size)
        ]

    def first_batch(self) -> Batch:
        """The first ``batch_size`` training rows (of every task's data set when multi-input;
        this rank's shard under several ranks), collated and on the device."""
        size = self.config.batch_size
        if self.problem.multi_input:
            sizes = self.problem.sizes("train")
            return self._task_batches({t: torch.arange(min(size, sizes[t])) for t in self.tasks})
        n = min(len(self.problem.train), size)  # type: ignore[arg-type]
        return self._batch("train", shard(torch.arange(n), self.world))

    def _task_batches(self, index: Mapping[str, Tensor]) -> Batch:
        return {t: self._batch("train", i, t) for t, i in index.items()}

    def train_epoch(self) -> dict[str, Any] | None:
        """One pass over the training split; ``None`` if a loss turned NaN or infinite.

        Under several ranks each trains on its shard of every mini-batch
        (:func:`taskbalance.bench.parallel.shard`); the epoch's mean losses are averaged over the
        ranks (one all-reduce per epoch).
        """
        self.model.train()
        # Running sums stay on the device, in float64: no host sync per step.
        totals = torch.zeros(len(self.tasks), dtype=torch.float64, device=self.device)
        weights = torch.zeros(len(self.tasks), dtype=torch.float64, device=self.device)
        steps, times = 0, []
        for count, get in self.batches():
            batch = get()
            began = time.perf_counter()
            try:
                raw, info = self.step(batch)
            except NonFiniteLossError:
                return None
            times.append(time.perf_counter() - began)
            self.rows_trained += count
            totals += torch.stack([raw[t] for t in self.tasks]).double()
            weights += info.weights.detach().double().to(self.device)
            steps += 1
            if self.recorder is not None:
                self.recorder.observe(info)
        self.step_times.extend(times)
        if steps == 0:
            raise ValueError(
                f"no training step: {self.problem.sizes('train')} training rows for "
                f"{self.world.size} rank(s)"
            )
        totals = mean_over_ranks(totals, self.world).cpu()
        weights = weights.cpu()
        return {
            "train_loss": dict(zip(self.tasks, (totals / steps).tolist(), strict=True)),
            "weights": dict(zip(self.tasks, (weights / steps).tolist(), strict=True)),
            "step_ms": 1e3 * statistics.median(times),
            "train_seconds": sum(times),
        }

    @torch.no_grad()
    def evaluate(self, split: str) -> tuple[dict[str, float], dict[str, float]]:
        """Unscaled losses per task and metrics per metric key (:attr:`Task.metric_keys`)
        on ``split`` (``"val"`` or ``"test"``), in evaluation mode; no metric when a loss is
        not finite.

        Under several ranks every rank evaluates the whole split and rank 0's numbers are
        returned everywhere, so that all ranks select and stop alike.
        """
        return broadcast(self._evaluate(split), self.world)

    def _evaluate(self, split: str) -> tuple[dict[str, float], dict[str, float]]:
        self.model.eval()
        size = self.problem.eval_batch_size or self.config.eval_batch_size
        loss_acc = {t: self.specs[t].loss_accumulator() for t in self.tasks}
        metric_acc = {t: self.specs[t].accumulator(self.device) for t in self.tasks}
        groups = [(t,) for t in self.tasks] if self.problem.multi_input else [self.tasks]
        for group in groups:
            n = len(self.problem.split(split, group[0]))  # type: ignore[arg-type]
            for start, stop in rows(size, n):
                inputs, targets = self._batch(
                    split, torch.arange(start, stop), group[0] if self.problem.multi_input else None
                )
                _, out = self.model(inputs)
                for t in group:
                    target = targets if self.problem.multi_input else targets[t]
                    loss_acc[t].update(out[t], target)
                    metric_acc[t].update(out[t], target)
        losses = {t: metric_value(a.compute()) for t, a in loss_acc.items()}
        if not all(math.isfinite(v) for v in losses.values()):
            return losses, {}
        try:
            metrics = {k: v for t, a in metric_acc.items()
                       for k, v in self.specs[t].values(a.compute()).items()}  # fmt: skip
        except ValueError as error:
            raise ValueError(f"{self.problem.name}, {split} split: {error}") from None
        return losses, metrics

    def run(self, callback: Callable[[Runner], None] | None = None) -> RunResult:
        """Train the remaining epochs, then evaluate the selected epoch on the test split.

        ``callback(self)`` is called after each epoch's checkpoint (e.g. to stop a run).
        """
        if self.result is not None:
            return self.result
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.config.epochs, initial=self.epoch, desc=self.config.label,
                leave=False, unit="epoch", dynamic_ncols=True,
            )  # fmt: skip
        try:
            while self.status == "running" and self.epoch < self.config.epochs:
                self._one_epoch(bar)
                if callback is not None:
                    callback(self)
        finally:
            if bar is not None:
                bar.close()
        if self.status == "running":
            self.status = "ok"
        self.result = self._finish()
        self._save()
        return self.result

    def _one_epoch(self, bar: Any) -> None:
        record = self.train_epoch()
        val_losses, val_metrics = ({}, {}) if record is None else self.evaluate("val")
        if record is None or not val_metrics:
            self.status, self.diverged_epoch = "diverged", self.epoch + 1
            if self.log is not None:
                self.log(f"{self.config.label}: diverged at epoch {self.epoch + 1}")
            self._save()
            return
        self.epoch += 1
        criterion = self._criterion(val_losses, val_metrics)
        record = {"epoch": self.epoch, **record, "val_loss": val_losses,
                  "val_metric": val_metrics, "criterion": criterion}  # fmt: skip
        self.history.append(record)
        if self.best is None or criterion < self.best["criterion"]:
            self.best = {
                "epoch": self.epoch,
                "criterion": criterion,
                "val_metrics": val_metrics,
                "model": copy.deepcopy(self.model.state_dict()),
            }
        line = (
            f"{self.config.label} seed {self.config.seed} lr {self.config.lr:g} epoch "
            f"{self.epoch}/{self.config.epochs}: train {_mean(record['train_loss']):.4f} "
            f"val {criterion:.4f} (best {self.best['criterion']:.4f} @ {self.best['epoch']}) "
            f"{record['step_ms']:.2f} ms/step"
        )
        if self.log is not None:
            self.log(line)
        if bar is not None:
            bar.set_postfix_str(f"val {criterion:.4f} best@{self.best['epoch']}")
            bar.update(1)
        self._save()

    def _criterion(self, losses: Mapping[str, float], metrics: Mapping[str, float]) -> float:
        """The selection criterion (lower is better): validation Delta m or mean loss."""
        reference = self.config.reference
        if reference is None:
            return _mean(losses)
        return delta_m(metrics, reference, self.directions)

    def _finish(self) -> RunResult:
        test_metrics: dict[str, float] = {}
        test_losses: dict[str, float] = {}
        if self.best is not None:
            # The selected state is evaluated on a copy: the trained state stays as it is.
            final = copy.deepcopy(self.model.state_dict())
            self.model.load_state_dict(self.best["model"])
            test_losses, test_metrics = self.evaluate("test")
            self.model.load_state_dict(final)
        return RunResult(
            config=self.config.to_dict(),
            label=self.config.label,
            tasks=list(self.tasks),
            history=self.history,
            best_epoch=0 if self.best is None else self.best["epoch"],
            val_metrics={} if self.best is None else dict(self.best["val_metrics"]),
            test_metrics=test_metrics,
            test_losses=test_losses,
            step_ms=1e3 * statistics.median(self.step_times) if self.step_times else math.nan,
            status=self.status,
            diverged_epoch=self.diverged_epoch,
            train_seconds=sum(r["train_seconds"] for r in self.history),
            records=[] if self.recorder is None else self.recorder.records(),
        )


def _mean(values: Mapping[str, float]) -> float:
    return sum(values.values()) / len(values)


def train(
    data: Problem | MultiTaskData,
    config: RunConfig,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Train one run (see :class:`Runner`) and return its :class:`RunResult`.

    >>> from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec
    >>> x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    >>> s = Split(x, {"a": x[:, 0]})
    >>> task = TaskSpec("a", "regression", 1, "mae", False)
    >>> data = MultiTaskData("toy", (task,), s, s, s, "", "")
    >>> train(data, RunConfig(epochs=1, model_options={"hidden": 4}), progress=False).label
    'ew'
    """
    runner = Runner(data, config, checkpoint=checkpoint, resume=resume, progress=progress, log=log)
    return runner.run()


def time_steps(
    data: Problem | MultiTaskData,
    configs: Sequence[RunConfig],
    rounds: int = 5,
    steps: int = 10,
) -> dict[str, float]:
    """Median milliseconds per training step of each config, measured INTERLEAVED.

    Every config gets a fresh :class:`Runner` and the same first ``batch_size`` training rows;
    after one warm-up step each, ``rounds`` rounds run ``steps`` steps of every config in turn.
    On a shared machine whose load drifts, all methods thus see the same conditions, which the
    per-run medians of sequential training runs do not guarantee. Returns ``{label: ms}``.

    >>> from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec
    >>> x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    >>> s = Split(x, {"a": x[:, 0], "b": x[:, 1]})
    >>> tasks = tuple(TaskSpec(t, "regression", 1, "mae", False) for t in "ab")
    >>> data = MultiTaskData("toy", tasks, s, s, s, "", "")
    >>> ms = time_steps(data, [RunConfig(model_options={"hidden": 4})], rounds=1, steps=2)
    >>> list(ms), ms["ew"] > 0
    (['ew'], True)
    """
    runners = [Runner(data, c, progress=False) for c in configs]
    times: dict[str, list[float]] = {c.label: [] for c in configs}
    batches = []
    for runner in runners:
        batches.append(runner.first_batch())
        runner.step(batches[-1])  # warm-up: allocations, lazy state
    for _ in range(rounds):
        for runner, batch in zip(runners, batches, strict=True):
            for _ in range(steps):
                began = time.perf_counter()
                runner.step(batch)
                times[runner.config.label].append(time.perf_counter() - began)
    return {label: 1e3 * statistics.median(values) for label, values in times.items()}
