"""MultiTaskTrainer on a tiny randomly initialised BERT with two heads (built from a config, no
download): the same parameters as a hand-written loop with the same method, data and optimizer,
the method's weights in the Trainer's logs, and errors that name what is wrong."""

from __future__ import annotations

import copy
import importlib
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import taskbalance
from integrations import hf_models
from integrations.hf_models import LR, STEPS, arguments, dataset, hand_loop, tiny_model
from taskbalance.integrations.huggingface import (
    METHOD_STATE,
    MultiTaskTrainer,
    _check_features_reach_losses,
    task_outputs,
)


def assert_same_parameters(trained: nn.Module, reference: nn.Module) -> None:
    for (name, got), expected in zip(
        trained.named_parameters(), reference.parameters(), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    ("name", "options"),
    [("imtl_g", {}), ("imtl_l", {}), ("mgda", {"level": "parameter"})],
)
def test_trainer_steps_equal_the_hand_written_loop(tmp_path, name, options):
    model = tiny_model()
    reference = copy.deepcopy(model)
    method = taskbalance.get_method(name, tasks=["score", "topic"], **options)
    reference_method = copy.deepcopy(method)
    trainer = MultiTaskTrainer(
        model=model, args=arguments(tmp_path, 4), train_dataset=dataset(), method=method
    )
    trainer.train()
    infos = hand_loop(reference, reference_method, 4, shared=reference.bert)
    assert_same_parameters(model, reference)
    assert_same_parameters(method, reference_method)
    unused = trainer.args.ddp_find_unused_parameters  # unset: False for a feature-level method
    assert unused is (False if method.level == "feature" else None)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == STEPS
    for entry, info in zip(logs, infos, strict=True):
        for index, task in enumerate(info.tasks):
            assert entry[f"taskbalance/weight/{task}"] == pytest.approx(float(info.weights[index]))
        assert entry["loss"] == pytest.approx(float(info.losses.sum()))


def test_gradient_accumulation_averages_each_micro_batch_own_step(tmp_path):
    model = tiny_model()
    reference = copy.deepcopy(model)
    method = taskbalance.IMTLL(tasks=["score", "topic"])
    reference_method = copy.deepcopy(method)
    args = arguments(tmp_path, 2, accumulate=2)
    MultiTaskTrainer(model=model, args=args, train_dataset=dataset(), method=method).train()
    hand_loop(reference, reference_method, 2, accumulate=2)
    assert_same_parameters(model, reference)
    assert_same_parameters(method, reference_method)


def test_an_adatask_optimizer_takes_the_per_task_gradients(tmp_path):
    model = tiny_model()
    reference = copy.deepcopy(model)
    optimizer = taskbalance.AdaTaskAdam(
        [
            {"params": model.bert.parameters(), "shared": True},
            {"params": [*model.score_head.parameters(), *model.topic_head.parameters()]},
        ],
        lr=LR,
    )
    trainer = MultiTaskTrainer(
        model=model,
        args=arguments(tmp_path, 4),
        train_dataset=dataset(),
        optimizers=(optimizer, None),
    )
    trainer.train()
    hand_loop(reference, taskbalance.EW(), 4, adatask=True)
    assert_same_parameters(model, reference)


def test_an_output_without_task_losses_names_what_it_has():
    with pytest.raises(ValueError, match=r"no 'task_losses' \(keys: \['loss', 'logits'\]\)"):
        task_outputs({"loss": torch.tensor(1.0), "logits": torch.zeros(2)})
    with pytest.raises(ValueError, match="got a tuple"):
        task_outputs((torch.tensor(1.0),))


def test_a_feature_level_method_refuses_ddp_that_detaches_the_outputs(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(nn.Linear(2, 2), find_unused_parameters=True)
        with pytest.raises(ValueError, match="ddp_find_unused_parameters=False"):
            _check_features_reach_losses(wrapped)
        _check_features_reach_losses(nn.parallel.DistributedDataParallel(nn.Linear(2, 2)))
    finally:
        dist.destroy_process_group()


def test_parameter_level_without_a_shared_part_is_an_error(tmp_path):
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(30, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, input_ids, attention_mask, score, topic):
            z = self.embed(input_ids).mean(1)
            out = self.head(z).squeeze(-1)
            return {"task_losses": {"score": (out - score).pow(2).mean(), "topic": out.mean()}}

    trainer = MultiTaskTrainer(
        model=Flat().double(),
        args=arguments(tmp_path, 4),
        train_dataset=dataset(),
        method=taskbalance.IMTLG(level="parameter"),
    )
    with pytest.raises(ValueError, match="shared='<name of the shared submodule>'"):
        trainer.train()


def test_method_parameters_missing_from_a_given_optimizer_are_an_error(tmp_path):
    model = tiny_model()
    trainer = MultiTaskTrainer(
        model=model,
        args=arguments(tmp_path, 4),
        train_dataset=dataset(),
        method=taskbalance.IMTLL(tasks=["score", "topic"]),
        optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None),
    )
    with pytest.raises(ValueError, match=r"add method\.param_group"):
        trainer.train()


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "taskbalance.integrations.huggingface")
    with pytest.raises(ImportError, match=r"pip install 'taskbalance\[hf\]'"):
        importlib.import_module("taskbalance.integrations.huggingface")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "deepspeed"])
