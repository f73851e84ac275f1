"""Thousands of random, deliberately degenerate inputs through every registered method: the
output is always finite and of the right shape (no silent NaN).

The matrices mix zero rows, duplicated and opposite rows, rank deficiency and row scales
spread over twelve orders of magnitude; the losses span six orders of magnitude.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskbalance import Requirement, get_method, list_methods
from taskbalance.engine.requirement import Requirement as _Requirement
from taskbalance.methods.registry import method_class

assert Requirement is _Requirement

BY_NEED = {
    need: [name for name in list_methods() if method_class(name).requires is need]
    for need in Requirement
}


@st.composite
def degenerate_problems(draw):
    """(losses, jacobian): T in 1..8 tasks, n in 1..12 coordinates, float64."""
    num_tasks = draw(st.integers(1, 8))
    dim = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_tasks, dim, generator=gen, dtype=torch.float64)
    for t in range(num_tasks):
        kind = draw(st.sampled_from(["keep", "zero", "copy", "opposite", "tiny", "huge"]))
        source = draw(st.integers(0, num_tasks - 1))
        if kind == "zero":
            rows[t] = 0
        elif kind == "copy":
            rows[t] = rows[source]
        elif kind == "opposite":
            rows[t] = -rows[source]
        elif kind == "tiny":
            rows[t] *= 1e-6
        elif kind == "huge":
            rows[t] *= 1e6
    exponents = torch.tensor(
        draw(st.lists(st.integers(-3, 3), min_size=num_tasks, max_size=num_tasks)),
        dtype=torch.float64,
    )
    losses = 10.0**exponents
    return losses, rows


SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("name", BY_NEED[Requirement.GRAMIAN])
@SETTINGS
@given(problem=degenerate_problems())
def test_gramian_methods_give_finite_weights(name, problem):
    losses, jacobian = problem
    method = get_method(name, tasks=losses.numel())
    weights = method.shared_weights(losses, jacobian @ jacobian.T)
    assert weights.shape == losses.shape
    assert torch.isfinite(weights).all(), (name, weights)


@pytest.mark.parametrize("name", BY_NEED[Requirement.JACOBIAN])
@SETTINGS
@given(problem=degenerate_problems())
def test_jacobian_methods_give_a_finite_update(name, problem):
    losses, jacobian = problem
    method = get_method(name, tasks=losses.numel())
    update = method.aggregate(losses, jacobian)
    assert update.shape == (jacobian.shape[1],)
    assert torch.isfinite(update).all(), (name, update)


@pytest.mark.parametrize("name", list_methods())
@SETTINGS
@given(problem=degenerate_problems())
def test_loss_weights_are_finite(name, problem):
    losses, _ = problem
    method = get_method(name, tasks=losses.numel())
    weights, offsets = method.loss_weights(losses)
    assert weights.shape == losses.shape and torch.isfinite(weights).all(), (name, weights)
    assert offsets is None or torch.isfinite(offsets).all()
