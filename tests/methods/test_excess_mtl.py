"""ExcessMTL: a hand-computed two-step example, warm-up, state round-trip, and torchjd."""

from __future__ import annotations

import math

import pytest
import torch

from support.samplers import GENERIC_SAMPLERS, random_jacobian
from taskbalance.methods import excess_mtl
from taskbalance.methods.excess_mtl import ExcessMTL


def test_two_steps_by_hand():
    method = ExcessMTL(tasks=2, robust_step_size=0.5)
    first = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    # Step 1: S = g^2, e = sum g^2 / sqrt(g^2 + 1e-7) ~ |g| -> e = [1, 2], the baseline.
    update = method.aggregate(torch.ones(2), first)
    e1 = torch.tensor([1 / math.sqrt(1 + 1e-7), 4 / math.sqrt(4 + 1e-7)], dtype=torch.float64)
    w1 = torch.softmax(torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64)) + 0.5 * e1, 0)
    torch.testing.assert_close(update, w1 @ first)
    # Step 2: S = 2 g^2, e = g^2 / sqrt(2 g^2 + eps), divided by the baseline e1.
    update = method.aggregate(torch.ones(2), first)
    e2 = torch.tensor([1 / math.sqrt(2 + 1e-7), 4 / math.sqrt(8 + 1e-7)], dtype=torch.float64)
    w2 = torch.softmax(torch.log(w1) + 0.5 * e2 / (e1 + 1e-7), 0)
    torch.testing.assert_close(method.weights, w2)
    torch.testing.assert_close(update, w2 @ first)


def test_warmup_keeps_uniform_weights():
    method = ExcessMTL(tasks=3, warmup_steps=2)
    for step in range(2):
        jacobian = GENERIC_SAMPLERS[0](3, 10, seed=step)
        torch.testing.assert_close(method.aggregate(torch.ones(3), jacobian), jacobian.mean(0))
    # After the warm-up a task whose gradients grow gets more weight.
    jacobian = GENERIC_SAMPLERS[0](3, 10, seed=2) * torch.tensor([[1.0], [1.0], [10.0]])
    method.aggregate(torch.ones(3), jacobian)
    assert method.weights.argmax() == 2


def test_state_dict_round_trip_including_the_accumulator():
    method = ExcessMTL(tasks=3)
    jacobians = [GENERIC_SAMPLERS[1](3, 10, seed=s) for s in range(4)]
    for jacobian in jacobians[:2]:
        method.aggregate(torch.ones(3), jacobian)
    restored = ExcessMTL(tasks=3)
    restored.load_state_dict(method.state_dict())
    assert restored.squares.shape == (3, 10)
    for jacobian in jacobians[2:]:
        torch.testing.assert_close(
            restored.aggregate(torch.ones(3), jacobian), method.aggregate(torch.ones(3), jacobian)
        )


def test_a_change_of_width_is_a_clear_error():
    method = ExcessMTL(tasks=2)
    method.aggregate(torch.ones(2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="batch size must stay fixed"):
        method.aggregate(torch.ones(2), torch.ones(2, 6))


@pytest.mark.parametrize("warmup", [0, 2])
def test_agrees_with_torchjd_over_several_steps(warmup):
    from torchjd.aggregation import ExcessMTL as TorchJDExcessMTL

    # Same semantics by construction (weights from 1/T, log-space update, eps 1e-7); float64.
    for seed in range(40):
        num_tasks = 2 + seed % 6
        theirs = TorchJDExcessMTL(robust_step_size=0.3, n_warmup_steps=warmup)
        ours = ExcessMTL(tasks=num_tasks, robust_step_size=0.3, warmup_steps=warmup)
        for step in range(5):
            jacobian = GENERIC_SAMPLERS[seed % 4](num_tasks, 20, seed=10 * seed + step)
            torch.testing.assert_close(
                ours.aggregate(torch.ones(num_tasks), jacobian),
                theirs(jacobian),
                rtol=1e-10,
                atol=1e-12,
            )


def _plain_excess_mtl(jacobians, robust_step_size, warmup_steps):
    """The update written out step by step in float64: AdaGrad squares, excess risks scaled by
    the baseline, exponentiated-gradient weights."""
    num = jacobians[0].shape[0]
    squares = torch.zeros_like(jacobians[0], dtype=torch.float64)
    weights = torch.full((num,), 1.0 / num, dtype=torch.float64)
    warmup_sum, baseline, steps = torch.zeros(num, dtype=torch.float64), None, []
    for step, jacobian in enumerate(jacobians):
        g = jacobian.double()
        squares = squares + g**2
        excess = (g**2 / torch.sqrt(squares + 1e-7)).sum(dim=1)
        if step < warmup_steps:
            warmup_sum = warmup_sum + excess
        else:
            if step == warmup_steps:
                baseline = warmup_sum / warmup_steps if warmup_steps else excess
            if step > 0:  # with no warm-up the first step's estimate is its own baseline
                excess = excess / (baseline + 1e-7)
            weights = torch.softmax(weights.log() + robust_step_size * excess, dim=0)
        steps.append((squares, weights, weights @ g))
    return steps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("warmup", [0, 2])
@pytest.mark.parametrize("block", [None, 97])  # the default column blocks, or many small ones
@pytest.mark.parametrize("shape", [(3, 40), (32, 5001)])
def test_steps_and_state_match_the_formulas(shape, block, warmup, dtype, monkeypatch):
    if block is not None:
        monkeypatch.setattr(excess_mtl, "_BLOCK_ELEMENTS", block * shape[0])
    num, dim = shape
    # Rows of different sizes that shrink as in training, scaled so that the excess risks are
    # of order one and the weights move without saturating.
    sizes = torch.linspace(0.5, 2.0, num, dtype=torch.float64)[:, None] / dim
    jacobians = [sizes * random_jacobian(num, dim, seed=s) / (s + 1) for s in range(6)]
    expected = _plain_excess_mtl(jacobians, robust_step_size=0.7, warmup_steps=warmup)
    method = ExcessMTL(tasks=num, robust_step_size=0.7, warmup_steps=warmup)
    # float32 is the method's working precision on the T x n side: its rounding, not the maths.
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    for step, (jacobian, (squares, weights, update)) in enumerate(
        zip(jacobians, expected, strict=True), start=1
    ):
        got = method.aggregate(torch.ones(num, dtype=dtype), jacobian.to(dtype))
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), update, **tol)
        torch.testing.assert_close(method.squares.double(), squares, **tol)
        torch.testing.assert_close(method.weights, weights, **tol)
        assert int(method.step) == step
