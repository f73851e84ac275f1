"""DeepSpeed ZeRO-1/2: a method's step in place of ``engine.backward(loss)``.

DeepSpeed reduces (and, under ZeRO-2, partitions) gradients from hooks that run at the end of
every backward call through the engine's outputs. A multi-task step makes one call per task
before the final one; left alone, the first per-task call would end DeepSpeed's backward and
reduce gradients that do not exist yet (an ``IndexError`` in ``reduce_ipg_grads``). The step
therefore runs inside DeepSpeed's own backward frame, as ``engine.backward`` does: the per-task
passes and the final backward go through, and DeepSpeed's reduction runs once, after the final
backward, on the method's combined gradient.

What DeepSpeed's options then do to the update: ``gradient_clipping`` clips the combined
gradient in ``engine.step()``, as it would clip the gradient of a summed loss; the reduction
averages over the data-parallel ranks in DeepSpeed's communication dtype (float32 by default,
so a float64 model agrees with one process to about 1e-7, EW included). Refused in one line:
ZeRO-3 (it gathers the partitioned parameters inside the forward and again in each backward,
and the per-task passes do not see them; shard with FSDP2 instead, see the sharded training
page), ZeRO stage 0 (DeepSpeed runs no backward hooks there; plain DDP does the same job), fp16
(DeepSpeed scales the loss in ``engine.backward``, which the step replaces, and ``engine.step()``
would divide the unscaled gradients by that scale; bf16 has no loss scale), and
``gradient_accumulation_steps`` above 1 (DeepSpeed divides the gradients at the engine's outputs
by it, which the method would see in every per-task gradient).

The method's own parameters (IMTL-L's and UW's loss scales, ...) are not the engine's: give
them to a plain optimizer of their own (``method.backward`` averages their gradients over the
ranks).

In the loop, ``backward(engine, method, losses, features=z)`` (or ``shared=`` at parameter
level) takes the place of ``engine.backward(loss)``; ``engine.step()`` follows as usual.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from taskbalance.apply import StepInfo
    from taskbalance.engine.losses import LossesLike
    from taskbalance.methods.base import Method

__all__ = ["backward", "backward_frame", "check_engine"]


def backward(
    engine: Any,
    method: Method,
    losses: LossesLike,
    *,
    shared: nn.Module | Iterable[Tensor] | None = None,
    features: Tensor | Sequence[Tensor] | None = None,
    **options: Any,
) -> StepInfo:
    """``method.backward`` for a DeepSpeed engine: the drop-in for ``engine.backward(loss)``.

    Args:
        engine: the ``deepspeed.DeepSpeedEngine`` the losses were computed through (ZeRO
            stage 1 or 2, ``gradient_accumulation_steps`` 1).
        method: the balancing method.
        losses, shared, features: as in :func:`taskbalance.backward`.
        options: other keyword arguments of ``method.backward`` (``jacobian_mode``,
            ``on_nonfinite``, ``retain_graph``, ``gramian_path``).

    Returns:
        The step's :class:`~taskbalance.StepInfo`.

    Raises:
        ValueError: ZeRO-3 or stage 0, fp16, or gradient accumulation (the message says why and
            what to use instead).
    """
    with backward_frame(engine):
        return method.backward(losses, shared, features, **options)


@contextmanager
def backward_frame(engine: Any) -> Iterator[None]:
    """DeepSpeed's backward frame, as ``engine.backward`` opens it, around a method's step:
    the per-task passes and the final backward run inside, DeepSpeed's reduction once on leaving.

    :func:`backward` is this frame around ``method.backward``; an integration that calls the
    method itself (Lightning's ``MultiTaskMixin``, which applies Lightning's gradient factor)
    opens the frame around that call.

    Raises:
        ValueError: as :func:`backward`, on entering.
    """
    check_engine(engine)
    with engine._running_engine_backward_lock:
        engine._running_engine_backward_count += 1
        engine._running_engine_backward = True
    try:
        yield
    finally:
        with engine._running_engine_backward_lock:
            engine._running_engine_backward_count -= 1
            engine._running_engine_backward = engine._running_engine_backward_count > 0
    engine._backward_epilogue()  # DeepSpeed's reduction, once, on the combined gradient


def check_engine(engine: Any) -> None:
    """Raise, in one line saying what to use instead, for an engine the method's step cannot
    run in: ZeRO-3, ZeRO stage 0, fp16 (DeepSpeed's loss scaling), or
    ``gradient_accumulation_steps`` above 1."""
    stage = engine.zero_optimization_stage()
    if stage == 3:
        raise ValueError(
            "ZeRO-3 gathers its partitioned parameters inside the forward and each backward, "
            "which the per-task passes do not see; shard the model with FSDP2 "
            "(torch.distributed.fsdp.fully_shard) instead"
        )
    if stage == 0:
        raise ValueError(
            "ZeRO stage 0 runs no DeepSpeed backward hooks to hand the step to; use stage 1 or "
            "2, or DistributedDataParallel"
        )
    if engine.fp16_enabled():
        raise ValueError(
            "fp16 scales the loss inside engine.backward, which the method's step replaces, so "
            "engine.step() would divide unscaled gradients by the loss scale; use bf16 or fp32"
        )
    steps = engine.gradient_accumulation_steps()
    if steps != 1:
        raise ValueError(
            f"gradient_accumulation_steps is {steps}: DeepSpeed divides the gradients at the "
            "engine's outputs by it, which the method would see in every per-task gradient; "
            "set it to 1"
        )
