"""STCH: smooth Tchebycheff scalarisation (Lin et al., "Smooth Tchebycheff Scalarization for
Multi-Objective Optimization", ICML 2024).

The Tchebycheff scalarisation ``max_t lambda_t (L_t - z_t)`` (z: the ideal point) is smoothed
by a log-sum-exp with smoothing ``mu``:

    g_mu = mu log sum_t exp(lambda_t (L_t - z_t) / mu),

whose gradient is a weighted sum of the task gradients,

    grad g_mu = sum_t w_t grad L_t,    w_t = lambda_t softmax_t(lambda (L - z) / mu),

so STCH is a loss-level method with these detached weights. As ``mu -> 0`` all the weight goes
to the task furthest from its ideal value (Tchebycheff); as ``mu -> inf`` the weights tend to
``lambda / T`` (linear scalarisation). With the default preference ``lambda = 1`` the weights
sum to 1.

Ideal point and normalisation (the paper estimates the points it needs during a warm-up; here
simple documented rules, to choose):

- ``ideal="zero"`` (default): ``z_t = 0``, the exact ideal point of a non-negative loss (MSE,
  cross-entropy). ``ideal="min"``: the running minimum of every loss seen so far (state).
  Or a sequence of T floats, fixed.
- ``warmup_steps=W > 0``: the first W calls use the linear scalarisation (weights
  ``lambda / T``) and record each task's mean loss ``N_t`` (a nadir estimate); afterwards the
  gaps are normalised, ``(L_t - z_t) / (N_t - z_t)``, so tasks with different loss scales
  compete on equal terms (the weight then also carries the factor ``1 / (N_t - z_t)`` of the
  chain rule). A non-positive ``N_t - z_t`` falls back to 1 for that task. ``W = 0`` (default):
  no normalisation, the raw gaps are compared, so choose ``mu`` on the scale of the losses.

Needs: the losses only (one backward). Cost: O(T). Hyperparameters: ``mu`` (default 1.0, our
choice: the paper treats it as a tuned hyperparameter), ``ideal``, ``warmup_steps``,
``preference``. The state (running minimum, warm-up sums) lives in buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from taskbalance.methods.base import Method
from taskbalance.methods.registry import register


def stch_weights(
    losses: Tensor,
    ideal: Tensor,
    mu: float,
    preference: Tensor | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """Smooth-Tchebycheff loss weights, the gradient of ``mu logsumexp(lambda (L - z) / (mu s))``.

    Args:
        losses: the task losses ``L``, ``(T,)``.
        ideal: the ideal point ``z``, ``(T,)``.
        mu: the smoothing, > 0.
        preference: ``lambda`` (ones if ``None``).
        scale: the normalisation ``s`` of the gaps (ones if ``None``), positive.

    >>> stch_weights(torch.tensor([1.0, 2.0]), torch.zeros(2), mu=1.0)  # softmax([1, 2])
    tensor([0.2689, 0.7311])
    """
    lam = torch.ones_like(losses) if preference is None else preference
    scl = torch.ones_like(losses) if scale is None else scale
    return lam * torch.softmax(lam * (losses - ideal) / (mu * scl), dim=0) / scl


@register
class STCH(Method):
    """Smooth Tchebycheff scalarisation of the task losses.

    Args:
        tasks: the number of tasks or their names (required: the ideal point and warm-up are
            per-task state).
        mu: smoothing (> 0); small: close to the max, large: close to the mean.
        ideal: ``"zero"``, ``"min"`` (running minimum) or T fixed floats.
        warmup_steps: calls of linear scalarisation that estimate the normalisation (0: none).
        preference: the preference vector ``lambda`` (T positive floats; ones if ``None``).

    >>> STCH(tasks=2, mu=0.5).loss_weights(torch.tensor([1.0, 1.5]))[0]  # softmax([2, 3])
    tensor([0.2689, 0.7311])
    """

    name = "stch"
    paper = (
        "Lin et al., Smooth Tchebycheff Scalarization for Multi-Objective Optimization, ICML 2024"
    )
    stateful = True

    ideal_point: Tensor
    warmup_sum: Tensor
    calls: Tensor

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        mu: float = 1.0,
        ideal: Literal["zero", "min"] | Sequence[float] = "zero",
        warmup_steps: int = 0,
        preference: Sequence[float] | None = None,
    ) -> None:
        super().__init__(tasks=tasks)
        num_tasks = self.num_tasks
        assert num_tasks is not None
        if not mu > 0:
            raise ValueError(f"STCH: mu must be > 0, got {mu}")
        if warmup_steps < 0:
            raise ValueError(f"STCH: warmup_steps must be >= 0, got {warmup_steps}")
        self.mu = float(mu)
        self.warmup_steps = int(warmup_steps)
        if isinstance(ideal, str):
            if ideal not in ("zero", "min"):
                raise ValueError(f"STCH: ideal must be 'zero', 'min' or T floats, got {ideal!r}")
            self.ideal_rule = ideal
            start = (
                torch.zeros(num_tasks) if ideal == "zero" else torch.full((num_tasks,), torch.inf)
            )
        else:
            start = torch.as_tensor(list(ideal), dtype=torch.float64).flatten()
            if start.numel() != num_tasks or not torch.isfinite(start).all():
                raise ValueError(f"STCH: ideal must hold {num_tasks} finite floats, got {ideal}")
            self.ideal_rule = "fixed"
        lam = torch.ones(num_tasks) if preference is None else torch.as_tensor(list(preference))
        if lam.numel() != num_tasks or not (lam > 0).all() or not torch.isfinite(lam).all():
            raise ValueError(
                f"STCH: preference must hold {num_tasks} positive floats, got {preference}"
            )
        self.register_buffer("preference", lam.to(torch.float64))
        self.register_buffer("ideal_point", start.to(torch.float64))
        self.register_buffer("warmup_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def loss_weights(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        """Linear weights during the warm-up, then :func:`stch_weights`."""
        values = losses.detach().to(self.ideal_point.device, torch.float64)
        if self.ideal_rule == "min":
            torch.minimum(self.ideal_point, values, out=self.ideal_point)
        self.calls += 1
        # Both sides computed and chosen on the tensors' device: no counter read back.
        warming = self.calls <= self.warmup_steps
        self.warmup_sum += torch.where(warming, values, 0.0)
        linear = self.preference / values.numel()
        if self.warmup_steps > 0:
            scale = self._scale()
            # Until the warm-up ends its sum is partial: a provisional scale keeps the unused
            # branch finite.
            scale = torch.where(warming, torch.ones_like(scale), scale)
        else:
            scale = None
        tchebycheff = stch_weights(values, self.ideal_point, self.mu, self.preference, scale)
        weights = torch.where(warming, linear, tchebycheff)
        return weights.to(device=losses.device, dtype=losses.dtype), None

    def _scale(self) -> Tensor | None:
        if self.warmup_steps == 0:
            return None
        gap = self.warmup_sum / self.warmup_steps - self.ideal_point
        # A task whose warm-up mean is not above its ideal value has no scale to measure.
        return torch.where(gap > 0, gap, torch.ones_like(gap))

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"mu={self.mu}", f"ideal={self.ideal_rule!r}"]
        if self.warmup_steps:
            parts.append(f"warmup_steps={self.warmup_steps}")
        return ", ".join(filter(None, parts))