def test_two_ranks_equal_one_process_on_the_joined_batch(tmp_path, mode):
    if mode == "deepspeed":
        pytest.importorskip("deepspeed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(hf_models.ddp_worker, args=(2, port, str(tmp_path), mode), nprocs=2, join=True)
    results = torch.load(tmp_path / "params.pt")
    configs = hf_models.METHODS[mode]
    # DeepSpeed averages the gradients in float32, EW's too.
    tolerance = (
        {"rtol": 1e-6, "atol": 1e-6} if mode == "deepspeed" else {"rtol": 1e-10, "atol": 1e-12}
    )
    for (name, options), trained in zip(configs, results, strict=True):
        model = tiny_model()
        method = taskbalance.get_method(name, tasks=["score", "topic"], **options).double()
        hand_loop(model, method, 8, shared=model.bert)
        expected = [*model.parameters(), *method.parameters()]
        for got, want in zip(trained, expected, strict=True):
            torch.testing.assert_close(got, want.detach(), **tolerance)


def saving_trainer(folder, model, method):
    args = arguments(folder, 4)
    args.save_strategy, args.save_steps = "steps", 2
    return MultiTaskTrainer(model=model, args=args, train_dataset=dataset(), method=method)


@pytest.mark.parametrize("name", ["imtl_l", "pcgrad"])
def test_resuming_from_a_checkpoint_restores_the_method_state(tmp_path, name):
    # IMTL-L learns its loss scales, PCGrad draws its projection order from its own generator:
    # a resumed run must continue from the saved state, so that stopping at step 2 and resuming
    # equals training the 3 steps in one go.
    whole_model, whole_method = tiny_model(), taskbalance.get_method(name, tasks=["score", "topic"])
    saving_trainer(tmp_path, whole_model, whole_method).train()
    saved = torch.load(tmp_path / "checkpoint-2" / METHOD_STATE, weights_only=True)
    if name == "imtl_l":
        assert not torch.equal(saved["scales"], torch.zeros(2))  # learnt by step 2

    model, method = tiny_model(), taskbalance.get_method(name, tasks=["score", "topic"])
    saving_trainer(tmp_path / "again", model, method).train(str(tmp_path / "checkpoint-2"))
    assert_same_parameters(model, whole_model)
    assert_same_parameters(method, whole_method)
    state, whole_state = method.get_extra_state(), whole_method.get_extra_state()
    assert state.keys() == whole_state.keys()
    if "generator" in state:  # the same draws from here on
        assert torch.equal(state["generator"], whole_state["generator"])


def test_the_method_state_goes_into_the_trainers_own_checkpoint_folder(tmp_path):
    # A hyperparameter-search trial saves under output_dir/run-<id>/, not output_dir/.
    trainer = saving_trainer(tmp_path, tiny_model(), taskbalance.IMTLL(tasks=["score", "topic"]))
    trainer._get_output_dir = lambda trial: str(tmp_path / "run-7")
    trainer.train()
    assert (tmp_path / "run-7" / "checkpoint-2" / METHOD_STATE).is_file()
    assert not (tmp_path / "checkpoint-2").exists()


def test_a_checkpoint_without_the_method_state_warns_for_a_stateful_method(tmp_path):
    args = arguments(tmp_path, 4)
    args.save_strategy, args.save_steps = "steps", 2
    method = taskbalance.IMTLL(tasks=["score", "topic"])
    MultiTaskTrainer(model=tiny_model(), args=args, train_dataset=dataset(), method=method).train()
    for saved in tmp_path.glob(f"checkpoint-*/{METHOD_STATE}"):  # as a plain Trainer leaves it
        saved.unlink()
    resumed = MultiTaskTrainer(
        model=tiny_model(), args=args, train_dataset=dataset(), method=method
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"holds no taskbalance_method.pt: IMTLL resumes"):
        resumed.train(resume_from_checkpoint=True)
