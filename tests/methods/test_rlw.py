"""RLW: weights on the simplex, with the paper's distribution, reproducible from a seed."""

from __future__ import annotations

import copy

import pytest
import torch

from support.models import SharedBottom, batch, grads
from taskbalance import get_method
from taskbalance.methods.rlw import RLW, rlw_weights


@pytest.mark.parametrize("distribution", ["normal", "dirichlet"])
def test_weights_lie_on_the_simplex(distribution):
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([rlw_weights(5, generator, distribution) for _ in range(500)])
    assert (draws > 0).all()
    torch.testing.assert_close(draws.sum(dim=1), torch.ones(500, dtype=torch.float64))


def test_normal_weights_are_the_softmax_of_a_standard_normal_draw():
    drawn = rlw_weights(4, torch.Generator().manual_seed(11))
    expected = torch.softmax(
        torch.randn(4, generator=torch.Generator().manual_seed(11), dtype=torch.float64), 0
    )
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)


def test_dirichlet_weights_have_the_uniform_simplex_moments():
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([rlw_weights(3, generator, "dirichlet") for _ in range(4000)])
    # Dirichlet(1, 1, 1): mean 1/3, variance (T - 1) / (T^2 (T + 1)) = 1/18
    torch.testing.assert_close(
        draws.mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.015, rtol=0
    )
    torch.testing.assert_close(
        draws.var(0), torch.full((3,), 1 / 18, dtype=torch.float64), atol=0.005, rtol=0
    )


def test_same_seed_same_weights_other_seed_other_weights():
    losses = torch.ones(3)
    a, b, c = RLW(seed=5), RLW(seed=5), RLW(seed=6)
    for _ in range(3):
        wa, wb, wc = (m.loss_weights(losses)[0] for m in (a, b, c))
        torch.testing.assert_close(wa, wb, rtol=0, atol=0)
        assert not torch.equal(wa, wc)


def test_without_seed_the_global_torch_seed_makes_runs_reproducible():
    torch.manual_seed(123)
    first = RLW().loss_weights(torch.ones(3))[0]
    torch.manual_seed(123)
    torch.testing.assert_close(RLW().loss_weights(torch.ones(3))[0], first, rtol=0, atol=0)


def test_weights_do_not_depend_on_the_losses_dtype_beyond_rounding():
    w32 = RLW(seed=2).loss_weights(torch.ones(3, dtype=torch.float32))[0]
    w64 = RLW(seed=2).loss_weights(torch.ones(3, dtype=torch.float64))[0]
    assert w32.dtype == torch.float32 and w64.dtype == torch.float64
    torch.testing.assert_close(w32, w64.float())


def test_state_dict_mid_run_continues_the_same_draws():
    method = RLW(tasks=2, seed=9)
    for _ in range(4):
        method.loss_weights(torch.ones(2))
    state = copy.deepcopy(method.state_dict())
    expected = [method.loss_weights(torch.ones(2))[0] for _ in range(3)]
    restored = RLW(tasks=2, seed=0)
    restored.load_state_dict(state)
    for want in expected:
        torch.testing.assert_close(restored.loss_weights(torch.ones(2))[0], want, rtol=0, atol=0)


def test_model_gradient_is_the_randomly_weighted_sum():
    model, twin = SharedBottom(3), SharedBottom(3)
    info = get_method("rlw", seed=4).backward(model.losses(*batch(3))[0])
    weights = rlw_weights(3, torch.Generator().manual_seed(4))
    torch.testing.assert_close(info.loss_weights, weights)
    twin_losses, _ = twin.losses(*batch(3))
    sum(w * loss for w, loss in zip(weights, twin_losses.values(), strict=True)).backward()
    for ours, theirs in zip(grads(model), grads(twin), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_unknown_distribution_is_an_error():
    with pytest.raises(ValueError, match="'normal' or 'dirichlet'"):
        RLW(distribution="bernoulli")
