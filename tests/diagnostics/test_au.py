"""The AU diagnostic: task dominance under plain Adam, balance under AdaTask, agreement with an
independent computation, sampling and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from taskbalance.diagnostics import AdamAU, AUTracker
from taskbalance.optim import AdaTaskAdam

STEPS = 60


def _dominated_gradients(steps: int = STEPS, seed: int = 0):
    """Two tasks on two shared parameters; task 1's gradients are 100x larger."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 100.0], dtype=torch.float64)
    return [
        [
            scale.reshape(2, 1) * (torch.randn(2, 6, generator=gen, dtype=torch.float64) + 0.5),
            scale.reshape(2, 1, 1) * torch.randn(2, 3, 2, generator=gen, dtype=torch.float64),
        ]
        for _ in range(steps)
    ]


def _params():
    return [
        torch.nn.Parameter(torch.zeros(6, dtype=torch.float64)),
        torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64)),
    ]


def _adam_shares(every: int = 1) -> AdamAU:
    params = _params()
    adam = torch.optim.Adam(params, lr=1e-2)
    au = AdamAU(adam, params, names=["a", "b"], every=every)
    for blocks in _dominated_gradients():
        for param, block in zip(params, blocks, strict=True):
            param.grad = block.sum(0)
        adam.step()
        au.observe(blocks)
    return au


def _adatask_tracker() -> AUTracker:
    params = _params()
    opt = AdaTaskAdam(params, lr=1e-2, shared=True)
    tracker = opt.track_au()
    for blocks in _dominated_gradients():
        opt.set_task_grads(blocks)
        opt.step()
    return tracker


def test_plain_adam_shows_the_large_task_dominating_every_layer():
    shares = _adam_shares().tracker.shares()
    for layer in ("a", "b"):
        assert shares[layer][1] > 0.99


def test_adatask_shows_balanced_shares():
    shares = _adatask_tracker().shares()
    assert set(shares) == {"shared.0", "shared.1"}
    for share in shares.values():
        assert 0.3 < share[0] < 0.7


@pytest.mark.parametrize("source", ["adam", "adatask"])
def test_shares_sum_to_one(source):
    tracker = _adam_shares().tracker if source == "adam" else _adatask_tracker()
    for share in tracker.shares().values():
        assert share.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert tracker.total_shares().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_adam_per_task_first_moments_sum_to_adams_own():
    params = _params()
    adam = torch.optim.Adam(params, lr=1e-2)
    au = AdamAU(adam, params)
    for blocks in _dominated_gradients(steps=10):
        for param, block in zip(params, blocks, strict=True):
            param.grad = block.sum(0)
        adam.step()
        au.observe(blocks)
    for param in params:
        torch.testing.assert_close(au.means[id(param)].sum(0), adam.state[param]["exp_avg"])


def test_adam_au_of_a_single_task_is_the_average_squared_update():
    """With one task its part is the whole update, measured on the parameter itself."""
    param = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    adam = torch.optim.Adam([param], lr=0.05)
    au = AdamAU(adam, [param], beta=0.5)
    average, gen = 0.0, torch.Generator().manual_seed(1)
    for _ in range(5):
        block = torch.randn(1, 4, generator=gen, dtype=torch.float64)
        before = param.detach().clone()
        param.grad = block[0]
        adam.step()
        au.observe([block])
        average = 0.5 * average + 0.5 * float((param.detach() - before).pow(2).sum())
    expected = average / (1 - 0.5**5)
    assert au.tracker.values()["shared.0"].item() == pytest.approx(expected, rel=1e-10)
    assert au.tracker.shares()["shared.0"].tolist() == [1.0]


def test_adatask_au_equals_each_task_term_from_the_optimizer_state():
    param = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = AdaTaskAdam([param], lr=0.1, shared=True)
    tracker = opt.track_au(beta=0.0)  # beta 0: the AU is the last sample
    for blocks in _dominated_gradients(steps=3):
        opt.set_task_grads([blocks[0][:, :5]])
        opt.step()
    state = opt.state[param]
    step = float(state["step"])
    m_hat = state["exp_avg"] / (1 - 0.9**step)
    v_hat = state["exp_avg_sq"] / (1 - 0.999**step)
    terms = 0.1 * m_hat / (v_hat.sqrt() + 1e-8)
    torch.testing.assert_close(tracker.values()["shared.0"], terms.pow(2).sum(dim=1))


def test_sampling_every_k_steps_counts_only_sampled_steps():
    au = _adam_shares(every=7)
    assert au.tracker.steps == STEPS
    assert au.tracker._samples["a"] == len(range(0, STEPS, 7))


def test_zero_updates_give_equal_shares_not_nan():
    tracker = AUTracker()
    tracker.tick()
    tracker.update("layer", torch.zeros(3))
    assert tracker.shares()["layer"].tolist() == pytest.approx([1 / 3] * 3)


def test_tracker_rejects_a_changing_number_of_tasks_naming_the_layer():
    tracker = AUTracker()
    tracker.update("trunk.0", torch.ones(2))
    with pytest.raises(ValueError, match=r"trunk\.0"):
        tracker.update("trunk.0", torch.ones(3))


def test_state_dict_round_trip_continues_identically():
    params = _params()
    adam = torch.optim.Adam(params, lr=1e-2)
    au = AdamAU(adam, params, every=2)
    gradients = _dominated_gradients(steps=10)

    def run(optimizer, observer, chunk):
        for blocks in chunk:
            for param, block in zip(observer.shared, blocks, strict=True):
                param.grad = block.sum(0)
            optimizer.step()
            observer.observe(blocks)

    run(adam, au, gradients[:5])
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy((adam.state_dict(), au.state_dict()))
    run(adam, au, gradients[5:])

    params2 = [torch.nn.Parameter(p.clone()) for p in saved_params]
    adam2 = torch.optim.Adam(params2, lr=1e-2)
    adam2.load_state_dict(saved[0])
    au2 = AdamAU(adam2, params2, every=2)
    au2.load_state_dict(saved[1])
    run(adam2, au2, gradients[5:])
    for layer, value in au.tracker.values().items():
        torch.testing.assert_close(au2.tracker.values()[layer], value, rtol=0, atol=0)
