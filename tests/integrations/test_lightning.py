"""MultiTaskMixin under a real Lightning Trainer: the same parameters as a hand-written loop with
the same method, data and optimizer, the method's record in the logged metrics, and the errors
that name what is wrong."""

from __future__ import annotations

import importlib
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("lightning")

import lightning.pytorch as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision

from integrations import lightning_models as lm
from taskbalance.integrations.lightning import MultiTaskMixin

STEPS = 3


def assert_same_parameters(trained: lm.Net, reference: lm.Net) -> None:
    for (name, got), expected in zip(
        trained.named_parameters(), reference.parameters(), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    ("method", "options"),
    [("imtl_g", {}), ("imtl_l", {}), ("emtl", {}), ("mgda", {"level": "parameter"})],
)
def test_trainer_steps_equal_the_hand_written_loop(tmp_path, method, options):
    model = lm.Net(method, options)
    trainer = lm.trainer(str(tmp_path), STEPS, logger=CSVLogger(tmp_path))
    trainer.fit(model, lm.loader(batch_size=8))
    reference = lm.Net(method, options)
    infos = lm.hand_loop(reference, STEPS, batch_size=8)
    assert_same_parameters(model, reference)
    logged = trainer.logged_metrics
    for index, task in enumerate(lm.TASKS):
        expected = float(infos[-1].weights[index])
        assert float(logged[f"taskbalance/weight/{task}"]) == pytest.approx(expected, rel=1e-9)
    assert float(logged["taskbalance/loss/b"]) == pytest.approx(float(infos[-1].losses[1]))
    assert ("taskbalance/cosine/a-b" in logged) == (infos[-1].cosines is not None)
    assert (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize("method", ["imtl_l", "uw", "imtl_g"])
def test_gradient_accumulation_averages_each_micro_batch_own_step(tmp_path, method):
    # The method sees each micro-batch's raw losses (IMTL-L's and UW's learned scales
    # would change if it saw them divided by the accumulation steps); each update is divided.
    model = lm.Net(method)
    trainer = lm.trainer(str(tmp_path), STEPS, logger=False, accumulate_grad_batches=2)
    trainer.fit(model, lm.loader(batch_size=4))
    reference = lm.Net(method)
    lm.hand_loop(reference, STEPS, batch_size=4, accumulate=2)
    assert_same_parameters(model, reference)


@pytest.mark.parametrize("method", [None, "imtl_l"])
def test_an_adatask_optimizer_takes_the_per_task_gradients(tmp_path, method):
    model = lm.Net(method, optimizer="adatask")
    lm.trainer(str(tmp_path), STEPS, logger=False).fit(model, lm.loader(batch_size=8))
    reference = lm.Net(method, optimizer="adatask")
    lm.hand_loop(reference, STEPS, batch_size=8)
    assert_same_parameters(model, reference)


def test_manual_optimisation_runs_the_method_through_manual_backward(tmp_path):
    model = lm.ManualNet("imtl_g")
    lm.trainer(str(tmp_path), STEPS, logger=False).fit(model, lm.loader(batch_size=8))
    reference = lm.Net("imtl_g")
    lm.hand_loop(reference, STEPS, batch_size=8)
    assert_same_parameters(model, reference)


def test_16_bit_mixed_precision_scales_through_lightning_gradscaler(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    model = lm.HalfNet("imtl_g")
    lm.trainer(str(tmp_path), STEPS, logger=False, plugins=[plugin]).fit(model, lm.loader(8))
    reference = lm.HalfNet("imtl_g")
    lm.scaled_hand_loop(reference, STEPS, batch_size=8, init_scale=2.0**12)
    for got, expected in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == 2.0**12  # no overflow: every step was taken


def test_the_method_state_is_in_the_module_state_dict():
    model = lm.Net("imtl_l")
    assert "method.scales" in model.state_dict()


def test_ddp_leaves_the_method_parameters_and_buffers_to_the_method():
    assert lm.Net("imtl_l")._ddp_params_and_buffers_to_ignore == ["method.scales"]
    model = lm.Net("dwa")
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, ["heads.0.bias"]
    )
    ignored = model._ddp_params_and_buffers_to_ignore
    assert ignored[0] == "heads.0.bias" and "method.history" in ignored


def test_the_mixin_after_lightning_module_is_an_error():
    class Backwards(L.LightningModule, MultiTaskMixin):
        pass

    loss = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(TypeError, match="must come before LightningModule"):
        Backwards().balance({"a": loss})


def test_the_mixin_outside_a_lightning_module_is_an_error():
    class Plain(MultiTaskMixin, torch.nn.Module):
        pass

    with pytest.raises(TypeError, match="mixed into a LightningModule"):
        Plain().balance({"a": torch.tensor(1.0, requires_grad=True)})


def test_a_bad_loss_is_reported_by_balance_naming_the_task():
    with pytest.raises(Exception, match="'b'"):
        lm.Net("ew").balance({"a": torch.tensor(1.0, requires_grad=True), "b": torch.ones(3)})


def test_a_module_without_method_and_plain_optimizer_is_an_error(tmp_path):
    model = lm.Net(None)
    with pytest.raises(ValueError, match="no taskbalance method"):
        lm.trainer(str(tmp_path), 1, logger=False).fit(model, lm.loader(batch_size=8))


def test_method_parameters_missing_from_the_optimizer_are_an_error(tmp_path):
    class Forgetful(lm.Net):
        def configure_optimizers(self):
            return torch.optim.SGD([*self.trunk.parameters(), *self.heads.parameters()], lr=0.1)

    with pytest.raises(ValueError, match=r"\['scales'\] of IMTLL are in no optimizer"):
        lm.trainer(str(tmp_path), 1, logger=False).fit(Forgetful("imtl_l"), lm.loader(8))


def test_a_loss_not_from_balance_is_an_error(tmp_path):
    class Other(lm.Net):
        def training_step(self, batch, batch_idx):
            losses, z = self.task_losses(batch)
            self.balance(losses, features=z)
            return sum(losses.values())

    with pytest.raises(ValueError, match="does not come from balance"):
        lm.trainer(str(tmp_path), 1, logger=False).fit(Other("imtl_g"), lm.loader(8))


def test_famo_with_manual_updates_is_refused(tmp_path):
    with pytest.raises(ValueError, match="update='next_step'"):
        lm.trainer(str(tmp_path), 1, logger=False).fit(lm.Net("famo"), lm.loader(8))


def test_missing_lightning_names_the_extra(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "taskbalance.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'taskbalance\[lightning\]'"):
        importlib.import_module("taskbalance.integrations.lightning")


@pytest.mark.parametrize(
    "configs",
    [
        pytest.param([0, 2], id="imtl_g-imtl_l"),
        pytest.param([1, 3], id="mgda_parameter-adatask", marks=pytest.mark.slow),
    ],
)
def test_two_ddp_ranks_equal_one_process_on_the_joined_batch(tmp_path, configs):
    _check_two_ranks(tmp_path, configs, sharded=False)


@pytest.mark.parametrize(
    "configs",
    [
        # AdaTask's trunk is not in the final backward: it must still be resharded (release).
        pytest.param([4, 3], id="imtl_g_parameter-adatask"),
        pytest.param([0, 2], id="imtl_g_feature-imtl_l", marks=pytest.mark.slow),
    ],
)
def test_two_fsdp2_ranks_under_model_parallel_strategy_equal_one_process(tmp_path, configs):
    """Lightning's FSDP2 strategy (ModelParallelStrategy, which runs on CPU with gloo; its
    FSDPStrategy is FSDP1 and needs a GPU) with the module sharded in configure_model."""
    _check_two_ranks(tmp_path, configs, sharded=True)


def _check_two_ranks(tmp_path, configs, sharded):
    port = free_port()
    out_file = tmp_path / "params.pt"
    arguments = (2, port, configs, str(out_file), sharded)
    mp.spawn(lm.ddp_worker, args=arguments, nprocs=2, join=True)
    for index, trained in zip(configs, torch.load(out_file), strict=True):
        reference = lm.Net(*lm.DDP_CONFIGS[index])
        lm.hand_loop(reference, lm.DDP_STEPS, batch_size=8)
        for got, expected in zip(trained, lm.parameters(reference), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory):
    """The 2-rank Lightning DeepSpeed runs (tests/support/lightning_deepspeed_ranks.py)."""
    from support import lightning_deepspeed_ranks

    out_file = tmp_path_factory.mktemp("lightning_deepspeed") / "results.pt"
    arguments = (2, free_port(), str(out_file))
    mp.spawn(lightning_deepspeed_ranks.worker, args=arguments, nprocs=2, join=True)
    return torch.load(out_file)


DEEPSPEED_IDS = ["zero2-imtl_g", "zero2-imtl_l", "zero1-imtl_g", "zero2-imtl_g-manual"]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(DEEPSPEED_IDS)), ids=DEEPSPEED_IDS)
def test_two_deepspeed_ranks_under_lightning_equal_one_process(deepspeed_results, index):
    """Lightning's DeepSpeedStrategy (CUDA check lifted, see lightning_deepspeed_ranks) on 2
    gloo ranks against the hand loop on the joined batch, both float32 (Lightning's DeepSpeed
    precision plugin converts the module); the logged weights are the method's."""
    pytest.importorskip("deepspeed")
    from support.lightning_deepspeed_ranks import CONFIGS, STEPS

    _, method, _ = CONFIGS[index]
    reference = lm.HalfNet(method)
    infos = lm.hand_loop(reference, STEPS, batch_size=8)
    trained, weights = deepspeed_results[index]
    for got, expected in zip(trained, lm.parameters(reference), strict=True):
        # As the plain DeepSpeed loop's tests: DeepSpeed averages the gradients in float32.
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert weights == pytest.approx(infos[-1].weights.tolist(), rel=1e-6)


