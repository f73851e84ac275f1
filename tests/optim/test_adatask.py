"""AdaTask optimizers: reduction to torch's optimizers, the per-task sum, scale invariance,
None gradients, weight decay by hand, checkpoints, cost and bad input."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch

from support.models import SharedBottom, batch
from taskbalance import IMTLL
from taskbalance.optim import AdaTaskAdagrad, AdaTaskAdam, AdaTaskRMSprop

LR = 1e-2

# (AdaTask class, its options, the torch optimizer it must equal with one task, its options)
EQUIVALENT = {
    "adam": (AdaTaskAdam, {}, torch.optim.Adam, {}),
    "adamw": (AdaTaskAdam, {"weight_decay": 0.1}, torch.optim.AdamW, {"weight_decay": 0.1}),
    "adam_l2": (
        AdaTaskAdam,
        {"weight_decay": 0.1, "decoupled_weight_decay": False},
        torch.optim.Adam,
        {"weight_decay": 0.1},
    ),
    "rmsprop_l2": (
        AdaTaskRMSprop,
        {"alpha": 0.9, "weight_decay": 0.05, "decoupled_weight_decay": False},
        torch.optim.RMSprop,
        {"alpha": 0.9, "eps": 1e-8, "weight_decay": 0.05},
    ),
    "adagrad_l2": (
        AdaTaskAdagrad,
        {
            "lr_decay": 0.01,
            "initial_accumulator_value": 0.1,
            "weight_decay": 0.05,
            "decoupled_weight_decay": False,
        },
        torch.optim.Adagrad,
        {"lr_decay": 0.01, "initial_accumulator_value": 0.1, "eps": 1e-8, "weight_decay": 0.05},
    ),
}


def _groups(model: SharedBottom) -> list[dict]:
    return [
        {"params": model.trunk.parameters(), "shared": True},
        {"params": model.heads.parameters()},
    ]


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("variant", list(EQUIVALENT))
def test_one_task_equals_the_torch_optimizer_for_100_steps(variant):
    ours_cls, ours_options, torch_cls, torch_options = EQUIVALENT[variant]
    ours_model, torch_model = SharedBottom(1, seed=3), SharedBottom(1, seed=3)
    ours = ours_cls(_groups(ours_model), lr=LR, **ours_options)
    reference = torch_cls(torch_model.parameters(), lr=LR, **torch_options)
    for step in range(100):
        data = batch(1, seed=step)
        ours.zero_grad()
        ours.backward(ours_model.losses(*data)[0])
        ours.step()
        reference.zero_grad()
        sum(torch_model.losses(*data)[0].values()).backward()
        reference.step()
    for mine, theirs in zip(_params(ours_model), _params(torch_model), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    # The test can fail: the parameters really moved.
    start = _params(SharedBottom(1, seed=3))
    moved = [(a - b).abs().max() for a, b in zip(_params(ours_model), start, strict=True)]
    assert max(moved) > 1e-2


def _task_gradients(num_tasks: int, shape: tuple[int, ...], steps: int, seed: int = 0):
    """Per-task gradients with scales 1, 10, 100, ... and a drifting mean."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, num_tasks - 1, num_tasks, dtype=torch.float64)
    scales = scales.reshape(num_tasks, *([1] * len(shape)))
    return [
        scales * (torch.randn(num_tasks, *shape, generator=gen, dtype=torch.float64) + 0.1 * s)
        for s in range(steps)
    ]


