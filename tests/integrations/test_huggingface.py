"""MultiTaskTrainer on a tiny randomly initialised BERT with two heads (built from a config, no
download): the same parameters as a hand-written loop with the same method, data and optimizer,
the method's weights in the Trainer's logs, and errors that name what is wrong."""

from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (
    BertConfig,
    BertModel,
    BertPreTrainedModel,
    TrainingArguments,
    default_data_collator,
)

import taskbalance
from taskbalance.integrations.huggingface import MultiTaskTrainer, task_outputs

SAMPLES = 8
LR = 0.1
STEPS = 3


class TwoHeadBert(BertPreTrainedModel):
    """A BERT encoder shared by a regression head ('score') and a 3-class head ('topic')."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.score_head = nn.Linear(config.hidden_size, 1)
        self.topic_head = nn.Linear(config.hidden_size, 3)
        self.post_init()

    def forward(self, input_ids, attention_mask, score, topic):
        z = self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        losses = {
            "score": F.mse_loss(self.score_head(z).squeeze(-1), score),
            "topic": F.cross_entropy(self.topic_head(z), topic),
        }
        return {"task_losses": losses, "features": z}


def tiny_model() -> TwoHeadBert:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return TwoHeadBert(config).double()


def dataset() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 30, (SAMPLES, 6), generator=gen)
    scores = 10 * torch.randn(SAMPLES, generator=gen, dtype=torch.float64)
    topics = torch.randint(0, 3, (SAMPLES,), generator=gen)
    return [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(6, dtype=torch.long),
            "score": scores[i],
            "topic": topics[i],
        }
        for i in range(SAMPLES)
    ]


def arguments(folder, batch_size: int, accumulate: int = 1) -> TrainingArguments:
    """SGD at a constant rate, no clipping, the data in order, a log entry every step."""
    return TrainingArguments(
        output_dir=str(folder),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulate,
        max_steps=STEPS,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )


def hand_loop(model, method, batch_size, accumulate=1, adatask=False, shared=None):
    """The same steps without the Trainer: each micro-batch's own method.backward, the
    gradients averaged, one optimizer step. Returns each micro-batch's record."""
    data = dataset()
    batches = [
        default_data_collator(data[i : i + batch_size]) for i in range(0, SAMPLES, batch_size)
    ]
    if adatask:
        optimizer = taskbalance.AdaTaskAdam(
            [
                {"params": model.bert.parameters(), "shared": True},
                {"params": [*model.score_head.parameters(), *model.topic_head.parameters()]},
            ],
            lr=LR,
        )
    else:
        groups = [{"params": list(model.parameters())}]
        if list(method.parameters()):
            groups.append(method.param_group())
        optimizer = torch.optim.SGD(groups, lr=LR)
    params = [*model.parameters(), *method.parameters()]
    infos = []
    for step in range(STEPS):
        optimizer.zero_grad()
        summed = [torch.zeros_like(p) for p in params]
        for micro in range(accumulate):
            optimizer.zero_grad()
            outputs = model(**batches[(step * accumulate + micro) % len(batches)])
            losses = outputs["task_losses"]
            if adatask:
                infos.append(optimizer.backward(losses, method=method))
                break
            infos.append(method.backward(losses, features=outputs["features"], shared=shared))
            for total, param in zip(summed, params, strict=True):
                if param.grad is not None:
                    total += param.grad
        if not adatask:
            for total, param in zip(summed, params, strict=True):
                param.grad = total / accumulate
        optimizer.step()
    return infos


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
