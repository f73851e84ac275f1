"""A tiny randomly initialised BERT with two heads (built from a config, no download), its
data, the Trainer's arguments and the hand-written loop it must agree with.

Shared by the one-process tests and the two-rank DDP workers (which import this module by
name, so it lives outside the test files).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    BertConfig,
    BertModel,
    BertPreTrainedModel,
    TrainingArguments,
    default_data_collator,
)

import taskbalance

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


def arguments(
    folder, batch_size: int, accumulate: int = 1, deepspeed: dict | None = None
) -> TrainingArguments:
    """SGD at a constant rate, no clipping, the data in order, a log entry every step (under
    DeepSpeed with ``deepspeed``, its config)."""
    return TrainingArguments(
        deepspeed=deepspeed,
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


DDP_METHODS = (("imtl_g", {}), ("imtl_l", {}))
FSDP_METHODS = (("imtl_g", {}), ("imtl_g", {"level": "parameter"}), ("imtl_l", {}))
"""Under FSDP2: feature level (units held across the per-task passes), parameter level (the
Jacobian reduce-scattered into the shards), loss level with the method's own parameters."""
DEEPSPEED_METHODS = (("ew", {}), ("imtl_g", {}), ("imtl_g", {"level": "parameter"}))
"""Under DeepSpeed ZeRO-2 (the method's own parameters would not be in DeepSpeed's optimizer)."""
METHODS = {"ddp": DDP_METHODS, "fsdp2": FSDP_METHODS, "deepspeed": DEEPSPEED_METHODS}
ZERO2 = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "gradient_clipping": 0.0,
    "zero_allow_untested_optimizer": True,
}


def ddp_worker(rank: int, world_size: int, port: int, folder: str, mode: str = "ddp") -> None:
    """One rank of a 2-process run on CPU (gloo), launched as torchrun would, under
    DistributedDataParallel, FSDP2 through accelerate (each BertLayer and the whole model a
    ``fully_shard`` unit) or DeepSpeed ZeRO-2: train with each of ``METHODS[mode]`` (in float64)
    and let rank 0 save the (full) parameters. Accelerate gives the ranks consecutive
    batches, so with a per-rank batch of 4 the ranks together see each batch of 8 that the
    one-process loop sees."""
    import os

    from support.ranks import exit_now, set_torchrun_env
    from taskbalance.integrations.huggingface import MultiTaskTrainer

    set_torchrun_env(rank, world_size, port)
    torch.set_num_threads(1)
    results = []
    for name, options in METHODS[mode]:
        model = tiny_model()
        method = taskbalance.get_method(name, tasks=["score", "topic"], **options).double()
        args = arguments(folder, 8 // world_size, deepspeed=ZERO2 if mode == "deepspeed" else None)
        args.ddp_backend = "gloo"
        if mode == "fsdp2":
            args.fsdp = "full_shard"
            args.fsdp_config = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}
        shared = "bert" if options.get("level") == "parameter" else None
        trainer = MultiTaskTrainer(
            model=model, args=args, train_dataset=dataset(), method=method, shared=shared
        )
        trainer.train()
        trained = [*trainer.model.parameters(), *method.parameters()]
        results.append([getattr(p, "full_tensor", p.detach)().detach().clone() for p in trained])
    if rank == 0:
        torch.save(results, os.path.join(folder, "params.pt"))
    torch.distributed.destroy_process_group()
    exit_now()
