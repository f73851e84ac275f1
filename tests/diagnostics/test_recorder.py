"""The recorder: each diagnostic against an independent computation, no backward pass, sampling,
the tidy table, checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch

import taskbalance
from support.models import SharedBottom, batch
from taskbalance import EW, IMTLG
from taskbalance.diagnostics import COLUMNS, Recorder, conflict_rate, plot_recorder
from taskbalance.optim import AdaTaskAdam


def _jacobian(losses, shared):
    return torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses.values()
        ]
    )


def _values(recorder, metric):
    return torch.tensor([r["value"] for r in recorder.records(metric)], dtype=torch.float64)


def test_each_diagnostic_equals_an_independent_computation():
    model = SharedBottom(4, seed=1)
    losses, _ = model.losses(*batch(4))
    shared = list(model.trunk.parameters())
    jacobian = _jacobian(losses, shared)
    info = IMTLG(level="parameter").backward(losses, shared=model.trunk)
    recorder = Recorder()
    recorder.observe(info, step=0)

    values = torch.stack([loss.detach() for loss in losses.values()])
    norms = jacobian.norm(dim=1)
    units = jacobian / norms[:, None]
    update = torch.cat([p.grad.flatten() for p in shared])  # what the step really applied
    torch.testing.assert_close(_values(recorder, "loss"), values)
    torch.testing.assert_close(_values(recorder, "grad_norm"), norms)
    torch.testing.assert_close(_values(recorder, "r"), values / norms)
    torch.testing.assert_close(_values(recorder, "projection"), units @ update)
    cosines = units @ units.T
    pairs = [(t, s) for t in range(4) for s in range(t + 1, 4)]
    torch.testing.assert_close(
        _values(recorder, "cosine"), torch.stack([cosines[t, s] for t, s in pairs])
    )
    negatives = sum(bool(cosines[t, s] < 0) for t, s in pairs)
    assert recorder.records("conflict_rate")[0]["value"] == pytest.approx(negatives / 6)
    r = values / norms
    assert recorder.records("r_spread")[0]["value"] == pytest.approx(
        float(r.std(correction=0) / r.mean())
    )
    assert [r["task"] for r in recorder.records("loss")] == list(losses)


def test_loss_level_step_with_blocks_projects_the_plain_sum():
    model = SharedBottom(3)
    losses, _ = model.losses(*batch(3))
    shared = list(model.trunk.parameters())
    jacobian = _jacobian(losses, shared)
    blocks, info = taskbalance.task_gradients(EW(), losses, shared)
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    torch.testing.assert_close(info.cosines, units @ units.T)
    recorder = Recorder()
    recorder.observe(info, blocks=blocks)
    torch.testing.assert_close(_values(recorder, "projection"), units @ jacobian.sum(dim=0))
    assert len(recorder.records("cosine")) == 3


def test_loss_level_step_without_gradients_records_only_losses_and_weights():
    model = SharedBottom(2)
    info = EW().backward(model.losses(*batch(2))[0])
    recorder = Recorder()
    recorder.observe(info)
    assert {r["metric"] for r in recorder.records()} == {"loss", "loss_weight", "weight"}


def test_observing_adds_no_backward_pass_and_leaves_grad_untouched():
    model = SharedBottom(3)
    losses, _ = model.losses(*batch(3))
    info = IMTLG(level="parameter").backward(losses, shared=model.trunk)  # graph freed
    before = [p.grad.clone() for p in model.parameters()]
    calls = []
    for p in model.parameters():
        p.register_hook(lambda g: calls.append(1))
    recorder = Recorder()
    recorder.observe(info)
    assert calls == []
    for p, grad in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad, grad)


def test_samples_every_k_steps():
    model = SharedBottom(2)
    recorder = Recorder(every=3)
    recorded = []
    for step in range(10):
        losses, _ = model.losses(*batch(2, seed=step))
        info = EW().backward(losses)
        recorded.append(recorder.observe(info, step))
    assert [s for s, yes in enumerate(recorded) if yes] == [0, 3, 6, 9]
    assert sorted({r["step"] for r in recorder.records()}) == [0, 3, 6, 9]


def test_zero_gradient_task_has_infinite_r_and_a_finite_spread():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    v = torch.ones(1, dtype=torch.float64, requires_grad=True)
    losses = [(w * w).sum(), ((w - 2) ** 2).sum() * 3, (v * 0).sum() + (w * 0).sum() + 1.0]
    info = IMTLG(level="parameter").backward(losses, shared=[w])
    recorder = Recorder()
    recorder.observe(info)
    r = _values(recorder, "r")
    assert math.isinf(r[2]) and torch.isfinite(r[:2]).all()
    assert math.isfinite(recorder.records("r_spread")[0]["value"])
    assert _values(recorder, "projection")[2] == 0


def test_conflict_rate_counts_pairs_with_negative_cosine():
    cosines = torch.tensor([[1.0, -0.5, 0.2], [-0.5, 1.0, -0.1], [0.2, -0.1, 1.0]])
    assert conflict_rate(cosines) == pytest.approx(2 / 3)
    assert conflict_rate(torch.ones(1, 1)) == 0.0


def test_records_au_shares_of_an_adatask_optimizer():
    model = SharedBottom(2)
    opt = AdaTaskAdam(
        [
            {"params": list(model.trunk.named_parameters()), "shared": True},
            {"params": list(model.heads.named_parameters())},
        ]
    )
    recorder = Recorder(every=2, au=opt.track_au(every=2))
    for step in range(4):
        opt.zero_grad()
        info = opt.backward(model.losses(*batch(2, seed=step))[0])
        opt.step()
        recorder.observe(info, step)
    layers = {r["layer"] for r in recorder.records("au_share")}
    assert layers == {"0.weight", "0.bias", "2.weight", "2.bias", "*"}
    for layer in layers:
        last = [r for r in recorder.records("au_share", layer=layer) if r["step"] == 2]
        assert sum(r["value"] for r in last) == pytest.approx(1.0)
        assert [r["task"] for r in last] == ["task0", "task1"]


def test_table_has_tidy_columns_and_a_dataframe():
    model = SharedBottom(2)
    recorder = Recorder()
    recorder.observe(IMTLG().backward(*_losses_and_z(model)))
    assert all(tuple(r) == COLUMNS for r in recorder.records())
    pd = pytest.importorskip("pandas")
    frame = recorder.to_dataframe()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(COLUMNS)
    assert len(frame) == len(recorder)


def _losses_and_z(model):
    losses, z = model.losses(*batch(2))
    return losses, None, z


def test_state_dict_survives_a_checkpoint_and_continues():
    model = SharedBottom(2)
    recorder = Recorder(every=2)
    for step in range(3):
        recorder.observe(EW().backward(model.losses(*batch(2, seed=step))[0]))
    buffer = io.BytesIO()
    torch.save(recorder.state_dict(), buffer)
    buffer.seek(0)
    resumed = Recorder()
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.records() == recorder.records() and resumed.every == 2
    info = EW().backward(model.losses(*batch(2, seed=3))[0])
    assert resumed.observe(info) is False  # call 3: not due, as for the original
    assert resumed.observe(info) is True  # call 4


def test_summary_gives_last_and_mean_per_task():
    model = SharedBottom(2)
    recorder = Recorder()
    values = []
    for step in range(3):
        losses, _ = model.losses(*batch(2, seed=step))
        values.append(losses["task1"].item())
        recorder.observe(EW().backward(losses))
    entry = recorder.summary()["loss"]["task1"]
    assert entry["last"] == pytest.approx(values[-1])
    assert entry["mean"] == pytest.approx(sum(values) / 3)


def test_plot_draws_the_four_panels(tmp_path):
    pytest.importorskip("matplotlib")
    model = SharedBottom(2)
    recorder = Recorder()
    for step in range(3):
        losses, _ = model.losses(*batch(2, seed=step))
        recorder.observe(IMTLG(level="parameter").backward(losses, shared=model.trunk))
    figure = plot_recorder(recorder, tmp_path / "diagnostics.png")
    assert len(figure.axes) == 4 and (tmp_path / "diagnostics.png").exists()


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="every"):
        Recorder(every=0)
