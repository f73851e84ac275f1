"""The runner: determinism, bit-for-bit resume, selection on validation only, divergence."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from taskbalance.bench.checkpoints import (
    CheckpointMismatchError,
    DamagedCheckpointWarning,
    save_checkpoint,
)
from taskbalance.bench.data.types import MultiTaskData, Split, TaskSpec
from taskbalance.bench.method_specs import MethodSpec, parse_method_spec
from taskbalance.bench.run_config import RunConfig
from taskbalance.bench.runner import Runner
from taskbalance.optim import AdaTaskAdam

SMALL = {"hidden": 16, "tower": 8}


def synthetic(n: int = 64, seed: int = 0) -> MultiTaskData:
    """Two regression tasks of different scales and a binary task, 3 splits (synthetic)."""
    g = torch.Generator().manual_seed(seed)

    def split(rows: int) -> Split:
        x = torch.randn(rows, 5, generator=g)
        y = {
            "small": x[:, 0] * 0.1 + 0.05 * torch.randn(rows, generator=g),
            "large": 3 * x[:, 1] - x[:, 2] + 0.3 * torch.randn(rows, generator=g),
            "flag": (x[:, 3] + 0.5 * torch.randn(rows, generator=g) > 0).float(),
        }
        return Split(x, y)

    tasks = (
        TaskSpec("small", "regression", 1, "mae", False),
        TaskSpec("large", "regression", 1, "mae", False),
        TaskSpec("flag", "binary", 1, "auc", True),
    )
    return MultiTaskData(
        "synthetic",
        tasks,
        split(n),
        split(n // 2),
        split(n // 2),
        "synthetic",
        "none",
        target_stats={"small": (0.0, 2.0), "large": (1.0, 1.0)},
    )


def config(method: str = "ew", **kw) -> RunConfig:
    base = {"epochs": 3, "batch_size": 16, "model_options": SMALL, "lr": 3e-3}
    return RunConfig(method=parse_method_spec(method), **{**base, **kw})


def without_times(history):
    return [{k: v for k, v in h.items() if k not in ("step_ms", "train_seconds")} for h in history]


def test_same_seed_gives_identical_runs_on_cpu():
    data = synthetic()
    a = Runner(data, config("imtl"), progress=False)
    b = Runner(data, config("imtl"), progress=False)
    ra, rb = a.run(), b.run()
    assert without_times(ra.history) == without_times(rb.history)
    assert ra.test_metrics == rb.test_metrics
    for (ka, va), (kb, vb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)


def test_another_seed_gives_another_run():
    data = synthetic()
    ra = Runner(data, config("ew", seed=0), progress=False).run()
    rb = Runner(data, config("ew", seed=1), progress=False).run()
    assert ra.test_metrics != rb.test_metrics


class Interrupt(Exception):
    pass


def interrupted_after_two(data, run_config: RunConfig, path) -> None:
    """Train ``run_config`` with checkpoints at ``path`` and stop it after its second epoch."""

    def stop_after_two(runner: Runner) -> None:
        if runner.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        Runner(data, run_config, checkpoint=path, progress=False).run(stop_after_two)


@pytest.mark.parametrize("method", ["imtl", "rlw", "adatask:base=imtl_l"])
def test_an_interrupted_run_resumes_to_bit_identical_results(tmp_path, method):
    data = synthetic()
    full = Runner(data, config(method), checkpoint=tmp_path / "full.pt", progress=False)
    expected = full.run()
    path = tmp_path / "cut.pt"
    interrupted_after_two(data, config(method), path)
    resumed = Runner(data, config(method), checkpoint=path, resume=True, progress=False)
    assert resumed.epoch == 2
    got = resumed.run()
    assert without_times(got.history) == without_times(expected.history)
    assert got.test_metrics == expected.test_metrics and got.best_epoch == expected.best_epoch
    state, want = resumed.model.state_dict(), full.model.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)
    method_state, method_want = resumed.method.state_dict(), full.method.state_dict()
    assert all(
        torch.equal(method_state[k], method_want[k])
        for k in method_want
        if isinstance(method_want[k], torch.Tensor)
    )


def test_a_finished_checkpoint_is_read_back_without_training(tmp_path):
    data = synthetic()
    first = Runner(data, config(), checkpoint=tmp_path / "run.pt", progress=False).run()
    again = Runner(data, config(), checkpoint=tmp_path / "run.pt", resume=True, progress=False)
    assert again.epoch == 3 and again.run() == first


@pytest.mark.parametrize("damage", ["truncated", "empty", "one byte changed"])
def test_a_damaged_checkpoint_is_set_aside_and_the_run_trains_from_the_start(tmp_path, damage):
    data = synthetic()
    path = tmp_path / "run.pt"
    interrupted_after_two(data, config(), path)
    whole = path.read_bytes()
    if damage == "truncated":  # a full disk, an interrupted copy
        damaged = whole[: len(whole) // 2]
    elif damage == "empty":
        damaged = b""
    else:  # a bad copy: one byte of the model's weights altered (found by its CRC)
        damaged = bytearray(whole)
        damaged[whole.index(b"archive/data/0") + 200] ^= 0xFF
        damaged = bytes(damaged)
    path.write_bytes(damaged)
    (tmp_path / "run.pt.damaged").write_bytes(b"an earlier one")  # never overwritten
    lines = []
    with pytest.warns(DamagedCheckpointWarning, match=r"run\.pt: damaged checkpoint \(.+\); "
                      r"kept as run\.pt\.damaged2, ew trains from the start"):  # fmt: skip
        again = Runner(data, config(), checkpoint=path, resume=True, progress=False,
                       log=lines.append)  # fmt: skip
    assert again.epoch == 0 and lines and "run.pt.damaged2" in lines[0]
    assert (tmp_path / "run.pt.damaged2").read_bytes() == damaged
    assert (tmp_path / "run.pt.damaged").read_bytes() == b"an earlier one"
    fresh = Runner(data, config(), progress=False).run()
    got = again.run()
    assert without_times(got.history) == without_times(fresh.history)
    assert Runner(data, config(), checkpoint=path, resume=True).epoch == 3  # a whole one again


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    data = synthetic()
    Runner(data, config(epochs=1), checkpoint=tmp_path / "run.pt", progress=False).run()
    with pytest.raises(CheckpointMismatchError, match=r"run\.pt: .*another configuration"):
        Runner(data, config(lr=1e-2, epochs=1), checkpoint=tmp_path / "run.pt", resume=True)


def test_a_checkpoint_of_other_data_is_refused(tmp_path):
    data = synthetic()
    Runner(data, config(epochs=1), checkpoint=tmp_path / "run.pt", progress=False).run()
    fewer = dataclasses.replace(data, train=data.train.subset(torch.arange(len(data.train) - 1)))
    with pytest.raises(CheckpointMismatchError, match="other data"):
        Runner(fewer, config(epochs=1), checkpoint=tmp_path / "run.pt", resume=True)


def test_selection_uses_the_validation_split_only():
    data = synthetic()
    shuffled = {
        k: v[torch.randperm(len(v), generator=torch.Generator().manual_seed(3))]
        for k, v in data.test.y.items()
    }
    other_test = dataclasses.replace(data, test=Split(data.test.x * -1.0, shuffled))
    a = Runner(data, config("ew", epochs=6), progress=False).run()
    b = Runner(other_test, config("ew", epochs=6), progress=False).run()
    assert a.best_epoch == b.best_epoch
    assert without_times(a.history) == without_times(b.history)
    assert a.test_metrics != b.test_metrics


def test_the_selected_epoch_minimises_the_mean_validation_loss_and_is_what_test_reports():
    data = synthetic()
    runner = Runner(data, config("ew", epochs=6), progress=False)
    result = runner.run()
    criteria = [h["criterion"] for h in result.history]
    assert result.best_epoch == 1 + criteria.index(min(criteria))
    assert result.val_metrics == result.history[result.best_epoch - 1]["val_metric"]
    runner.model.load_state_dict(runner.best["model"])
    _, test_metrics = runner.evaluate("test")
    assert test_metrics == result.test_metrics


def test_with_a_reference_the_selected_epoch_minimises_the_validation_delta_m():
    data = synthetic()
    reference = {"small": 0.2, "large": 1.5, "flag": 0.8}
    result = Runner(data, config("ew", epochs=6, reference=reference), progress=False).run()
    # Delta m recomputed by hand from each epoch's validation metrics (AUC: higher is better).
    by_hand = [
        100
        / 3
        * sum(
            (h["val_metric"][t] - reference[t]) / reference[t] * (-1 if t == "flag" else 1)
            for t in reference
        )
        for h in result.history
    ]
    assert [h["criterion"] for h in result.history] == pytest.approx(by_hand, rel=1e-12)
    assert result.best_epoch == 1 + by_hand.index(min(by_hand))
    losses = [sum(h["val_loss"].values()) / 3 for h in result.history]
    assert by_hand != pytest.approx(losses)  # the criterion is not the loss under another name


def test_a_reference_that_misses_a_task_is_refused_with_the_tasks_named():
    expected = r"per metric \['small', 'large', 'flag'\], got \['large', 'small'\]"
    with pytest.raises(ValueError, match=expected):
        Runner(synthetic(), config(reference={"small": 1.0, "large": 1.0}), progress=False)


def test_loss_scale_multiplies_one_task_for_the_method_only():
    data = synthetic()
    scaled = Runner(data, config("ew", loss_scale={"small": 10.0}), progress=False).run()
    plain = Runner(data, config("ew"), progress=False).run()
    assert scaled.history[0]["weights"] == plain.history[0]["weights"]  # EW: weights stay 1
    assert scaled.test_metrics != plain.test_metrics
    # the criterion and train losses are unscaled: same order of magnitude as the plain run
    assert scaled.history[0]["train_loss"]["small"] < 5 * plain.history[0]["train_loss"]["small"]


def test_loss_scale_of_an_unknown_task_lists_the_tasks():
    with pytest.raises(ValueError, match="small, large, flag"):
        Runner(synthetic(), config(loss_scale={"nope": 10.0}), progress=False)


def test_a_nan_loss_is_reported_as_divergence_at_that_epoch():
    result = Runner(
        synthetic(), config("ew", loss_scale={"large": float("nan")}), progress=False
    ).run()
    assert result.status == "diverged" and result.diverged_epoch == 1
    assert result.best_epoch == 0 and result.test_metrics == {}


def test_adatask_trains_with_the_adatask_optimizer_and_single_task_runs_do_not():
    data = synthetic()
    assert isinstance(Runner(data, config("adatask"), progress=False).optimizer, AdaTaskAdam)
    single = Runner(data, config("adatask", tasks=("large",)), progress=False)
    assert type(single.optimizer) is torch.optim.Adam and single.config.label == "stl:large"


def test_stochastic_methods_get_the_run_seed():
    data = synthetic()
    a = Runner(data, config("rlw", seed=0), progress=False).method.state_dict()
    b = Runner(data, config("rlw", seed=1), progress=False).method.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor)) or (
        str(a) != str(b)
    )


def test_method_specs_parse_values_and_reject_unknown_names():
    spec = parse_method_spec("cagrad:c=0.25,level=feature")
    assert spec == MethodSpec("cagrad", {"c": 0.25, "level": "feature"})
    assert spec.label == "cagrad:c=0.25,level=feature"
    with pytest.raises(ValueError, match=r"valid: .*imtl_g"):
        parse_method_spec("imtl_x")
    with pytest.raises(ValueError, match="valid: level, c, rescale"):
        parse_method_spec("cagrad:alpha=1")
    with pytest.raises(ValueError, match="key=value"):
        parse_method_spec("cagrad:0.5")
    with pytest.raises(ValueError, match="loss-level"):
        parse_method_spec("adatask:base=imtl_g")


def test_the_recorder_samples_every_k_steps_into_the_result():
    runner = Runner(synthetic(), config("imtl_g"), progress=False, record_every=5)
    result = runner.run()
    steps = sorted({r["step"] for r in result.records})
    assert steps == [0, 5, 10]  # 3 epochs of 4 steps: steps 0..11
    spread = [r for r in result.records if r["metric"] == "r_spread"]
    assert len(spread) == 3 and all(r["value"] >= 0 for r in spread)
    assert not any(r["metric"] == "cosine" for r in result.records)  # T(T-1)/2 a sample: off


def test_loss_level_methods_record_weights_but_no_r_and_single_task_runs_nothing():
    ew = Runner(synthetic(), config("ew"), progress=False, record_every=1).run()
    metrics = {r["metric"] for r in ew.records}
    assert {"loss", "weight"} <= metrics and "r" not in metrics and "r_spread" not in metrics
    single = Runner(synthetic(), config(tasks=("large",)), progress=False, record_every=1)
    assert single.run().records == []


def test_adatask_records_au_shares_per_named_trunk_layer_summing_to_one():
    result = Runner(synthetic(), config("adatask"), progress=False, record_every=4).run()
    shares = [r for r in result.records if r["metric"] == "au_share"]
    layers = {r["layer"] for r in shares}
    assert {"*", "trunk.mlp.0.weight", "trunk.mlp.0.bias"} <= layers
    for step in {r["step"] for r in shares}:
        for layer in layers:
            total = sum(r["value"] for r in shares if r["step"] == step and r["layer"] == layer)
            assert total == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["imtl_g", "adatask"])
def test_recording_leaves_training_unchanged(method):
    plain = Runner(synthetic(), config(method), progress=False)
    recorded = Runner(synthetic(), config(method), progress=False, record_every=1)
    a, b = plain.run(), recorded.run()
    assert without_times(a.history) == without_times(b.history) and b.records
    for pa, pb in zip(plain.model.parameters(), recorded.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_an_interrupted_run_resumes_its_diagnostics_too(tmp_path):
    data = synthetic()
    full = Runner(data, config("adatask"), progress=False, record_every=3).run()

    def stop_after_one(runner: Runner) -> None:
        if runner.epoch == 1:
            raise Interrupt

    path = tmp_path / "cut.pt"
    with pytest.raises(Interrupt):
        Runner(data, config("adatask"), checkpoint=path, progress=False, record_every=3).run(
            stop_after_one
        )
    resumed = Runner(
        data, config("adatask"), checkpoint=path, resume=True, progress=False, record_every=3
    ).run()
    assert resumed.records == full.records


def test_float64_runs_train_and_evaluate_in_float64():
    runner = Runner(synthetic(), config("imtl_g", epochs=1), progress=False, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in runner.model.parameters())
    assert runner.run().status == "ok"


def test_famo_gets_the_losses_after_each_step_and_adapts(recwarn):
    runner = Runner(synthetic(), config("famo", epochs=1), progress=False)
    runner.run()
    assert not [w for w in recwarn if "update(new_losses) was not called" in str(w.message)]
    assert runner.method.logits.abs().max() > 0  # the logits moved: FAMO adapted its weights


def test_a_finished_runs_checkpoint_keeps_only_its_result_unless_asked(tmp_path):
    data = synthetic()
    slim = Runner(data, config(), checkpoint=tmp_path / "slim.pt", progress=False).run()
    full = Runner(
        data, config(), checkpoint=tmp_path / "full.pt", keep_final_state=True, progress=False
    ).run()
    assert slim.test_metrics == full.test_metrics  # the same training (times differ)
    slim_state = torch.load(tmp_path / "slim.pt", weights_only=True)
    full_state = torch.load(tmp_path / "full.pt", weights_only=True)
    assert "model" not in slim_state and "optimizer" not in slim_state
    assert {"model", "optimizer", "method", "best"} <= set(full_state)
    assert (tmp_path / "slim.pt").stat().st_size < (tmp_path / "full.pt").stat().st_size / 2
    for name, result in (("slim.pt", slim), ("full.pt", full)):
        again = Runner(data, config(), checkpoint=tmp_path / name, resume=True, progress=False)
        assert again.run() == result


class _Unsaveable:
    def __reduce__(self):
        raise pickle.PicklingError("refused midway")


def test_save_checkpoint_never_leaves_a_half_written_file(tmp_path):
    path = tmp_path / "run.pt"
    save_checkpoint({"epoch": 1}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    # A save that fails midway keeps the previous checkpoint whole under its name.
    with pytest.raises(pickle.PicklingError, match="refused midway"):
        save_checkpoint({"epoch": 2, "bad": _Unsaveable()}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_a_failed_save_removes_its_temporary_file(tmp_path):
    with pytest.raises(pickle.PicklingError, match="refused midway"):
        save_checkpoint({"epoch": 2, "bad": _Unsaveable()}, tmp_path / "run.pt")
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its .part file