@pytest.mark.parametrize(
    ("ours_cls", "torch_cls", "options"),
    [
        (AdaTaskAdam, torch.optim.Adam, {"betas": (0.8, 0.99)}),
        (AdaTaskRMSprop, torch.optim.RMSprop, {"alpha": 0.95, "eps": 1e-8}),
        (AdaTaskAdagrad, torch.optim.Adagrad, {"eps": 1e-8}),
    ],
)
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_shared_update_is_the_sum_of_independent_optimizers_directions(
    ours_cls, torch_cls, options, num_tasks
):
    start = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    shared = torch.nn.Parameter(start.clone())
    ours = ours_cls([shared], lr=LR, shared=True, **options)
    copies = [torch.nn.Parameter(start.clone()) for _ in range(num_tasks)]
    singles = [torch_cls([p], lr=LR, **options) for p in copies]
    for grads in _task_gradients(num_tasks, (4, 3), steps=30):
        ours.set_task_grads([grads])
        ours.step()
        for task, (param, single) in enumerate(zip(copies, singles, strict=True)):
            param.grad = grads[task].clone()
            single.step()
        # Without weight decay each update is independent of the parameter's value.
        expected = start + sum(p.detach() - start for p in copies)
        torch.testing.assert_close(shared.detach(), expected, rtol=0, atol=1e-10)


def test_heads_follow_plain_adam_on_the_sum_of_the_losses():
    # The heads' gradient is that of sum_t L_t given the trunk of the step.
    model, reference_model = SharedBottom(3), SharedBottom(3)
    opt = AdaTaskAdam(_groups(model), lr=LR)
    reference = torch.optim.Adam(reference_model.heads.parameters(), lr=LR)
    for step in range(10):
        data = batch(3, seed=step)
        reference_model.trunk.load_state_dict(model.trunk.state_dict())
        reference.zero_grad()
        sum(reference_model.losses(*data)[0].values()).backward()
        reference.step()
        opt.zero_grad()
        opt.backward(model.losses(*data)[0])
        opt.step()
    for mine, theirs in zip(
        model.heads.parameters(), reference_model.heads.parameters(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


def _run(scales: list[float], eps: float, steps: int = 20) -> list[torch.Tensor]:
    model = SharedBottom(3, seed=5)
    opt = AdaTaskAdam(_groups(model), lr=LR, eps=eps)
    for step in range(steps):
        opt.zero_grad()
        opt.backward(model.losses(*batch(3, seed=step), scales=scales)[0])
        opt.step()
    return [p.detach().clone() for p in model.trunk.parameters()]


def test_scaling_one_task_loss_leaves_the_shared_trajectory_unchanged_with_zero_eps():
    baseline = _run([1.0, 1.0, 1.0], eps=0.0)
    for scale in (1e-3, 1e3):
        for mine, theirs in zip(_run([1.0, scale, 1.0], eps=0.0), baseline, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)


def test_scaling_one_task_loss_changes_the_shared_update_only_up_to_eps():
    baseline = _run([1.0, 1.0, 1.0], eps=1e-8, steps=1)
    start = [p.detach().clone() for p in SharedBottom(3, seed=5).trunk.parameters()]
    scaled = _run([1.0, 1e3, 1.0], eps=1e-8, steps=1)
    for mine, theirs, first in zip(scaled, baseline, start, strict=True):
        # One step moves each coordinate by up to T * lr; eps perturbs it by ~ lr * eps / |g|.
        assert (theirs - first).abs().max() > 0.5 * LR
        torch.testing.assert_close(mine - first, theirs - first, rtol=0, atol=1e-5 * LR)


def test_plain_adam_is_not_invariant_to_a_task_loss_scale():
    """The control for the two tests above: the property is AdaTask's, not the model's."""

    def plain(scales):
        model = SharedBottom(3, seed=5)
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        for step in range(20):
            opt.zero_grad()
            sum(model.losses(*batch(3, seed=step), scales=scales)[0].values()).backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.trunk.parameters()])

    assert (plain([1.0, 1e3, 1.0]) - plain([1.0, 1.0, 1.0])).abs().max() > 1e-3


