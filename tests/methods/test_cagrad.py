"""CAGrad: c = 0 is the mean, optimality of the worst-case improvement, and an independent
scipy solve of the dual (torchjd's CAGrad needs cvxpy and clarabel, which are not
dependencies here, so it cannot serve as the reference)."""

from __future__ import annotations

import pytest
import torch

from support.samplers import GENERIC_SAMPLERS, random_jacobian
from taskbalance.methods.cagrad import CAGrad, cagrad_inner, cagrad_weights


@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS)
def test_c_zero_gives_the_mean_gradient(sampler):
    jacobian = sampler(5, 20, seed=1)
    torch.testing.assert_close(
        cagrad_weights(jacobian @ jacobian.T, c=0.0), torch.full((5,), 0.2, dtype=torch.float64)
    )


@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS)
@pytest.mark.parametrize("num_tasks", [2, 3, 6])
def test_update_maximises_the_worst_improvement_on_the_ball(sampler, num_tasks):
    jacobian = sampler(num_tasks, 30, seed=num_tasks)
    gram = jacobian @ jacobian.T
    dual = cagrad_inner(gram, 0.5)
    update = cagrad_weights(gram, 0.5, rescale="none") @ jacobian
    mean = jacobian.mean(dim=0)
    improvements = jacobian @ update
    scale = jacobian.norm(dim=1).max() * update.norm()
    # The update lies on the ball's boundary ...
    assert (update - mean).norm().item() == pytest.approx(0.5 * mean.norm().item(), rel=1e-9)
    # ... and every task the dual puts weight on has the smallest improvement (KKT).
    support = improvements[dual > 1e-12]
    assert (support - improvements.min()).abs().max() <= 1e-9 * scale
    # The mean gradient is in the ball, so the worst improvement cannot be below its own.
    assert improvements.min() >= (jacobian @ mean).min() - 1e-9 * scale


def test_rescale_divides_by_one_plus_c_squared_by_default():
    gram = random_jacobian(3, 10, seed=2) @ random_jacobian(3, 10, seed=2).T
    plain = cagrad_weights(gram, 0.4, rescale="none")
    torch.testing.assert_close(CAGrad(c=0.4).shared_weights(torch.ones(3), gram), plain / 1.16)
    torch.testing.assert_close(cagrad_weights(gram, 0.4, rescale="1+c"), plain / 1.4)


def test_rejects_a_negative_c():
    with pytest.raises(ValueError, match="c must be >= 0"):
        CAGrad(c=-0.1)


def test_dual_is_at_least_as_good_as_scipy_slsqp_on_a_hundred_jacobians():
    np = pytest.importorskip("numpy")
    optimize = pytest.importorskip("scipy.optimize")
    # The paper's own solver (SLSQP on the simplex): ours must reach an objective at most
    # SLSQP's (SLSQP stops at ftol; both are float64), and never be worse by more than rounding.
    for seed in range(120):
        num_tasks = 2 + seed % 6
        jacobian = GENERIC_SAMPLERS[seed % 4](num_tasks, 30, seed=seed)
        gram = (jacobian @ jacobian.T).numpy()
        b = gram.sum(axis=1) / num_tasks
        radius = 0.5 * np.sqrt(gram.sum()) / num_tasks

        def objective(w, gram=gram, b=b, radius=radius):
            return b @ w + radius * np.sqrt(max(w @ gram @ w, 0.0))

        start = np.full(num_tasks, 1.0 / num_tasks)
        result = optimize.minimize(
            objective,
            start,
            bounds=[(0, 1)] * num_tasks,
            constraints=({"type": "eq", "fun": lambda w: 1 - w.sum()},),
            method="SLSQP",
            options={"ftol": 1e-12, "maxiter": 500},
        )
        ours = objective(cagrad_inner(torch.from_numpy(gram), 0.5).numpy())
        assert ours <= result.fun + 1e-9 * abs(result.fun) + 1e-12 * gram.diagonal().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pareto_stationary_gradients_give_the_mean_whatever_the_rounding(dtype):
    # 0 lies in the convex hull of these gradients, so MGDA's minimum norm is 0 and CAGrad's
    # update is g_0; computed, that norm is rounding noise of about sqrt(eps) |g|, which an
    # exact-zero test read as a direction (weights up to 0.49 instead of 0.16). Orderings and
    # scales round differently.
    generator = torch.Generator().manual_seed(0)
    for trial in range(40):
        base = torch.randn(4, 12, generator=generator, dtype=torch.float64)
        jacobian = torch.cat([base, -base.sum(dim=0, keepdim=True)])  # mean of the 5 rows is 0
        jacobian = jacobian[torch.randperm(5, generator=generator)] * 10.0 ** (trial % 7 - 3)
        gram = (jacobian @ jacobian.T).to(dtype)
        expected = torch.full((5,), 0.2 / 1.25, dtype=dtype)
        torch.testing.assert_close(cagrad_weights(gram, 0.5), expected, rtol=0, atol=0)
    one_dimensional = torch.tensor([[-3.0], [-3.0], [2.0]], dtype=torch.float64)
    torch.testing.assert_close(
        cagrad_weights(one_dimensional @ one_dimensional.T, 0.5, rescale="none"),
        torch.full((3,), 1 / 3, dtype=torch.float64),
    )


def test_a_small_but_real_minimum_norm_is_not_read_as_stationary():
    # Two nearly opposed gradients: the minimum norm is 1e-4 of their size, far above the
    # float64 rounding floor, and the update must still reach the ball's boundary.
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 2e-4]], dtype=torch.float64)
    update = cagrad_weights(jacobian @ jacobian.T, 0.5, rescale="none") @ jacobian
    mean = jacobian.mean(dim=0)
    assert (update - mean).norm().item() == pytest.approx(0.5 * mean.norm().item(), rel=1e-9)


def test_gradients_of_very_different_sizes_are_not_read_as_stationary():
    # Orthogonal gradients 3,000x apart: nothing is stationary, and a float32 Gramian must give
    # the float64 update (a threshold scaled by the largest norm alone dropped the small task).
    jacobian = torch.tensor([[1000.0, 0.0], [0.0, 0.3]], dtype=torch.float64)
    gram = jacobian @ jacobian.T
    exact = cagrad_weights(gram, 0.5, rescale="none")
    assert exact[1] > 100  # the small task's weight is scaled up to matter
    torch.testing.assert_close(cagrad_weights(gram.float(), 0.5, rescale="none").double(), exact,
                               rtol=1e-4, atol=0)  # fmt: skip
    # The same sizes pointing against each other are stationary, in both dtypes.
    opposed = torch.tensor([[1000.0], [-0.3]], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        weights = cagrad_weights((opposed @ opposed.T).to(dtype), 0.5, rescale="none")
        torch.testing.assert_close(weights, torch.full((2,), 0.5, dtype=dtype))


def test_cagrad_every_face_on_the_host_matches_the_root_search(monkeypatch):
    """The host's closed form on every face (T <= 4) and its root search agree."""
    from taskbalance.methods import cagrad

    gen = torch.Generator().manual_seed(21)
    gradients = [torch.randn(t, 9, generator=gen, dtype=torch.float64) for t in (2, 3, 4) * 5]
    for k in [g @ g.T for g in gradients]:
        faces = cagrad_weights(k, c=0.5)
        with monkeypatch.context() as patch:
            patch.setattr(cagrad, "_EVERY_FACE_UP_TO", 0)
            searched = cagrad_weights(k, c=0.5)
        torch.testing.assert_close(faces, searched, rtol=1e-7, atol=1e-9)
