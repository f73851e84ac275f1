"""Nash-MTL: the defining equation K a = 1/a, scale, clipping, state, and a scipy reference
(torchjd's NashMTL needs cvxpy and ecos, which are not dependencies here)."""

from __future__ import annotations

import pytest
import torch

from support.samplers import GENERIC_SAMPLERS, random_jacobian
from taskbalance.methods.nash_mtl import NashMTL, clip_weights, nash_mtl_weights


@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS)
@pytest.mark.parametrize("num_tasks", [1, 2, 4, 8])
def test_weights_solve_k_a_equals_one_over_a(sampler, num_tasks):
    jacobian = sampler(num_tasks, 30, seed=num_tasks)
    gram = jacobian @ jacobian.T
    weights = nash_mtl_weights(gram)
    assert (weights > 0).all()
    # Newton to rtol 1e-12 on a problem regularised by 1e-10 relative: 1e-8 is ample.
    torch.testing.assert_close(
        gram @ weights * weights, torch.ones_like(weights), rtol=1e-8, atol=0
    )


def test_update_norm_squared_is_the_number_of_tasks():
    jacobian = GENERIC_SAMPLERS[1](5, 20, seed=3)
    weights = nash_mtl_weights(jacobian @ jacobian.T)
    assert (weights @ jacobian).norm().item() ** 2 == pytest.approx(5.0, rel=1e-8)


def test_scaling_the_gramian_by_c_divides_the_weights_by_sqrt_c():
    gram = random_jacobian(3, 10, seed=4) @ random_jacobian(3, 10, seed=4).T
    torch.testing.assert_close(nash_mtl_weights(1e6 * gram), nash_mtl_weights(gram) / 1e3)


def test_default_clipping_gives_updates_of_norm_max_norm():
    jacobian = random_jacobian(3, 10, seed=5)
    method = NashMTL(tasks=3, max_norm=0.7)
    weights = method.shared_weights(torch.ones(3), jacobian @ jacobian.T)
    assert (weights @ jacobian).norm().item() == pytest.approx(0.7, rel=1e-10)


def test_clip_leaves_short_updates_alone():
    weights = torch.tensor([0.1, 0.2], dtype=torch.float64)
    torch.testing.assert_close(
        clip_weights(torch.eye(2, dtype=torch.float64), weights, 1.0), weights
    )


def test_update_weights_every_reuses_the_last_solution():
    method = NashMTL(tasks=2, max_norm=0.0, update_weights_every=2)
    first = method.shared_weights(torch.ones(2), torch.diag(torch.tensor([4.0, 1.0])))
    reused = method.shared_weights(torch.ones(2), torch.diag(torch.tensor([1.0, 1.0])))
    fresh = method.shared_weights(torch.ones(2), torch.diag(torch.tensor([1.0, 1.0])))
    torch.testing.assert_close(reused, first)
    torch.testing.assert_close(fresh, torch.ones(2))


def test_state_dict_keeps_the_warm_start_and_the_step():
    method = NashMTL(tasks=3)
    gram = random_jacobian(3, 8, seed=6) @ random_jacobian(3, 8, seed=6).T
    method.shared_weights(torch.ones(3), gram)
    restored = NashMTL(tasks=3)
    restored.load_state_dict(method.state_dict())
    torch.testing.assert_close(restored.weights, method.weights)
    assert int(restored.step) == 1


def test_zero_gradient_gives_finite_weights():
    jacobian = random_jacobian(3, 8, seed=7)
    jacobian[0] = 0
    weights = nash_mtl_weights(jacobian @ jacobian.T)
    assert torch.isfinite(weights).all()


def test_agrees_with_scipy_least_squares_on_a_hundred_jacobians():
    np = pytest.importorskip("numpy")
    optimize = pytest.importorskip("scipy.optimize")
    # An independent solve of the same equation (as the FairGrad paper's code does). scipy's
    # trust-region solver sometimes stalls on Gramians whose diagonal spans 1e12 (scaled rows):
    # there ours must still satisfy the equation; elsewhere the weights agree to 1e-6, the
    # looser of the two solvers' tolerances.
    compared = 0
    for seed in range(120):
        num_tasks = 2 + seed % 6
        jacobian = GENERIC_SAMPLERS[seed % 4](num_tasks, 30, seed=seed)
        gram = jacobian @ jacobian.T
        normalised = (gram / gram.diagonal().mean()).numpy()
        result = optimize.least_squares(
            lambda a, k=normalised: k @ a - 1 / a,
            np.ones(num_tasks),
            bounds=(1e-12, np.inf),
            xtol=1e-15,
            ftol=1e-15,
            gtol=1e-15,
        )
        ours = nash_mtl_weights(torch.from_numpy(normalised))
        residual = torch.from_numpy(normalised) @ ours * ours - 1
        assert residual.abs().max() < 1e-8
        if np.abs(normalised @ result.x * result.x - 1).max() < 1e-8:
            torch.testing.assert_close(ours, torch.from_numpy(result.x), rtol=1e-6, atol=0)
            compared += 1
    assert compared >= 110
