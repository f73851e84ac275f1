"""Properties shared by the Jacobian methods: shape, finiteness, invariance, zero input."""

from __future__ import annotations

import pytest
import torch

from support.models import SharedBottom, batch
from support.samplers import DEGENERATE_SAMPLERS, GENERIC_SAMPLERS
from taskbalance import Requirement, get_method

JACOBIAN_METHODS = ["graddrop", "excess_mtl", "moco"]


def _update(name: str, jacobian: torch.Tensor) -> torch.Tensor:
    num_tasks = jacobian.shape[0]
    method = get_method(name, tasks=num_tasks)
    return method.aggregate(torch.linspace(1.0, 2.0, num_tasks, dtype=jacobian.dtype), jacobian)


def test_every_listed_method_needs_the_jacobian():
    for name in JACOBIAN_METHODS:
        assert get_method(name, tasks=2).requires is Requirement.JACOBIAN


@pytest.mark.parametrize("name", JACOBIAN_METHODS)
@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS + DEGENERATE_SAMPLERS)
@pytest.mark.parametrize("num_tasks", [1, 2, 5, 40])
def test_update_is_finite_with_the_jacobian_width(name, sampler, num_tasks):
    update = _update(name, sampler(num_tasks, 12, seed=num_tasks))
    assert update.shape == (12,) and torch.isfinite(update).all()


@pytest.mark.parametrize("name", JACOBIAN_METHODS)
def test_zero_jacobian_gives_a_zero_update(name):
    assert _update(name, torch.zeros(3, 5, dtype=torch.float64)).abs().max() == 0


@pytest.mark.parametrize("name", JACOBIAN_METHODS)
@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS)
def test_update_is_invariant_to_the_task_order(name, sampler):
    # GradDrop's draws are per coordinate, not per task, so with the same seed it is exactly
    # invariant too.
    jacobian = sampler(4, 15, seed=8)
    permutation = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(
        _update(name, jacobian[permutation]), _update(name, jacobian), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("name", JACOBIAN_METHODS)
@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_backward_fills_finite_gradients_at_both_levels(name, level):
    model = SharedBottom(3, seed=2)
    losses, z = model.losses(*batch(3))
    method = get_method(name, tasks=3, level=level)
    method.backward(losses, shared=model.trunk, features=z)
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
