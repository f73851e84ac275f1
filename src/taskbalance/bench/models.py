"""Benchmark models: hard parameter sharing (LeNet trunk or MLP shared bottom), MMoE and PLE.

Every model is a :class:`MultiTaskModel`, which fits the model contract of
:class:`taskbalance.bench.problem.Problem`: a shared ``trunk`` (all shared parameters, and
nothing else), one entry of ``heads`` per task, and

* ``forward(inputs) -> (z, {task: output})``, ``inputs`` being ``x`` or ``(x, x_cat)``;
* ``trunk_forward(x, x_cat) -> z``: the shared representation the heads read;
* ``heads[task](z) -> output``: logits ``(B, C)`` for multiclass tasks, ``(B,)`` for binary
  (a logit) and regression tasks;
* ``shared_parameters()``: the trunk's parameters (the ``shared=`` argument of
  :meth:`taskbalance.Method.backward` at parameter level);
* ``features(z)``: the tensors of ``z`` that depend on shared parameters (the ``features=``
  argument at feature level).

Architectures (``ARCHITECTURES``):

* ``"hps"``, hard parameter sharing. Images (``x`` of shape ``(N, 1, 28, 28)``): the LeNet trunk
  of Sener & Koltun (NeurIPS 2018, MultiMNIST): conv 1->10 (5x5), max-pool 2, ReLU, conv 10->20
  (5x5), max-pool 2, ReLU, linear 320->50, ReLU; heads linear 50->50, ReLU, linear 50->C.
  Tabular data: an MLP shared bottom (``layers`` x [linear, ReLU] of width ``hidden``) on the
  dense inputs concatenated with embeddings of ``x_cat`` (if any); heads linear ->``tower``,
  ReLU, linear -> outputs. ``z`` is the last hidden layer, shape ``(B, hidden)``.
* ``"mmoe"`` (Ma et al., KDD 2018): ``experts`` shared MLP experts; per task a softmax gate on
  the (embedded) input and a tower. The gates are task-specific, so they belong to the heads.
* ``"ple"`` (Tang et al., RecSys 2020), one extraction layer (CGC): ``experts`` shared experts
  plus ``experts`` task-specific experts per task; per task a gate over its own and the shared
  experts, and a tower. Only one level: a second level has a shared gate reading every task's
  experts, which would break the trunk / heads split. Task experts belong to the heads.

What "features" means for MMoE and PLE (a choice; the papers are silent): the heads read two
shared tensors, the embedded input ``u`` (B, D) that the gates and task experts read, and the
shared experts' outputs ``E`` (B, experts, expert_hidden). ``z = (u, E)`` is their tuple;
``features(z)`` drops ``u`` when it depends on no shared parameter (no categorical embeddings).
A feature-level method then balances the gradients arriving at both, whose union is the only path
from the shared parameters to the losses, so the engine's requirement holds.

Single-task baselines are built with ``tasks=(name,)``: the same architecture, one head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from taskbalance.bench.data.types import MultiTaskData, TaskSpec

Architecture = Literal["hps", "mmoe", "ple"]
#: The architecture names :func:`build_model` accepts.
ARCHITECTURES: tuple[str, ...] = ("hps", "mmoe", "ple")

Representation = Tensor | tuple[Tensor, ...]


class MultiTaskModel(nn.Module):
    """A shared ``trunk`` and one head per task (``heads``, an ``nn.ModuleDict``).

    Subclasses implement :meth:`trunk_forward`. ``trunk`` must hold every shared parameter and
    no task-specific one, so that ``shared_parameters()`` is exactly the shared part.
    """

    trunk: nn.Module
    heads: nn.ModuleDict

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.task_names: tuple[str, ...] = tuple(t.name for t in tasks)

    def trunk_forward(self, x: Tensor, x_cat: Tensor | None = None) -> Representation:
        """The shared representation ``z`` the heads read."""
        raise NotImplementedError

    def forward(
        self, inputs: Tensor | tuple[Tensor, Tensor | None]
    ) -> tuple[Representation, dict[str, Tensor]]:
        """``(z, {task: output})`` for ``inputs`` = ``x`` or ``(x, x_cat)``."""
        x, x_cat = inputs if isinstance(inputs, tuple) else (inputs, None)
        z = self.trunk_forward(x, x_cat)
        return z, {t: self.heads[t](z) for t in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared parameters (the trunk's)."""
        return list(self.trunk.parameters())

    @staticmethod
    def features(z: Representation) -> Tensor | tuple[Tensor, ...]:
        """The parts of ``z`` that depend on shared parameters (for feature-level methods)."""
        if isinstance(z, Tensor):
            return z
        return tuple(part for part in z if part.requires_grad)


