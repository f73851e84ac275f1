"""One call in the user's loop: what lands in .grad, at each level, and on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import taskbalance
from support.models import SharedBottom, batch, grads
from support.samplers import unit_rows
from taskbalance import EW, IMTLG, InvalidLossError, NonFiniteLossError, imtl_g_weights


def _plain_backward_grads(num_tasks: int, seed: int = 0):
    model = SharedBottom(num_tasks, seed=seed)
    losses, _ = model.losses(*batch(num_tasks))
    sum(losses.values()).backward()
    return grads(model)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_ew_sum_equals_a_plain_backward(num_tasks):
    model = SharedBottom(num_tasks)
    losses, _ = model.losses(*batch(num_tasks))
    info = EW().backward(losses)
    for ours, plain in zip(grads(model), _plain_backward_grads(num_tasks), strict=True):
        torch.testing.assert_close(ours, plain)
    assert info.grad_norms is None and info.weights.tolist() == [1.0] * num_tasks


def test_ew_mean_halves_the_gradient_for_two_tasks():
    model = SharedBottom(2)
    losses, _ = model.losses(*batch(2))
    EW(reduction="mean").backward(losses)
    for ours, plain in zip(grads(model), _plain_backward_grads(2), strict=True):
        torch.testing.assert_close(ours, plain / 2)


@pytest.mark.parametrize("mode", ["batched", "loop"])
@pytest.mark.parametrize("num_tasks", [2, 3, 6])
def test_feature_level_update_projects_equally_on_unit_z_gradients(num_tasks, mode):
    model = SharedBottom(num_tasks, seed=num_tasks)
    losses, z = model.losses(*batch(num_tasks))
    z_jacobian = torch.stack(
        [torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in losses.values()]
    )
    IMTLG().backward(losses, features=z, jacobian_mode=mode)
    weights = imtl_g_weights(z_jacobian @ z_jacobian.T)
    projections = unit_rows(z_jacobian) @ (weights @ z_jacobian)
    torch.testing.assert_close(projections, projections.mean().expand(num_tasks), rtol=1e-9, atol=0)
    # ... and check that the trunk really received J_trunk^T (sum_t a_t dL_t/dz):
    model_check = SharedBottom(num_tasks, seed=num_tasks)
    _, z2 = model_check.losses(*batch(num_tasks))
    z2.backward((weights @ z_jacobian).view_as(z2))
    for ours, expected in zip(
        model.trunk.parameters(), model_check.trunk.parameters(), strict=True
    ):
        torch.testing.assert_close(ours.grad, expected.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["batched", "loop"])
@pytest.mark.parametrize("num_tasks", [2, 4, 8])
def test_parameter_level_update_projects_equally_on_unit_parameter_gradients(num_tasks, mode):
    model = SharedBottom(num_tasks, seed=num_tasks)
    losses, _ = model.losses(*batch(num_tasks))
    shared = list(model.trunk.parameters())
    jacobian = torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses.values()
        ]
    )
    info = IMTLG(level="parameter").backward(losses, shared=model.trunk, jacobian_mode=mode)
    update = torch.cat([p.grad.flatten() for p in shared])
    projections = unit_rows(jacobian) @ update
    torch.testing.assert_close(projections, projections.mean().expand(num_tasks), rtol=1e-9, atol=0)
    torch.testing.assert_close(info.grad_norms, jacobian.norm(dim=1))
    torch.testing.assert_close(info.cosines, unit_rows(jacobian) @ unit_rows(jacobian).T)


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_heads_receive_the_gradient_of_a_plain_backward(level):
    model = SharedBottom(3)
    losses, z = model.losses(*batch(3))
    IMTLG(level=level).backward(losses, shared=model.trunk, features=z)
    plain = SharedBottom(3)
    plain_losses, _ = plain.losses(*batch(3))
    sum(plain_losses.values()).backward()
    for ours, expected in zip(model.heads.parameters(), plain.heads.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, expected.grad)


def test_feature_and_parameter_level_agree_for_a_linear_trunk_on_one_sample():
    # With z = W x for a single sample x, dL/dW = (dL/dz) x^T, so K_W = ||x||^2 K_z: same weights.
    results = []
    for level in ("feature", "parameter"):
        model = SharedBottom(3, linear_trunk=True)
        losses, z = model.losses(*batch(3, size=1))
        info = IMTLG(level=level).backward(losses, shared=model.trunk, features=z)
        results.append((info.gradient_weights, grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_grad_accumulates_like_tensor_backward():
    once, twice = SharedBottom(3), SharedBottom(3)
    losses, _ = once.losses(*batch(3))
    IMTLG(level="parameter").backward(losses, shared=once.trunk)
    for _ in range(2):
        losses, _ = twice.losses(*batch(3))
        IMTLG(level="parameter").backward(losses, shared=twice.trunk)
    for a, b in zip(grads(once), grads(twice), strict=True):
        torch.testing.assert_close(2 * a, b)


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_functional_form_returns_what_backward_writes_and_leaves_grad_alone(level):
    model = SharedBottom(3)
    losses, z = model.losses(*batch(3))
    method = IMTLG(level=level)
    returned, info = method.gradients(losses, shared=model.trunk, features=z)
    assert all(p.grad is None for p in model.parameters())
    method.backward(losses, shared=model.trunk, features=z)
    for grad, param in zip(returned, model.trunk.parameters(), strict=True):
        torch.testing.assert_close(grad, param.grad)
    assert info.gradient_weights.sum().item() == pytest.approx(1.0)


def test_module_level_backward_matches_the_method_call():
    model, twin = SharedBottom(2), SharedBottom(2)
    losses, z = model.losses(*batch(2))
    taskbalance.backward(IMTLG(), losses, features=z)
    losses, z = twin.losses(*batch(2))
    IMTLG().backward(losses, features=z)
    for a, b in zip(grads(model), grads(twin), strict=True):
        torch.testing.assert_close(a, b)


# -- bad input ------------------------------------------------------------------------------


def test_nan_loss_raises_before_touching_grad():
    model = SharedBottom(2)
    losses, z = model.losses(*batch(2))
    losses["task1"] = losses["task1"] * float("nan")
    with pytest.raises(NonFiniteLossError, match="'task1' = nan"):
        IMTLG().backward(losses, features=z)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_a_loss_without_path_to_the_shared_part_is_named(level):
    model = SharedBottom(2)
    losses, z = model.losses(*batch(2))
    losses["orphan"] = model.heads[0].bias.pow(2).sum() + 1.0
    with pytest.raises(InvalidLossError, match="task 'orphan' does not depend on the") as caught:
        IMTLG(level=level).backward(losses, shared=model.trunk, features=z)
    assert caught.value.task == "orphan"


def test_features_that_no_loss_uses_are_an_error():
    model = SharedBottom(2)
    losses, _ = model.losses(*batch(2))
    unrelated = torch.ones(3, requires_grad=True) * 2
    with pytest.raises(InvalidLossError, match="no task loss depends on the features"):
        IMTLG().backward(losses, features=unrelated)


def test_detached_features_are_an_error():
    model = SharedBottom(2)
    losses, z = model.losses(*batch(2))
    with pytest.raises(ValueError, match="does not require grad"):
        IMTLG().backward(losses, features=z.detach())


def test_missing_features_or_shared_say_what_to_pass():
    model = SharedBottom(2)
    losses, _ = model.losses(*batch(2))
    with pytest.raises(ValueError, match="needs the shared representation: call backward"):
        IMTLG().backward(losses)
    with pytest.raises(ValueError, match="needs the shared parameters"):
        IMTLG(level="parameter").backward(losses)


def test_shared_parameters_given_twice_are_an_error():
    model = SharedBottom(2)
    losses, _ = model.losses(*batch(2))
    shared = [*model.trunk.parameters(), next(iter(model.trunk.parameters()))]
    with pytest.raises(ValueError, match="given twice"):
        IMTLG(level="parameter").backward(losses, shared=shared)


def test_task_names_are_fixed_by_the_first_dict():
    method = IMTLG()
    model = SharedBottom(2)
    losses, z = model.losses(*batch(2))
    method.backward(losses, features=z)
    losses, z = model.losses(*batch(2))
    renamed = {"x": losses["task0"], "y": losses["task1"]}
    with pytest.raises(InvalidLossError, match="the tasks changed"):
        method.backward(renamed, features=z)


def test_dict_order_does_not_matter_once_the_names_are_fixed():
    method = IMTLG()
    model = SharedBottom(3)
    losses, z = model.losses(*batch(3))
    first = method.backward(losses, features=z)
    losses, z = model.losses(*batch(3))
    second = method.backward(dict(reversed(losses.items())), features=z)
    assert second.tasks == first.tasks
    torch.testing.assert_close(second.gradient_weights, first.gradient_weights)


def test_degenerate_identical_tasks_give_finite_equal_weights():
    model = SharedBottom(1)
    losses, z = model.losses(*batch(1))
    duplicated = {"a": losses["task0"], "b": losses["task0"] * 1.0}
    info = IMTLG().backward(duplicated, features=z)
    torch.testing.assert_close(info.gradient_weights, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_task_gradients_give_per_task_blocks_and_train_only_the_rest():
    model = SharedBottom(3)
    losses, _ = model.losses(*batch(3))
    shared = list(model.trunk.parameters())
    expected = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses.values()]
    blocks, info = taskbalance.task_gradients(EW(), losses, shared=model.trunk)
    for i, block in enumerate(blocks):
        torch.testing.assert_close(block, torch.stack([grads_t[i] for grads_t in expected]))
    assert all(p.grad is None for p in shared)
    plain = SharedBottom(3)
    plain_losses, _ = plain.losses(*batch(3))
    sum(plain_losses.values()).backward()
    for ours, ref in zip(model.heads.parameters(), plain.heads.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, ref.grad)
    assert info.grad_norms.shape == (3,)


def test_task_gradients_refuse_gradient_level_methods():
    model = SharedBottom(2)
    losses, _ = model.losses(*batch(2))
    with pytest.raises(ValueError, match="loss-level methods only; IMTLG"):
        taskbalance.task_gradients(IMTLG(), losses, shared=model.trunk)


def test_features_may_be_a_tuple_of_tensors():
    torch.manual_seed(0)
    branch_a = torch.nn.Linear(4, 3).double()
    branch_b = torch.nn.Linear(4, 2).double()
    heads = [torch.nn.Linear(5, 1).double() for _ in range(3)]
    x = torch.randn(6, 4, dtype=torch.float64)

    def losses_and_features():
        za, zb = branch_a(x), branch_b(x)
        z = torch.cat([za, zb], dim=1)
        return [head(z).pow(2).mean() * (t + 1) for t, head in enumerate(heads)], (za, zb)

    losses, (za, zb) = losses_and_features()
    rows = []
    for loss in losses:
        ga, gb = torch.autograd.grad(loss, (za, zb), retain_graph=True)
        rows.append(torch.cat([ga.flatten(), gb.flatten()]))
    jacobian = torch.stack(rows)
    info = IMTLG().backward(losses, features=(za, zb))
    torch.testing.assert_close(info.gradient_weights, imtl_g_weights(jacobian @ jacobian.T))
    combined = info.gradient_weights @ jacobian
    (expected,) = torch.autograd.grad(
        branch_a(x), branch_a.weight, combined[: za.numel()].view_as(za)
    )
    torch.testing.assert_close(branch_a.weight.grad, expected)


def test_the_record_is_not_changed_by_a_method_that_edits_its_gramian_in_place():
    class EditsGramian(taskbalance.Method):
        requires = taskbalance.Requirement.GRAMIAN
        levels = ("feature",)
        default_level = "feature"

        def shared_weights(self, losses, gramian):
            gramian.diagonal().add_(1.0)
            return torch.full_like(losses, 1.0 / len(losses))

    z = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    info = EditsGramian().backward([z[:, 0].sum(), (z * z).sum()], features=z)
    assert torch.allclose(info.cosines.diagonal(), torch.ones(2))


def test_the_step_does_not_import_the_methods_package():
    """methods/base.py offers ``method.backward`` through apply.py; apply.py needs only the
    :class:`~taskbalance.apply.Balancer` interface, so no import (not even a typing one) goes
    back from the step to the methods."""
    import ast
    import inspect

    import taskbalance.apply

    tree = ast.parse(inspect.getsource(taskbalance.apply))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {name for name in imported if name and name.startswith("taskbalance.methods")}


class _NaNWeights(taskbalance.Method):
    """A Gramian method whose solve goes wrong: its weights are not finite."""

    requires = taskbalance.Requirement.GRAMIAN
    levels = ("feature", "parameter")
    default_level = "feature"

    def shared_weights(self, losses, gramian):
        return torch.full_like(losses, float("nan"))


class _NaNHostWeights(_NaNWeights):
    def host_weights(self, losses, gramian):
        return np.full(tuple(losses.shape), np.nan)


@pytest.mark.parametrize("level", ["feature", "parameter"])
@pytest.mark.parametrize("method_type", [_NaNWeights, _NaNHostWeights])
def test_weights_that_are_not_finite_are_an_error_naming_the_method(method_type, level):
    """At parameter level nothing is written; the feature level's one backward has passed the
    heads when the method runs, so the shared part gets nothing and the error says so."""
    model = SharedBottom(2)
    losses, z = model.losses(*batch(2))
    expected = rf"{method_type.__name__} produced invalid weights"
    with pytest.raises(RuntimeError, match=expected) as raised:
        method_type(level=level).backward(losses, shared=model.trunk, features=z)
    assert all(p.grad is None for p in model.trunk.parameters())
    if level == "parameter":
        assert all(p.grad is None for p in model.parameters())
    else:
        assert "zero the gradients" in " ".join(raised.value.__notes__)


def test_the_record_keeps_the_gramians_dtype_and_matches_autograd():
    model = SharedBottom(3, dtype=torch.float32)
    losses, z = model.losses(*batch(3, dtype=torch.float32))
    rows = torch.stack(
        [torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in losses.values()]
    ).double()
    info = IMTLG().backward(losses, features=z)
    norms = rows.norm(dim=1)
    record = (info.grad_norms, info.cosines, info.gradient_weights)
    assert {value.dtype for value in record} == {torch.float32}
    torch.testing.assert_close(info.grad_norms.double(), norms, rtol=1e-5, atol=0)
    cosines = (rows @ rows.T) / torch.outer(norms, norms)
    torch.testing.assert_close(info.cosines.double(), cosines, rtol=1e-5, atol=1e-6)


def test_a_jacobian_method_refuses_non_finite_per_task_gradients():
    """Found from the Gramian's diagonal (a NaN or an infinity in a row reaches its square)."""
    w = torch.zeros(2, requires_grad=True)
    losses = {"a": w.sqrt().sum(), "b": w.sum()}  # finite losses, infinite gradient of 'a'
    with pytest.raises(FloatingPointError, match="not finite"):
        taskbalance.get_method("moco", tasks=2).backward(losses, shared=[w])
    assert w.grad is None
