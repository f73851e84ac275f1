"""RLW: random loss weighting (Lin et al., "Reasonable Effectiveness of Random Weighting: A
Litmus Test for Multi-Task Learning", TMLR 2022).

At every step the loss weights are drawn afresh:

    w = softmax(eps),   eps ~ N(0, I_T)       (the paper's default, ``distribution="normal"``),

so the weights lie on the simplex (positive, summing to 1). The other option offered is
``distribution="dirichlet"``: ``w ~ Dirichlet(1, ..., 1)``, the uniform distribution on the
simplex. The paper also studies uniform, Bernoulli and constrained-Bernoulli draws; they are not
offered here.

Scale: the weights sum to 1, as in the paper, so compare RLW with ``EW(reduction="mean")``; next
to ``EW()`` (a plain sum) its effective learning rate is 1/T.

Reproducibility: the draws come from the method's own ``torch.Generator`` on the CPU, in float64,
then are cast to the losses' dtype and device. The same ``seed`` therefore gives the same
weights on every device and on every rank under DDP, which keeps the ranks' updates identical
without any communication. The generator's state is saved in ``state_dict`` so a resumed run
draws what the uninterrupted run would have drawn.

Needs: the losses only (one backward). Cost: T random numbers per step. Hyperparameters:
``distribution``, ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from taskbalance.methods.base import Method
from taskbalance.methods.registry import register

Distribution = Literal["normal", "dirichlet"]


def rlw_weights(
    num_tasks: int, generator: torch.Generator, distribution: Distribution = "normal"
) -> Tensor:
    """One draw of RLW weights (float64, CPU), on the simplex.

    >>> w = rlw_weights(3, torch.Generator().manual_seed(0))
    >>> bool((w > 0).all()), round(float(w.sum()), 12)
    (True, 1.0)
    """
    if distribution == "normal":
        return torch.softmax(torch.randn(num_tasks, generator=generator, dtype=torch.float64), 0)
    if distribution == "dirichlet":
        # Dirichlet(1) = normalised i.i.d. Exp(1) draws (drawn from our generator: the
        # torch.distributions sampler takes none). -log(U) with U in (0, 1] is Exp(1).
        uniform = 1 - torch.rand(num_tasks, generator=generator, dtype=torch.float64)
        exponential = -torch.log(uniform)
        total = exponential.sum()
        if total == 0:  # every draw exactly 1: probability ~0, but never divide by zero
            return torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        return exponential / total
    raise ValueError(f"RLW: distribution must be 'normal' or 'dirichlet', got {distribution!r}")


@register
class RLW(Method):
    """Random loss weighting: fresh weights on the simplex at every step.

    Args:
        tasks: optional task count or names.
        distribution: ``"normal"`` (softmax of a standard normal, the paper's default) or
            ``"dirichlet"`` (uniform on the simplex).
        seed: seeds the method's own generator. ``None`` draws a seed from torch's global
            generator at construction, so ``torch.manual_seed`` still makes runs reproducible;
            under DDP pass the same explicit seed on every rank.

    >>> a, b = RLW(seed=3), RLW(seed=3)
    >>> losses = torch.ones(4)
    >>> torch.equal(a.loss_weights(losses)[0], b.loss_weights(losses)[0])
    True
    """

    name = "rlw"
    paper = (
        "Lin et al., Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task "
        "Learning, TMLR 2022"
    )

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        distribution: Distribution = "normal",
        seed: int | None = None,
    ) -> None:
        super().__init__(tasks=tasks)
        if distribution not in ("normal", "dirichlet"):
            raise ValueError(
                f"RLW: distribution must be 'normal' or 'dirichlet', got {distribution!r}"
            )
        self.distribution: Distribution = distribution
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.long))
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def loss_weights(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        """A fresh draw; see :func:`rlw_weights`."""
        weights = rlw_weights(losses.numel(), self.generator, self.distribution)
        return weights.to(device=losses.device, dtype=losses.dtype), None

    def get_extra_state(self) -> dict[str, Any]:
        """The tasks and the generator's state (so a resumed run continues the same draws)."""
        return {**super().get_extra_state(), "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.generator.set_state(state["generator"])

    def extra_repr(self) -> str:
        return ", ".join(
            filter(None, [super().extra_repr(), f"distribution={self.distribution!r}"])
        )