class _Head(nn.Module):
    """Linear -> ReLU -> linear; squeezes a single output to shape ``(B,)``."""

    def __init__(self, dim_in: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, outputs))
        self.outputs = outputs

    def forward(self, z: Tensor) -> Tensor:
        out = self.net(z)
        return out.squeeze(-1) if self.outputs == 1 else out


class TabularInput(nn.Module):
    """Dense inputs concatenated with one embedding per categorical column.

    Args:
        dense: number of dense input columns.
        cardinalities: the number of categories of each ``x_cat`` column, in order.
        embedding: embedding width (``min(embedding, cardinality)`` per column).
    """

    def __init__(self, dense: int, cardinalities: Sequence[int] = (), embedding: int = 8):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(c, min(embedding, c)) for c in cardinalities)
        self.dim = dense + sum(e.embedding_dim for e in self.embeddings)

    def forward(self, x: Tensor, x_cat: Tensor | None) -> Tensor:
        if not self.embeddings:
            return x
        if x_cat is None:
            raise ValueError(f"this model embeds {len(self.embeddings)} categorical columns; "
                             "pass x_cat")  # fmt: skip
        parts = [x, *(e(x_cat[:, j]) for j, e in enumerate(self.embeddings))]
        return torch.cat(parts, dim=1)