def test_none_task_gradient_counts_as_zero():
    grads = _task_gradients(3, (5,), steps=6)
    with_none = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    with_zeros = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt_none = AdaTaskAdam([with_none], lr=LR, shared=True)
    opt_zeros = AdaTaskAdam([with_zeros], lr=LR, shared=True)
    for step, block in enumerate(grads):
        missing = step % 3
        opt_none.set_task_grads([[None if t == missing else block[t] for t in range(3)]])
        block = block.clone()
        block[missing] = 0
        opt_zeros.set_task_grads([block])
        opt_none.step()
        opt_zeros.step()
    torch.testing.assert_close(with_none.detach(), with_zeros.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("eps", [1e-8, 0.0])
@pytest.mark.parametrize("cls", [AdaTaskAdam, AdaTaskRMSprop, AdaTaskAdagrad])
def test_a_task_that_never_reaches_a_parameter_contributes_nothing(cls, eps):
    grads = _task_gradients(2, (5,), steps=8)
    three = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    two = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt_three = cls([three], lr=LR, eps=eps, shared=True)
    opt_two = cls([two], lr=LR, eps=eps, shared=True)
    for block in grads:
        opt_three.set_task_grads([[block[0], None, block[1]]])
        opt_two.set_task_grads([block])
        opt_three.step()
        opt_two.step()
    assert torch.isfinite(three).all()
    torch.testing.assert_close(three.detach(), two.detach(), rtol=0, atol=0)


def test_shared_parameter_reached_by_no_task_warns_once_and_stays():
    used = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = AdaTaskAdam([used, unused], lr=LR, shared=True, weight_decay=0.1)
    losses = lambda: [used.sum(), (2 * used).sum()]  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            opt.backward(losses())
            opt.step()
    messages = [str(w.message) for w in caught if "reached by no task" in str(w.message)]
    assert len(messages) == 1 and "shared.1" in messages[0]
    assert torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64))
    assert (used.detach() != 1).all()


def _checkpoint_round_trip(cls):
    def make():
        model = SharedBottom(3, seed=2)
        return model, cls(_groups(model), lr=LR, weight_decay=0.01)

    def train(model, opt, steps):
        for step in steps:
            opt.zero_grad()
            opt.backward(model.losses(*batch(3, seed=step))[0])
            opt.step()

    model, opt = make()
    train(model, opt, range(5))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, range(5, 10))

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model, resumed_opt = make()
    resumed_model.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed_model, resumed_opt, range(5, 10))
    return model, opt, resumed_model, resumed_opt


@pytest.mark.parametrize("cls", [AdaTaskAdam, AdaTaskRMSprop, AdaTaskAdagrad])
def test_state_dict_round_trip_continues_identically(cls):
    model, _, resumed_model, resumed_opt = _checkpoint_round_trip(cls)
    for mine, theirs in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    weight = resumed_model.trunk[0].weight
    state = resumed_opt.state[weight]
    assert float(state["step"]) == 10
    assert all(state[key].shape == (3, *weight.shape) for key in cls._state_keys)
    head_state = resumed_opt.state[resumed_model.heads[0].weight]
    assert all(
        head_state[key].shape == resumed_model.heads[0].weight.shape for key in cls._state_keys
    )


def test_state_dict_holds_one_step_counter_per_parameter_and_the_shared_flag():
    model = SharedBottom(2)
    opt = AdaTaskAdam(_groups(model))
    opt.zero_grad()
    opt.backward(model.losses(*batch(2))[0])
    opt.step()
    saved = opt.state_dict()
    assert [g["shared"] for g in saved["param_groups"]] == [True, False]
    assert all(float(s["step"]) == 1 for s in saved["state"].values())
    assert len(saved["state"]) == len(list(model.parameters()))


def _hand_adam(p, grads, lr, betas, eps, decay, decoupled):
    """AdaTask Adam written out per task and per step, in plain Python floats."""
    num_tasks = len(grads[0])
    m = [0.0] * num_tasks
    v = [0.0] * num_tasks
    for t, step_grads in enumerate(grads, start=1):
        if decoupled:
            p = p * (1 - lr * decay)
        direction = 0.0
        for k in range(num_tasks):
            g = step_grads[k] + (0.0 if decoupled else decay * p / num_tasks)
            m[k] = betas[0] * m[k] + (1 - betas[0]) * g
            v[k] = betas[1] * v[k] + (1 - betas[1]) * g * g
            m_hat = m[k] / (1 - betas[0] ** t)
            v_hat = v[k] / (1 - betas[1] ** t)
            direction += m_hat / (math.sqrt(v_hat) + eps)
        p = p - lr * direction
    return p


