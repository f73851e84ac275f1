"""DWA: dynamic weight average (Liu, Johns and Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019, Eq. 7).

Each task's weight follows the rate at which its loss has recently decreased:

    r_t = Lbar_t(k-1) / Lbar_t(k-2),     w_t(k) = T softmax_t(r / temperature),

where ``Lbar_t(k)`` is task t's average loss over period k. A task whose loss falls more slowly
(a larger ratio) gets a larger weight; the weights sum to T. For the first two periods, when the
ratio is not yet defined, every weight is 1.

What a period is (the paper averages over the iterations of each epoch; offered both ways):

- ``advance="step"`` (default): every call (every ``backward``) is a period of its own, so the
  weights follow the last two steps' losses. Needs nothing from the user, but the ratio of two
  single mini-batch losses is noisy.
- ``advance="epoch"`` (the paper's rule): the calls accumulate the mean loss of the running
  epoch, and the user calls ``method.end_epoch()`` at the end of each epoch; the weights stay
  fixed during an epoch. Without any ``end_epoch()`` call the weights stay 1.

Needs: the losses only (one backward). Memory: 3 T numbers. Hyperparameters: ``temperature``
(the paper's T, default 2). The history lives in buffers, so ``state_dict`` round-trips
mid-run. Requires positive losses: a ratio of losses has no meaning otherwise, and a zero loss
would make the next ratio infinite; such a loss is an error naming the task. The softmax is
computed stably, so a huge ratio gives one weight near T, never an overflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from taskbalance.methods.base import Method
from taskbalance.methods.registry import register


def dwa_weights(previous: Tensor, before_previous: Tensor, temperature: float = 2.0) -> Tensor:
    """DWA weights ``T softmax(r / temperature)``, ``r = previous / before_previous``.

    Args:
        previous: the average losses of the last period, ``(T,)``, positive.
        before_previous: those of the period before, ``(T,)``, positive.
        temperature: the softmax temperature (larger: closer to equal weights).

    >>> dwa_weights(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 1.0]))  # task 1 stalls
    tensor([0.8756, 1.1244])
    """
    ratios = previous / before_previous
    return previous.numel() * torch.softmax(ratios / temperature, dim=0)


@register
class DWA(Method):
    """Dynamic weight average: weights from the ratio of the last two periods' losses.

    Args:
        tasks: the number of tasks or their names (required: DWA keeps a loss history).
        temperature: softmax temperature (the paper's T = 2).
        advance: ``"step"`` (each call is a period) or ``"epoch"`` (periods end at
            :meth:`end_epoch`, the paper's rule).

    Raises:
        InvalidLossError: on a loss <= 0 (the message names the task).

    >>> method = DWA(tasks=2)
    >>> for losses in ([4.0, 4.0], [2.0, 4.0]):  # the first two steps: weights 1
    ...     _ = method.loss_weights(torch.tensor(losses))
    >>> method.loss_weights(torch.tensor([1.0, 4.0]))[0]  # ratios 0.5 and 1
    tensor([0.8756, 1.1244])
    """

    name = "dwa"
    paper = "Liu et al., End-to-End Multi-Task Learning with Attention, CVPR 2019"
    stateful = True

    history: Tensor
    periods: Tensor
    running_sum: Tensor
    running_count: Tensor

    def __init__(
        self,
        tasks: int | Sequence[str] | None = None,
        temperature: float = 2.0,
        advance: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__(tasks=tasks)
        assert self.num_tasks is not None
        if not temperature > 0:
            raise ValueError(f"DWA: temperature must be > 0, got {temperature}")
        if advance not in ("step", "epoch"):
            raise ValueError(f"DWA: advance must be 'step' or 'epoch', got {advance!r}")
        self.temperature = float(temperature)
        self.advance = advance
        # history[0] = the last completed period's mean losses, history[1] = the one before.
        # float64: the epoch sums of many steps must not lose the small differences DWA reads.
        self.register_buffer("history", torch.ones(2, self.num_tasks, dtype=torch.float64))
        self.register_buffer("periods", torch.zeros((), dtype=torch.long))
        self.register_buffer("running_sum", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("running_count", torch.zeros((), dtype=torch.long))

    @property
    def weights(self) -> Tensor:
        """The weights the next call will use (ones until two periods are complete)."""
        # Both sides computed and chosen on the tensors' device: no counter read back.
        ones = torch.ones_like(self.history[0])
        ready = dwa_weights(self.history[0], self.history[1], self.temperature)
        return torch.where(self.periods < 2, ones, ready)

    def loss_weights(self, losses: Tensor) -> tuple[Tensor, Tensor | None]:
        """The weights from the history so far; then this call's losses join the history."""
        self.require_positive(losses, "DWA divides by the previous losses")
        weights = self.weights.to(device=losses.device, dtype=losses.dtype)
        values = losses.detach().to(self.running_sum.device, torch.float64)
        if self.advance == "step":
            self._push(values)
        else:
            self.running_sum += values
            self.running_count += 1
        return weights, None

    def end_epoch(self) -> None:
        """Close the running epoch: its mean losses become the newest period of the history.

        Only for ``advance="epoch"``. An epoch without any call records nothing.
        """
        if self.advance != "epoch":
            raise RuntimeError(
                "DWA.end_epoch() is for advance='epoch'; with advance='step' every call "
                "already advances the history"
            )
        if int(self.running_count) == 0:
            return
        self._push(self.running_sum / self.running_count)
        self.running_sum.zero_()
        self.running_count.zero_()

    def _push(self, mean_losses: Tensor) -> None:
        self.history[1] = self.history[0]
        self.history[0] = mean_losses
        self.periods += 1

    def extra_repr(self) -> str:
        return ", ".join(
            filter(
                None,
                [
                    super().extra_repr(),
                    f"temperature={self.temperature}",
                    f"advance={self.advance!r}",
                ],
            )
        )
