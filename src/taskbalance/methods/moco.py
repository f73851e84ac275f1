"""MoCo: multi-objective gradient correction (Fernando et al., "Mitigating Gradient Bias in
Multi-objective Learning: A Provably Convergent Approach", ICLR 2023, Algorithm 1).

Stochastic MGDA-type updates are biased because the weights are computed from the same noisy
gradients they weight. MoCo tracks each task's gradient with a moving average ``Y`` (T x n)
and moves the weights by a projected gradient step on MGDA's objective instead of solving it:

    Y <- Y - beta_k (Y - G)                                 (tracked gradients)
    l <- Proj_simplex(l - gamma_k (Y Y^T + rho I) l)        (weights)
    update = Y^T l,

with decaying steps ``beta_k = beta / k^beta_sigma`` and ``gamma_k = gamma / k^gamma_sigma``
(k = 1, 2, ...). Needs: the Jacobian (``Y`` mixes gradients of different steps, so no Gramian
shortcut exists) and a T x n state: T copies of the shared parameters at parameter level.
The weight step needs ``Y Y^T`` only through ``(Y Y^T) l = Y (Y^T l)``: beyond four tasks it is
two matrix-vector products, not the T x T Gramian. Cost: per-task gradients + O(T n) (the
tracking step and three matrix-vector products over T x n).

Choices: ``Y`` starts at the first step's Jacobian (no bias towards zero); ``l`` starts at
1/T; the paper's projection of ``Y`` onto a bounded set (a theoretical device) is omitted;
``normalize=True`` replaces each ``g_t`` by ``L_t g_t / ||g_t||`` before tracking (a heuristic
of LibMTL's implementation, off by default). Defaults ``beta = 0.5``, ``beta_sigma = 0.5``,
``gamma = 0.1``, ``gamma_sigma = 0.5``, ``rho = 0`` follow LibMTL's MoCo as we know it; the
paper tunes them per benchmark. Default level: ``"parameter"`` (the paper's setting); at
feature level the batch size must stay fixed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from taskbalance.engine.requirement import Level, Requirement
from taskbalance.methods._coordinate_state import CoordinateState
from taskbalance.methods._simplex import project_simplex
from taskbalance.methods.base import Method
from taskbalance.methods.registry import register

_GRAMIAN_MAX_TASKS = 4
"""Up to this many tasks the weight step multiplies by the T x T Gramian ``Y Y^T``; beyond, by
``Y`` and ``Y^T`` (see :func:`moco_step`)."""


def moco_step(
    tracked: Tensor,
    weights: Tensor,
    jacobian: Tensor,
    beta: float,
    gamma: float,
    rho: float = 0.0,
    in_place: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One MoCo step with the given step sizes: ``(new tracked Y, new weights, update)``.

    ``in_place``: update ``tracked`` itself (one pass over the T x n state, no temporary).

    >>> y, l, d = moco_step(torch.eye(2), torch.tensor([0.5, 0.5]), torch.eye(2), 0.5, 0.1)
    >>> l, d
    (tensor([0.5000, 0.5000], dtype=torch.float64), tensor([0.5000, 0.5000]))
    """
    # Y - beta (Y - G) = Y + beta (G - Y): a lerp.
    tracked = tracked.lerp_(jacobian, beta) if in_place else tracked.lerp(jacobian, beta)
    # The gradient of MGDA's objective l^T (Y Y^T + rho I) l / 2 is Y (Y^T l) + rho l. Past a
    # few tasks it is two matrix-vector products, i.e. two memory-bound passes over Y, not the
    # Gramian's T^2 n multiply-adds (on CPU at T = 32 the Gramian alone outweighed the rest of
    # the method; the two cost the same near T = 5: benchmarks/step_time.py's mlp). The T x n
    # work stays in the state's dtype; the T-vectors of the weight step are float64.
    weights = weights.to(torch.float64)
    if tracked.shape[0] <= _GRAMIAN_MAX_TASKS:
        objective_gradient = (tracked @ tracked.T).to(torch.float64) @ weights
    else:
        objective_gradient = (tracked @ (weights.to(tracked) @ tracked)).to(torch.float64)
    if rho:
        objective_gradient = objective_gradient + rho * weights
    weights = project_simplex(weights - gamma * objective_gradient)
    return tracked, weights, weights.to(tracked) @ tracked


@register
class MoCo(CoordinateState, Method):
    """MoCo: MGDA weights by projected gradient steps on tracked task gradients.

    Args:
        tasks: the number of tasks or their names (required).
        level: ``"parameter"`` (default) or ``"feature"`` (fixed batch size only).
        beta, beta_sigma: tracking step ``beta / k^beta_sigma`` (defaults 0.5, 0.5).
        gamma, gamma_sigma: weight step ``gamma / k^gamma_sigma`` (defaults 0.1, 0.5).
        rho: ridge on ``Y Y^T`` (default 0).
        normalize: track ``L_t g_t / ||g_t||`` instead of ``g_t`` (default False).

    >>> MoCo(tasks=2).aggregate(torch.ones(2), torch.eye(2))
    tensor([0.5000, 0.5000])
    """

    name = "moco"
    paper = "Fernando et al., Mitigating Gradient Bias in Multi-objective Learning, ICLR 2023"
    requires = Requirement.JACOBIAN
    levels = ("feature", "parameter")
    default_level = "parameter"
    stateful = True
    coordinate_buffer = "tracked"

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        level: Level | None = None,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        normalize: bool = False,
    ) -> None:
        super().__init__(tasks=tasks, level=level)
        if not 0 < beta <= 1 or gamma <= 0 or rho < 0 or beta_sigma < 0 or gamma_sigma < 0:
            raise ValueError(
                "MoCo needs 0 < beta <= 1, gamma > 0, rho >= 0 and non-negative decay exponents"
            )
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma = float(gamma), float(gamma_sigma)
        self.rho, self.normalize = float(rho), bool(normalize)
        num = self.num_tasks
        assert num is not None
        self.register_buffer("weights", torch.full((num,), 1.0 / num, dtype=torch.float64))
        self.register_buffer("tracked", torch.zeros(num, 0, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def aggregate(self, losses: Tensor, jacobian: Tensor) -> Tensor:
        """One MoCo step (see :func:`moco_step`); returns the update ``Y^T l``."""
        g = jacobian.detach()
        if self.normalize:
            norms = g.norm(dim=1, keepdim=True)
            scale = losses.detach().to(g)[:, None] / norms.clamp_min(1e-300)
            g = torch.where(norms > 0, g * scale, 0.0)
        tracked = self.coordinate_state(g, lambda g: g.clone())
        g = g.to(tracked)  # a no-op unless the state was given another dtype (e.g. .double())
        self.step += 1
        k = float(self.step)
        _, weights, update = moco_step(
            tracked,
            self.weights,
            g,
            self.beta / k**self.beta_sigma,
            self.gamma / k**self.gamma_sigma,
            self.rho,
            in_place=True,
        )
        self.weights.copy_(weights)
        return update.to(jacobian.dtype)

    def extra_repr(self) -> str:
        return ", ".join(
            filter(
                None,
                [
                    super().extra_repr(),
                    f"beta={self.beta}",
                    f"gamma={self.gamma}",
                    f"rho={self.rho}",
                ],
            )
        )
