"""EMTL: scale invariance, its two limits (lam = 0, equal r), large lam, degenerate input, the
API (levels, base="sum", heads unweighted) and a training run that equalises r_t."""

from __future__ import annotations

import itertools

import pytest
import torch

from support.models import SharedBottom, batch, grads
from support.samplers import GENERIC_SAMPLERS, random_jacobian
from taskbalance import EW, InvalidLossError, NonFiniteLossError, get_method
from taskbalance.methods.emtl import EMTL, emtl_weights, relative_contributions


def _losses(num_tasks: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_tasks, generator=gen, dtype=torch.float64) * 5 + 0.1


def _contributions(losses, jacobian, lam, base="relative"):
    """c_t, recovered from the weights: a_t ||g_t|| / gbar."""
    norms = jacobian.norm(dim=1)
    return emtl_weights(losses, norms, lam, base) * norms / norms.mean()


@pytest.mark.parametrize("sampler", GENERIC_SAMPLERS)
@pytest.mark.parametrize("lam", [0.0, 1.0, 4.0])
def test_direction_and_contributions_unchanged_when_a_loss_is_scaled(sampler, lam):
    jacobian, losses = sampler(4, 20, seed=2), _losses(4, seed=2)
    scale = torch.tensor([1.0, 1e3, 1.0, 1e-2], dtype=torch.float64)
    norms, scaled_norms = jacobian.norm(dim=1), (scale[:, None] * jacobian).norm(dim=1)
    update = emtl_weights(losses, norms, lam) @ jacobian
    scaled_update = emtl_weights(scale * losses, scaled_norms, lam) @ (scale[:, None] * jacobian)
    torch.testing.assert_close(
        scaled_update / scaled_update.norm(), update / update.norm(), rtol=1e-10, atol=1e-12
    )
    # c_t (each task's share of the unit-gradient sum) does not move at all.
    torch.testing.assert_close(
        emtl_weights(scale * losses, scaled_norms, lam) * scaled_norms / scaled_norms.mean(),
        emtl_weights(losses, norms, lam) * norms / norms.mean(),
        rtol=1e-10,
        atol=0,
    )


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 3.0, 100.0])
def test_equal_r_reduces_to_gradient_norm_equalisation(lam):
    norms = torch.tensor([0.01, 1.0, 7.0, 300.0], dtype=torch.float64)
    losses = 2.5 * norms  # r_t = 2.5 for every task
    weights = emtl_weights(losses, norms, lam)
    torch.testing.assert_close(weights, norms.mean() / norms, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", range(5))
def test_lam_zero_gives_every_task_the_same_magnitude(seed):
    jacobian, losses = random_jacobian(5, 12, seed=seed), _losses(5, seed=seed)
    norms = jacobian.norm(dim=1)
    contributions = emtl_weights(losses, norms, lam=0.0) * norms
    torch.testing.assert_close(contributions, norms.mean().expand(5), rtol=1e-12, atol=0)


@pytest.mark.parametrize("num_tasks", [2, 3, 6])
def test_lam_half_t_weights_each_task_by_its_own_polyak_step(num_tasks):
    jacobian, losses = random_jacobian(num_tasks, 9, seed=1), _losses(num_tasks, seed=1)
    r = losses / jacobian.norm(dim=1)
    c = _contributions(losses, jacobian, lam=num_tasks / 2)
    torch.testing.assert_close(c, r / r.mean(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("num_tasks", [2, 3, 6])
def test_no_clamp_binds_while_lam_is_at_most_half_t(num_tasks):
    losses = torch.tensor([1e-6] + [1.0] * (num_tasks - 1), dtype=torch.float64)
    jacobian = random_jacobian(num_tasks, 9, seed=4)
    r = losses / jacobian.norm(dim=1)
    lam = num_tasks / 2
    expected = 1 + (2 * lam / num_tasks) * (r / r.mean() - 1)
    c = _contributions(losses, jacobian, lam)
    torch.testing.assert_close(c, expected, rtol=1e-10, atol=1e-14)
    assert (c >= 0).all()


def test_large_lam_keeps_only_the_lagging_tasks_in_proportion_to_their_lag():
    norms = torch.ones(4, dtype=torch.float64)
    losses = torch.tensor([1.0, 2.0, 4.0, 5.0], dtype=torch.float64)  # r = losses, mean 3
    c = _contributions(losses, norms[:, None] * torch.eye(4, dtype=torch.float64), lam=1e6)
    assert c[:2].tolist() == [0.0, 0.0]  # ahead of the mean: clamped to zero
    torch.testing.assert_close(
        c[2] / c[3], torch.tensor(1 / 2, dtype=torch.float64), rtol=1e-5, atol=0
    )
    assert torch.isfinite(c).all()


def test_larger_lam_favours_the_lagging_task_more():
    norms = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    losses = torch.tensor([1.0, 1.0, 9.0], dtype=torch.float64)  # task 2 lags
    shares = [emtl_weights(losses, norms, lam)[2] * 3.0 for lam in (0.0, 0.5, 1.0, 1.5)]
    assert all(a < b for a, b in itertools.pairwise(shares))


def test_relative_contribution_is_loss_over_norm_and_scale_free():
    losses, norms = torch.tensor([2.0, 3.0]), torch.tensor([4.0, 0.5])
    torch.testing.assert_close(relative_contributions(losses, norms), torch.tensor([0.5, 6.0]))
    torch.testing.assert_close(
        relative_contributions(losses * 7, norms * 7), relative_contributions(losses, norms)
    )


# -- degenerate input --------------------------------------------------------------------------


def test_zero_gradient_task_gets_weight_zero_and_leaves_the_others_unchanged():
    norms = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
    losses = torch.tensor([1.0, 5.0, 6.0], dtype=torch.float64)
    weights = emtl_weights(losses, norms, lam=1.0)
    assert weights[1] == 0 and torch.isfinite(weights).all()
    torch.testing.assert_close(weights[[0, 2]], emtl_weights(losses[[0, 2]], norms[[0, 2]], 1.0))
    # base="sum": the dead task keeps the plain weight 1 (its gradient adds nothing anyway).
    assert emtl_weights(losses, norms, lam=1.0, base="sum")[1] == 1


def test_all_zero_gradients_and_all_zero_losses_stay_finite():
    zeros = torch.zeros(3, dtype=torch.float64)
    assert emtl_weights(zeros + 1, zeros).tolist() == [0.0, 0.0, 0.0]
    assert emtl_weights(zeros + 1, zeros, base="sum").tolist() == [1.0, 1.0, 1.0]
    norms = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    # Every task done (mean r = 0): the regulariser is dropped, gradient-norm equalisation.
    torch.testing.assert_close(emtl_weights(zeros, norms, lam=5.0), norms.mean() / norms)


def test_tiny_norm_in_float32_does_not_overflow():
    norms = torch.tensor([1.0, 1e-30], dtype=torch.float32)
    weights = emtl_weights(torch.tensor([1.0, 1.0]), norms)
    assert torch.isfinite(weights).all() and weights[1] == 0


def test_negative_loss_is_an_error_naming_the_task():
    with pytest.raises(InvalidLossError, match="'depth'") as caught:
        emtl_weights(
            torch.tensor([1.0, -0.5]), torch.tensor([1.0, 1.0]), task_names=["seg", "depth"]
        )
    assert caught.value.task == "depth"


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_a_negative_loss_in_a_step_is_refused_before_anything_is_back_propagated(level):
    """At feature level the method runs inside the step's one backward: its loss check runs
    before it (``Method.check_losses``), so that the error leaves every ``.grad`` untouched."""
    model = SharedBottom(2)
    losses, z = model.losses(*batch(2))
    losses["task1"] = -losses["task1"]
    with pytest.raises(InvalidLossError, match="EMTL needs losses >= 0.*'task1'"):
        EMTL(level=level).backward(losses, shared=model.trunk, features=z)
    assert all(p.grad is None for p in model.parameters())


def test_nan_loss_is_an_error_naming_the_task():
    with pytest.raises(NonFiniteLossError, match="'1'"):
        emtl_weights(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 1.0]))
    model = SharedBottom(2)
    losses, _ = model.losses(*batch(2))
    losses["task1"] = losses["task1"] * float("nan")
    with pytest.raises(NonFiniteLossError, match="task1"):
        EMTL().backward(losses, shared=model.trunk)
    assert all(p.grad is None for p in model.parameters())


def test_negative_lam_and_unknown_base_are_rejected():
    with pytest.raises(ValueError, match="lam"):
        EMTL(lam=-1.0)
    with pytest.raises(ValueError, match="base"):
        EMTL(base="mean")


# -- base="sum" ---------------------------------------------------------------------------------


def test_base_sum_with_lam_zero_is_the_plain_sum():
    losses, norms = _losses(3, seed=0), torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    assert emtl_weights(losses, norms, lam=0.0, base="sum").tolist() == [1.0, 1.0, 1.0]


def test_base_sum_adds_the_same_regulariser_as_the_default_base():
    losses = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    norms = torch.tensor([1.0, 10.0, 2.0], dtype=torch.float64)
    lam = 0.5  # small enough that no clamp binds in either base
    regulariser_sum = emtl_weights(losses, norms, lam, "sum") - 1.0
    regulariser_default = emtl_weights(losses, norms, lam) - norms.mean() / norms
    torch.testing.assert_close(regulariser_sum, regulariser_default, rtol=1e-12, atol=1e-15)


# -- through the API ------------------------------------------------------------------------------


def test_registered_with_its_hyperparameters():
    method = get_method("emtl", lam=0.5, level="feature", base="sum")
    assert (method.lam, method.level, method.base) == (0.5, "feature", "sum")
    assert EMTL().level == "parameter"


def test_parameter_level_shared_gradient_and_unweighted_heads():
    model = SharedBottom(3)
    losses, _ = model.losses(*batch(3))
    shared = list(model.trunk.parameters())
    jacobian = torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses.values()
        ]
    )
    info = EMTL(lam=1.0).backward(losses, shared=model.trunk)
    values = torch.stack([loss.detach() for loss in losses.values()])
    expected_weights = emtl_weights(values, jacobian.norm(dim=1), 1.0)
    torch.testing.assert_close(info.gradient_weights, expected_weights)
    update = torch.cat([p.grad.flatten() for p in shared])
    torch.testing.assert_close(update, expected_weights @ jacobian)
    # The heads get their own loss's gradient, unweighted: as under a plain sum.
    plain = SharedBottom(3)
    EW().backward(plain.losses(*batch(3))[0])
    for mine, theirs in zip(grads(model.heads), grads(plain.heads), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_feature_level_uses_the_norms_of_the_z_gradients():
    model = SharedBottom(2)
    losses, z = model.losses(*batch(2))
    z_norms = torch.stack(
        [torch.autograd.grad(loss, z, retain_graph=True)[0].norm() for loss in losses.values()]
    )
    info = EMTL(level="feature").backward(losses, features=z)
    values = torch.stack([loss.detach() for loss in losses.values()])
    torch.testing.assert_close(info.gradient_weights, emtl_weights(values, z_norms))


# -- a training run ------------------------------------------------------------------------------


def _teacher_problem():
    """Two realisable regression tasks (a teacher of the same shape), loss scales 1 and 100."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    teacher = SharedBottom(2, seed=11, dim_hidden=8)
    with torch.no_grad():
        z = teacher.trunk(x)
        targets = torch.cat([head(z) for head in teacher.heads], dim=1)
    return x, targets


def _variance_of_r(method, steps: int) -> float:
    x, targets = _teacher_problem()
    model = SharedBottom(2, seed=0, dim_hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=3e-4)
    for _ in range(steps):
        losses, _ = model.losses(x, targets, scales=[1.0, 100.0])
        opt.zero_grad()
        method.backward(losses, shared=model.trunk)
        opt.step()
    losses, _ = model.losses(x, targets, scales=[1.0, 100.0])
    shared = list(model.trunk.parameters())
    r = torch.stack(
        [
            loss.detach()
            / torch.cat(
                [g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]
            ).norm()
            for loss in losses.values()
        ]
    )
    return float(r.var(correction=0))


def test_variance_of_r_falls_faster_than_under_equal_weighting():
    start = _variance_of_r(EW(), steps=0)
    emtl, ew = _variance_of_r(EMTL(), steps=75), _variance_of_r(EW(), steps=75)
    assert emtl < 0.5 * start  # EMTL brings the relative contributions together ...
    assert ew > start  # ... while equal weighting lets the large-scale task pull them apart
    assert emtl < 0.25 * ew


def test_a_larger_lam_equalises_r_more_on_the_training_run():
    variances = [_variance_of_r(EMTL(lam=lam), steps=75) for lam in (0.0, 1.0, 5.0)]
    assert variances[0] > variances[1] > variances[2]