def _mlp(dim_in: int, hidden: int, layers: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for i in range(layers):
        blocks += [nn.Linear(dim_in if i == 0 else hidden, hidden), nn.ReLU()]
    return nn.Sequential(*blocks)


class LeNetHPS(MultiTaskModel):
    """Hard parameter sharing with Sener & Koltun's MultiMNIST LeNet (see the module docstring).

    >>> from taskbalance.bench.data.types import TaskSpec
    >>> tasks = [TaskSpec(t, "multiclass", 10, "accuracy", True) for t in ("left", "right")]
    >>> model = LeNetHPS(tasks)
    >>> z, out = model(torch.zeros(2, 1, 28, 28))
    >>> out["left"].shape, z.shape
    (torch.Size([2, 10]), torch.Size([2, 50]))
    """

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__(tasks)
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 10, 5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(), nn.Linear(320, 50), nn.ReLU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({t.name: _Head(50, 50, t.num_outputs) for t in tasks})

    def trunk_forward(self, x: Tensor, x_cat: Tensor | None = None) -> Tensor:
        """``z`` of shape ``(B, 50)``."""
        return self.trunk(x)


class MLPSharedBottom(MultiTaskModel):
    """An MLP shared bottom (with categorical embeddings) and an MLP tower per task.

    Args:
        tasks: the tasks (one head each).
        dense: number of dense input columns.
        cardinalities: categories per ``x_cat`` column (empty: no embeddings).
        hidden, layers: the shared bottom's width and depth.
        tower: the heads' hidden width.
        embedding: embedding width.

    >>> from taskbalance.bench.data.types import TaskSpec
    >>> model = MLPSharedBottom([TaskSpec("y", "regression", 1, "mae", False)], dense=3)
    >>> model(torch.zeros(4, 3))[1]["y"].shape
    torch.Size([4])
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        dense: int,
        cardinalities: Sequence[int] = (),
        hidden: int = 256,
        layers: int = 2,
        tower: int = 64,
        embedding: int = 8,
    ) -> None:
        super().__init__(tasks)
        inputs = TabularInput(dense, cardinalities, embedding)
        self.trunk = nn.ModuleDict({"input": inputs, "mlp": _mlp(inputs.dim, hidden, layers)})
        self.heads = nn.ModuleDict({t.name: _Head(hidden, tower, t.num_outputs) for t in tasks})

    def trunk_forward(self, x: Tensor, x_cat: Tensor | None = None) -> Tensor:
        """``z`` of shape ``(B, hidden)``."""
        return self.trunk["mlp"](self.trunk["input"](x, x_cat))


class _Experts(nn.Module):
    """``n`` MLP experts (two layers each) applied to the same input; output ``(B, n, hidden)``."""

    def __init__(self, dim_in: int, n: int, hidden: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(_mlp(dim_in, hidden, 2) for _ in range(n))

    def forward(self, u: Tensor) -> Tensor:
        return torch.stack([e(u) for e in self.experts], dim=1)


class _GatedHead(nn.Module):
    """A softmax gate on ``u`` over the shared experts (and optional own experts), then a tower.

    Reads ``z = (u, shared_experts)``.
    """

    def __init__(self, spec: TaskSpec, dim_in: int, shared: int, own: int, hidden: int, tower: int):
        super().__init__()
        self.own = _Experts(dim_in, own, hidden) if own else None
        self.gate = nn.Linear(dim_in, shared + own)
        self.tower = _Head(hidden, tower, spec.num_outputs)

    def forward(self, z: tuple[Tensor, Tensor]) -> Tensor:
        u, experts = z
        if self.own is not None:
            experts = torch.cat([self.own(u), experts], dim=1)
        gate = torch.softmax(self.gate(u), dim=-1)
        return self.tower((gate.unsqueeze(-1) * experts).sum(dim=1))


class MMoE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018); ``z = (u, experts)``, see the module
    docstring.

    Args:
        tasks, dense, cardinalities, embedding: as :class:`MLPSharedBottom`.
        experts: number of shared experts; hidden: each expert's width; tower: towers' width.
        own_experts: task-specific experts per task (0 for MMoE; PLE passes > 0).

    >>> from taskbalance.bench.data.types import TaskSpec
    >>> tasks = [TaskSpec(t, "binary", 1, "auc", True) for t in "ab"]
    >>> model = MMoE(tasks, dense=5, cardinalities=[3])
    >>> u, e = model.trunk_forward(torch.zeros(2, 5), torch.zeros(2, 1, dtype=torch.long))
    >>> e.shape, len(model.features((u, e)))  # u carries the shared embeddings
    (torch.Size([2, 4, 64]), 2)
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        dense: int,
        cardinalities: Sequence[int] = (),
        experts: int = 4,
        hidden: int = 64,
        tower: int = 32,
        embedding: int = 8,
        own_experts: int = 0,
    ) -> None:
        super().__init__(tasks)
        inputs = TabularInput(dense, cardinalities, embedding)
        self.trunk = nn.ModuleDict(
            {"input": inputs, "experts": _Experts(inputs.dim, experts, hidden)}
        )
        self.heads = nn.ModuleDict(
            {t.name: _GatedHead(t, inputs.dim, experts, own_experts, hidden, tower) for t in tasks}
        )

    def trunk_forward(self, x: Tensor, x_cat: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(u, E)``: the embedded input ``(B, D)`` and the shared experts ``(B, n, hidden)``."""
        u = self.trunk["input"](x, x_cat)
        return u, self.trunk["experts"](u)


class PLE(MMoE):
    """Progressive Layered Extraction with one extraction layer (CGC; Tang et al., RecSys 2020):
    ``experts`` shared experts and ``experts`` own experts per task.

    >>> from taskbalance.bench.data.types import TaskSpec
    >>> tasks = [TaskSpec(t, "binary", 1, "auc", True) for t in "ab"]
    >>> PLE(tasks, dense=5)(torch.zeros(3, 5))[1]["a"].shape
    torch.Size([3])
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        dense: int,
        cardinalities: Sequence[int] = (),
        experts: int = 2,
        hidden: int = 64,
        tower: int = 32,
        embedding: int = 8,
    ) -> None:
        super().__init__(tasks, dense, cardinalities, experts, hidden, tower, embedding, experts)


def build_model(
    arch: str,
    data: MultiTaskData,
    tasks: Sequence[str] | None = None,
    options: Mapping[str, int] | None = None,
) -> MultiTaskModel:
    """The model ``arch`` (one of ``ARCHITECTURES``) for ``data``, with a head per task of
    ``tasks`` (all tasks by default; one task for a single-task baseline).

    ``options`` go to the model's constructor (e.g. ``hidden``, ``layers``, ``experts``); the
    LeNet takes none. Raises ``ValueError`` for an unknown architecture (listing the valid ones),
    for MMoE / PLE on images, or for an unknown task.

    >>> from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec
    >>> s = Split(torch.zeros(4, 3), {"y": torch.zeros(4)})
    >>> d = MultiTaskData("toy", (TaskSpec("y", "regression", 1, "mae", False),), s, s, s, "", "")
    >>> type(build_model("hps", d, options={"hidden": 8})).__name__
    'MLPSharedBottom'
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    names = data.task_names if tasks is None else tuple(tasks)
    specs = [data.task(n) for n in names]
    options = dict(options or {})
    x = data.train.x
    if x.dim() == 4:
        if arch != "hps":
            raise ValueError(f"{arch!r} is for tabular data; {data.name} has images: use 'hps'")
        if options:
            raise ValueError(f"the LeNet trunk takes no options, got {sorted(options)}")
        return LeNetHPS(specs)
    if x.dim() != 2:
        raise ValueError(f"inputs of shape {tuple(x.shape)} are neither images nor tabular")
    cards = list(data.cat_cardinalities.values()) if data.train.x_cat is not None else []
    cls = {"hps": MLPSharedBottom, "mmoe": MMoE, "ple": PLE}[arch]
    try:
        return cls(specs, x.shape[1], cards, **options)
    except TypeError as error:
        raise ValueError(f"bad model option for {arch!r}: {error}") from None