@pytest.mark.parametrize("decoupled", [True, False])
def test_adam_weight_decay_matches_a_hand_computation(decoupled):
    grads = [[0.3, -2.0], [0.1, 5.0], [-0.4, 1.0]]
    param = torch.nn.Parameter(torch.tensor([1.5], dtype=torch.float64))
    opt = AdaTaskAdam(
        [param], lr=0.1, shared=True, weight_decay=0.2, decoupled_weight_decay=decoupled
    )
    for step_grads in grads:
        opt.set_task_grads([torch.tensor(step_grads, dtype=torch.float64).reshape(2, 1)])
        opt.step()
    expected = _hand_adam(1.5, grads, 0.1, (0.9, 0.999), 1e-8, 0.2, decoupled)
    assert param.item() == pytest.approx(expected, rel=1e-12)
    other = _hand_adam(1.5, grads, 0.1, (0.9, 0.999), 1e-8, 0.2, not decoupled)
    assert abs(expected - other) > 1e-4  # the two modes differ, so the test can tell them apart


@pytest.mark.parametrize("decoupled", [True, False])
def test_rmsprop_and_adagrad_weight_decay_match_a_hand_computation(decoupled):
    grads = [[0.3, -2.0], [0.1, 5.0]]
    lr, decay, eps = 0.1, 0.2, 1e-8
    for cls, accumulate in [
        (AdaTaskRMSprop, lambda s, g: 0.99 * s + 0.01 * g * g),
        (AdaTaskAdagrad, lambda s, g: s + g * g),
    ]:
        param = torch.nn.Parameter(torch.tensor([1.5], dtype=torch.float64))
        opt = cls([param], lr=lr, shared=True, weight_decay=decay, decoupled_weight_decay=decoupled)
        p, sums = 1.5, [0.0, 0.0]
        for step_grads in grads:
            opt.set_task_grads([torch.tensor(step_grads, dtype=torch.float64).reshape(2, 1)])
            opt.step()
            if decoupled:
                p *= 1 - lr * decay
            direction = 0.0
            for k, g in enumerate(step_grads):
                g = g if decoupled else g + decay * p / 2
                sums[k] = accumulate(sums[k], g)
                direction += g / (math.sqrt(sums[k]) + eps)
            p -= lr * direction
        assert param.item() == pytest.approx(p, rel=1e-12), cls.__name__


def test_backward_spends_exactly_t_trunk_passes():
    num_tasks = 3
    model = SharedBottom(num_tasks)
    calls = [0] * len(list(model.trunk.parameters()))

    def count(index: int):
        def hook(grad):
            calls[index] += 1

        return hook

    for i, p in enumerate(model.trunk.parameters()):
        p.register_hook(count(i))
    opt = AdaTaskAdam(_groups(model))
    opt.zero_grad()
    opt.backward(model.losses(*batch(num_tasks))[0])
    assert set(calls) == {num_tasks}  # one per task, none for the heads' backward
    assert all(p.grad is None for p in model.trunk.parameters())
    assert all(p.grad is not None for p in model.heads.parameters())


def test_composes_with_a_loss_weighting_method():
    """IMTL-L: the per-task gradients are those of exp(s_t) L_t and its scales are trained."""
    model = SharedBottom(2)
    method = IMTLL(tasks=2)
    with torch.no_grad():
        method.scales.copy_(torch.tensor([0.0, math.log(4.0)]))
    opt = AdaTaskAdam([*_groups(model), method.param_group()], lr=LR)
    losses, _ = model.losses(*batch(2))
    blocks = [
        torch.stack(
            [torch.autograd.grad(loss, p, retain_graph=True)[0] for loss in losses.values()]
        )
        for p in model.trunk.parameters()
    ]
    opt.zero_grad()
    info = opt.backward(losses, method=method)
    pending = [opt._pending[id(p)] for p in model.trunk.parameters()]
    weights = torch.tensor([1.0, 4.0], dtype=torch.float64)
    for mine, plain in zip(pending, blocks, strict=True):
        torch.testing.assert_close(mine, torch.einsum("t,t...->t...", weights, plain))
    assert method.scales.grad is not None
    torch.testing.assert_close(info.loss_weights, torch.tensor([1.0, 4.0]), check_dtype=False)
    opt.step()
    assert (method.scales.detach() != torch.tensor([0.0, math.log(4.0)])).all()


