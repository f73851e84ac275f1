"""Properties shared by every Gramian method: shape, finiteness, equivariance, degenerate input.

Run over every generic and degenerate Jacobian sampler, for the gradient-level baselines and the
IMTL family. Each method's own maths is tested in tests/methods/test_<name>.py.
"""

from __future__ import annotations

import pytest
import torch

from support.models import SharedBottom, batch
from support.samplers import (
    DEGENERATE_SAMPLERS,
    GENERIC_SAMPLERS,
    identical_rows,
    random_jacobian,
    scaled_rows,
)
from taskbalance import Requirement, get_method, list_methods

GRAMIAN_METHODS = [
    "imtl_g",
    "imtl",
    "mgda",
    "pcgrad",
    "gradvac",
    "cagrad",
    "nash_mtl",
    "aligned_mtl",
    "upgrad",
    "fairgrad",
    "config",
]
STOCHASTIC = {"pcgrad", "gradvac"}
"""Random task orders: permutation-equivariant in distribution only (exactly for T = 2)."""

ZERO_GRAMIAN_WEIGHTS = {
    "imtl_g": lambda t: 1.0 / t,
    "imtl": lambda t: 1.0 / t,
    "mgda": lambda t: 1.0 / t,
    "pcgrad": lambda t: 1.0,
    "gradvac": lambda t: 1.0,
    "cagrad": lambda t: 1.0 / t / 1.25,  # the mean, divided by 1 + c^2
    "nash_mtl": lambda t: 1.0,
    "aligned_mtl": lambda t: 1.0,
    "upgrad": lambda t: 1.0 / t,
    "fairgrad": lambda t: 1.0,
    "config": lambda t: 0.0,
}
"""The documented weights on the zero Gramian (the update is zero whatever they are)."""


def _weights(name: str, jacobian: torch.Tensor) -> torch.Tensor:
    num_tasks = jacobian.shape[0]
    method = get_method(name, tasks=num_tasks)
    losses = torch.linspace(1.0, 2.0, num_tasks, dtype=jacobian.dtype)
    return method.shared_weights(losses, jacobian @ jacobian.T)


def test_every_listed_method_is_registered_and_needs_only_the_gramian():
    for name in GRAMIAN_METHODS:
        assert name in list_methods()
        assert get_method(name, tasks=2).requires is Requirement.GRAMIAN


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS + DEGENERATE_SAMPLERS)
@pytest.mark.parametrize("num_tasks", [1, 2, 5])
def test_weights_are_finite_with_one_per_task(name, sampler, num_tasks):
    weights = _weights(name, sampler(num_tasks, 12, seed=num_tasks))
    assert weights.shape == (num_tasks,)
    assert weights.dtype == torch.float64
    assert torch.isfinite(weights).all()


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
@pytest.mark.parametrize("sampler", [random_jacobian, scaled_rows])
def test_weights_are_finite_for_forty_tasks(name, sampler):
    weights = _weights(name, sampler(40, 60, seed=40))
    assert weights.shape == (40,) and torch.isfinite(weights).all()


@pytest.mark.parametrize("name", sorted(set(GRAMIAN_METHODS) - STOCHASTIC))
@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS)
def test_weights_are_permutation_equivariant(name, sampler):
    jacobian = sampler(5, 20, seed=11)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    weights = _weights(name, jacobian)
    permuted = _weights(name, jacobian[permutation])
    torch.testing.assert_close(permuted, weights[permutation], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_methods_are_permutation_equivariant_for_two_tasks(name):
    # With two tasks there is a single order, so the randomness plays no role.
    jacobian = random_jacobian(2, 10, seed=3) - 0.8 * random_jacobian(1, 10, seed=3)
    weights = _weights(name, jacobian)
    swapped = _weights(name, jacobian.flip(0))
    torch.testing.assert_close(swapped, weights.flip(0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_zero_gramian_gives_the_documented_weights(name, num_tasks):
    weights = _weights(name, torch.zeros(num_tasks, 4, dtype=torch.float64))
    expected = ZERO_GRAMIAN_WEIGHTS[name](num_tasks)
    torch.testing.assert_close(weights, torch.full((num_tasks,), expected, dtype=torch.float64))


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_identical_gradients_give_an_update_along_that_gradient(name):
    weights = _weights(name, identical_rows(4, 9, seed=2))
    assert weights.sum() > 0


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_single_task_update_keeps_the_gradient_direction(name):
    weights = _weights(name, random_jacobian(1, 7, seed=5))
    assert weights.item() > 0


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_backward_writes_the_weighted_gradient_at_both_levels(name, level):
    num_tasks = 3
    model = SharedBottom(num_tasks, seed=1)
    losses, z = model.losses(*batch(num_tasks))
    method = get_method(name, tasks=num_tasks, level=level)
    shared = list(model.trunk.parameters())
    inputs = shared if level == "parameter" else [z]
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, inputs, retain_graph=True)])
        for loss in losses.values()
    ]
    jacobian = torch.stack(rows)
    info = method.backward(losses, shared=model.trunk, features=z)
    weights = info.gradient_weights
    assert weights is not None and torch.isfinite(weights).all()
    if level == "parameter":
        update = torch.cat([p.grad.flatten() for p in shared])
        torch.testing.assert_close(update, weights @ jacobian, rtol=1e-10, atol=1e-12)
    else:
        assert all(torch.isfinite(p.grad).all() for p in shared)