@pytest.mark.slow
def test_zero3_under_lightnings_deepspeed_strategy_is_refused_in_one_line(deepspeed_results):
    message = deepspeed_results["zero3"]
    assert message.startswith("ZeRO-3 gathers its partitioned parameters")
    assert "\n" not in message


class DeepSpeedStrategy:
    """Stands in for Lightning's (the mixin tells it by name), whose setup needs CUDA."""

    def __init__(self, engine, precision_plugin=None):
        self.model = engine
        self.precision_plugin = precision_plugin


def stub_engine(stage=2, fp16=False, accumulation=1, optimizer=None):
    """What the mixin asks of a DeepSpeed engine before the step."""
    import types

    return types.SimpleNamespace(
        zero_optimization_stage=lambda: stage,
        fp16_enabled=lambda: fp16,
        gradient_accumulation_steps=lambda: accumulation,
        basic_optimizer=optimizer,
    )


def under_deepspeed(model, strategy):
    import types

    model._trainer = types.SimpleNamespace(strategy=strategy)
    return model.task_losses(next(iter(lm.loader(4))))


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        (stub_engine(stage=3), "ZeRO-3 gathers"),
        (stub_engine(stage=0), "ZeRO stage 0 runs no DeepSpeed backward hooks"),
        (stub_engine(fp16=True), "fp16 scales the loss inside engine.backward"),
        (stub_engine(accumulation=2), "gradient_accumulation_steps is 2"),
        (
            stub_engine(optimizer=lm.make_optimizer(lm.Net(None, optimizer="adatask"))),
            "AdaTask optimizers keep per-task state per parameter",
        ),
    ],
    ids=["zero3", "stage0", "fp16", "accumulation", "adatask"],
)
def test_deepspeed_set_ups_the_step_cannot_run_in_are_refused_by_balance(engine, message):
    model = lm.Net("imtl_g")
    losses, z = under_deepspeed(model, DeepSpeedStrategy(engine))
    with pytest.raises(ValueError, match=message) as raised:
        model.balance(losses, features=z)
    assert "\n" not in str(raised.value)


def test_under_deepspeed_only_balances_loss_reaches_the_module_backward():
    """Lightning's DeepSpeed precision plugin calls engine.backward, never the module's hook:
    balance() routes its own loss to the hook, once per plugin; other losses are untouched."""

    class Precision:
        def backward(self, tensor, model, optimizer, *args, **kwargs):
            calls.append("engine")

    def module_backward(tensor, *args, **kwargs):
        model._taskbalance_pending = None
        calls.append("module")

    calls = []
    model = lm.Net("imtl_g")
    model.backward = module_backward
    plugin = Precision()
    losses, z = under_deepspeed(model, DeepSpeedStrategy(stub_engine(), plugin))
    for _ in range(2):
        loss = model.balance(losses, features=z)  # in training_step, before Lightning's backward
        plugin.backward(loss, model, None)
    plugin.backward(torch.tensor(1.0, requires_grad=True), model, None)
    assert calls == ["module", "module", "engine"]