def test_given_gradients_are_left_intact_unless_consumed():
    grads = _task_gradients(3, (4,), steps=3)
    kept = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    consumed = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt_kept = AdaTaskAdam([kept], lr=LR, shared=True)
    opt_consumed = AdaTaskAdam([consumed], lr=LR, shared=True)
    for block in grads:
        original = block.clone()
        opt_kept.set_task_grads([block])
        opt_kept.step()
        assert torch.equal(block, original)
        opt_consumed.set_task_grads([block], consume=True)
        opt_consumed.step()
    torch.testing.assert_close(kept.detach(), consumed.detach(), rtol=0, atol=0)


def test_backward_accumulates_until_zero_grad():
    param = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = AdaTaskAdam([param], shared=True)
    opt.backward([param.sum(), (3 * param).sum()])
    opt.backward([param.sum(), (3 * param).sum()])
    torch.testing.assert_close(
        opt._pending[id(param)], torch.tensor([[2.0, 2.0], [6.0, 6.0]], dtype=torch.float64)
    )
    opt.zero_grad()
    assert not opt._pending


# -- bad input --------------------------------------------------------------------------------


def test_wrong_shape_names_the_parameter():
    model = SharedBottom(2)
    opt = AdaTaskAdam(list(model.trunk.named_parameters()), shared=True)
    blocks = [torch.zeros(2, *p.shape, dtype=torch.float64) for p in model.trunk.parameters()]
    blocks[1] = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'0.bias'.*shape \(2, 3\)"):
        opt.set_task_grads(blocks)


def test_changing_the_number_of_tasks_between_steps_is_an_error():
    param = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = AdaTaskAdam([param], shared=True)
    opt.set_task_grads([torch.ones(2, 3, dtype=torch.float64)])
    opt.step()
    with pytest.raises(ValueError, match="3 tasks, expected 2"):
        opt.set_task_grads([torch.ones(3, 3, dtype=torch.float64)])


def test_changing_the_number_of_tasks_after_loading_a_checkpoint_is_an_error():
    param = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = AdaTaskAdam([param], shared=True)
    opt.set_task_grads([torch.ones(2, 3, dtype=torch.float64)])
    opt.step()
    fresh = AdaTaskAdam([param], shared=True)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    with pytest.raises(ValueError, match="3 tasks, expected 2"):
        fresh.set_task_grads([torch.ones(3, 3, dtype=torch.float64)])


def test_wrong_number_of_blocks_is_an_error():
    opt = AdaTaskAdam([torch.nn.Parameter(torch.ones(3))], shared=True)
    with pytest.raises(ValueError, match="2 parameters, but the optimizer has 1"):
        opt.set_task_grads([torch.ones(2, 3), torch.ones(2, 3)])


def test_ordinary_backward_on_a_shared_parameter_is_an_error():
    model = SharedBottom(2)
    opt = AdaTaskAdam(_groups(model))
    sum(model.losses(*batch(2))[0].values()).backward()
    with pytest.raises(RuntimeError, match=r"opt\.backward"):
        opt.step()


def test_backward_without_shared_parameters_is_an_error():
    model = SharedBottom(2)
    opt = AdaTaskAdam(model.parameters())
    with pytest.raises(ValueError, match="'shared': True"):
        opt.backward(model.losses(*batch(2))[0])


def test_non_bool_shared_flag_is_an_error():
    with pytest.raises(TypeError, match="shared"):
        AdaTaskAdam([{"params": [torch.nn.Parameter(torch.ones(1))], "shared": "yes"}])


def test_step_without_any_gradient_does_nothing():
    param = torch.nn.Parameter(torch.ones(2))
    AdaTaskAdam([param], shared=True).step()
    assert torch.equal(param.detach(), torch.ones(2))
